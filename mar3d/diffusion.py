"""Per-token diffusion loss head (DESIGN §6; Li et al. 2024, "MAR").

A small MLP denoises each token x_t given the transformer's output z at that position.
Two entry points: `DiffLoss.loss(target, z, mask)` and `DiffLoss.sample(z, ...)`.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021):
    ᾱ_t            cumulative product of (1 − β) under the cosine schedule, T = 1000 steps
    x_t            √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε
    ε̂, v           network output: noise estimate and variance interpolation v ∈ [−1, 1]
    log σ²_t       ((v+1)/2) · log β_t + (1 − (v+1)/2) · log β̃_t      (learned variance)
    β̃_t            (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t                    (posterior variance)
The training loss is the "hybrid" loss: MSE(ε̂, ε) + the variational bound term for the
variance (with the mean detached), as in improved DDPM.
"""

import math

import torch
import torch.nn as nn

from .schedules import cosine_alphas_cumprod, respaced_timesteps


# --------------------------------------------------------------------------- noise schedule
class Diffusion:
    """Gaussian diffusion quantities for a (possibly respaced) set of timesteps. Holds no model."""

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor):
        self.timesteps = timesteps  # original training timestep of each (respaced) step, increasing
        acp = alphas_cumprod[timesteps].double()
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        self.betas = 1 - acp / acp_prev
        self.acp, self.acp_prev = acp, acp_prev
        post_var = self.betas * (1 - acp_prev) / (1 - acp)
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(acp) > 1 else torch.log(self.betas)
        self.log_betas = torch.log(self.betas)
        self.coef_x0 = self.betas * acp_prev.sqrt() / (1 - acp)        # posterior mean = coef_x0·x_0 + coef_xt·x_t
        self.coef_xt = (1 - acp_prev) * (1 - self.betas).sqrt() / (1 - acp)

    @classmethod
    def cosine(cls, train_steps: int = 1000, sample_steps: int | None = None) -> "Diffusion":
        acp = cosine_alphas_cumprod(train_steps)
        return cls(acp, respaced_timesteps(train_steps, sample_steps or train_steps))

    def _at(self, values: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[i].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.acp, i, x0).sqrt() * x0 + (1 - self._at(self.acp, i, x0)).sqrt() * noise

    def p_mean_logvar(self, x_t: torch.Tensor, i: torch.Tensor, eps: torch.Tensor, v: torch.Tensor,
                      clip_x0: float | None = None):
        """Mean and log-variance of p(x_{t−1} | x_t) from the network's ε̂ and v.

        At the noisiest steps ᾱ_t ≈ 2e-9, so x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t multiplies any error
        in ε̂ by ~2e4; `clip_x0` bounds x̂_0 while sampling (tokens are normalised to unit scale).
        """
        acp = self._at(self.acp, i, x_t)
        x0 = (x_t - (1 - acp).sqrt() * eps) / acp.sqrt()
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        frac = (v + 1) / 2
        logvar = frac * self._at(self.log_betas, i, x_t) + (1 - frac) * self._at(self.post_logvar, i, x_t)
        return self._at(self.coef_x0, i, x_t) * x0 + self._at(self.coef_xt, i, x_t) * x_t, logvar

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor):
        """Mean and log-variance of the true posterior q(x_{t−1} | x_t, x_0)."""
        return self._at(self.coef_x0, i, x_t) * x0 + self._at(self.coef_xt, i, x_t) * x_t, self._at(self.post_logvar, i, x_t)


def vb_term(true_mean, true_logvar, mean, logvar, x0, first: torch.Tensor) -> torch.Tensor:
    """Variational-bound term per token in bits: KL(q ‖ p) for t > 0, Gaussian NLL of x_0 at t = 0."""
    kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * torch.exp(-logvar))
    nll = 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 * torch.exp(-logvar))
    return torch.where(first[:, None], nll, kl).mean(-1) / math.log(2.0)


# --------------------------------------------------------------------------- denoiser MLP
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) → (N, dim) of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaLNBlock(nn.Module):
    """x ← x + gate · MLP(LN(x) · (1 + scale) + shift), with (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """Denoiser: (x_t (N,C), t (N,), z (N,W)) → (ε̂, v) as (N, 2C). Zero-initialised gates and output."""

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.in_proj = nn.Linear(token_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.z_proj = nn.Linear(z_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, 2 * token_dim)
        for module in [b.modulation[-1] for b in self.blocks] + [self.out_modulation[-1], self.out]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = self.time_mlp(timestep_embedding(t, 256).to(x.dtype)) + self.z_proj(z)  # (N, W)
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.out_modulation(cond).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)  # (N, 2C)


# --------------------------------------------------------------------------- the head
class DiffLoss(nn.Module):
    """Diffusion loss over tokens: trains with T steps, samples with a respaced schedule."""

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int, train_steps: int = 1000):
        super().__init__()
        self.token_dim, self.train_steps = token_dim, train_steps
        self.net = SimpleMLPAdaLN(token_dim, z_dim, width, depth)
        self.train_diffusion = Diffusion.cosine(train_steps)

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """target (N, C), z (N, W), mask (N,) of 0/1 weights → mean hybrid loss over the masked tokens."""
        d = self.train_diffusion
        target = target.float()
        i = torch.randint(0, self.train_steps, (target.shape[0],), device=target.device, generator=generator)
        noise = torch.randn(target.shape, device=target.device, generator=generator)
        x_t = d.q_sample(target, i, noise)
        eps, v = self.net(x_t, d.timesteps.to(i.device)[i], z).float().chunk(2, dim=-1)
        mse = (eps - noise).pow(2).mean(-1)
        mean, logvar = d.p_mean_logvar(x_t, i, eps.detach(), v)  # the bound trains the variance only
        true_mean, true_logvar = d.posterior(target, x_t, i)
        vb = vb_term(true_mean, true_logvar, mean, logvar, target, first=i == 0) * self.train_steps / 1000.0
        per_token = mse + vb
        if mask is None:
            return per_token.mean()
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0, steps: int = 100,
               generator: torch.Generator | None = None, clip_x0: float = 6.0) -> torch.Tensor:
        """Tokens (N, C) for z (N, W); with cfg ≠ 1, z is [conditional; unconditional] (2N, W)
        and both halves denoise the same x_t (ε̂ = ε̂_u + cfg·(ε̂_c − ε̂_u))."""
        d = Diffusion.cosine(self.train_steps, steps)
        n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
        x = torch.randn((n, self.token_dim), device=z.device, generator=generator)
        for k in reversed(range(len(d.timesteps))):
            i = torch.full((n,), k, device=z.device, dtype=torch.long)
            t = d.timesteps.to(z.device)[i]
            if cfg != 1.0:
                out = self.net(torch.cat([x, x]), torch.cat([t, t]), z).float()
                eps_c, eps_u = out[:n, : self.token_dim], out[n:, : self.token_dim]
                eps, v = eps_u + cfg * (eps_c - eps_u), out[:n, self.token_dim:]
            else:
                eps, v = self.net(x, t, z).float().chunk(2, dim=-1)
            mean, logvar = d.p_mean_logvar(x, i, eps, v, clip_x0)
            noise = torch.randn(x.shape, device=z.device, generator=generator) if k > 0 else torch.zeros_like(x)
            x = mean + (0.5 * logvar).exp() * noise * temperature
        return x
