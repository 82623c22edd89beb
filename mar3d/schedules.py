"""Schedules of MAR and its diffusion head, as small pure functions (DESIGN §6).

Learning-rate and EMA schedules live with the training engine (mar3d.train).
"""

import math

import torch


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t for t = 0 … T−1 of the cosine noise schedule (Nichol & Dhariwal 2021), float64:
        f(t) = cos²(π/2 · (t/T + s) / (1 + s)),   β_t = min(1 − f(t+1)/f(t), max_beta),   ᾱ_t = Π_{i≤t} (1 − β_i)
    """
    t = torch.arange(num_steps + 1, dtype=torch.float64, device="cpu") / num_steps  # constants: always CPU
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def respaced_timesteps(train_steps: int, sample_steps: int) -> torch.Tensor:
    """`sample_steps` training timesteps, evenly spaced from 0 to train_steps − 1, increasing."""
    if not 1 <= sample_steps <= train_steps:
        raise ValueError(f"diffusion steps must be in [1, {train_steps}], got {sample_steps}")
    return torch.linspace(0, train_steps - 1, sample_steps, device="cpu").round().long().unique()


def tokens_per_step(seq_len: int, num_steps: int) -> list[int]:
    """How many tokens each of the S sampling steps decodes (MaskGIT cosine schedule).

    Ideal counts c_s = L·(cos(π/2·s/S) − cos(π/2·(s+1)/S)) grow with s: few tokens early, many
    late. They are rounded so that every step decodes at least one token, the counts never
    decrease and they sum to L: floor (at least 1), then the remainder goes to the last steps
    (or the excess is taken from the first of the largest). Needs 1 ≤ S ≤ L.
    """
    if not 1 <= num_steps <= seq_len:
        raise ValueError(f"steps must be in [1, {seq_len}] for {seq_len} tokens, got {num_steps}")
    edges = [seq_len * math.cos(math.pi / 2 * s / num_steps) for s in range(num_steps + 1)]
    counts = [max(1, math.floor(a - b)) for a, b in zip(edges, edges[1:])]
    for k in range(seq_len - sum(counts)):  # remainder: +1 on the last steps
        counts[num_steps - 1 - k % num_steps] += 1
    for _ in range(sum(counts) - seq_len):  # excess from the max(1, ·) floor: −1 where the maximum starts
        counts[counts.index(max(counts))] -= 1
    return counts


def cfg_scale_at(cfg: float, masked_after: int, seq_len: int) -> float:
    """Linear guidance ramp (Muse/MAR): ω_s = 1 + (ω − 1) · (L − #masked after step s) / L."""
    return 1.0 + (cfg - 1.0) * (seq_len - masked_after) / seq_len


def sample_mask_ratio(generator: torch.Generator | None = None, mean: float = 1.0, std: float = 0.25,
                      low: float = 0.7, high: float = 1.0) -> float:
    """One training mask ratio from a normal(mean, std) truncated to [low, high] (inverse-CDF draw)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    a, b = normal.cdf(torch.tensor((low - mean) / std)), normal.cdf(torch.tensor((high - mean) / std))
    u = a + (b - a) * torch.rand((), generator=generator)
    return float((mean + std * torch.special.ndtri(u)).clamp(low, high))
