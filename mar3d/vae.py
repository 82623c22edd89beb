"""Pyramid VAE (DESIGN §3): surface point pyramid → latent tokens → occupancy field.

One model emits both token sets of the cascade:
  HR tokens: queries = the first `hr_tokens` points, levels N, N/4, N/16   (K = 3)
  LR tokens: queries = the first `lr_tokens` points, levels N/4, N/16, N/64
The surface points arrive ordered by farthest-point sampling (mar3d.geometry.fps_order), so
every level and every query set is simply a prefix of that order. With K = 1 the same code
is the single-level VAE of the paper's ablation.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import CrossBlock, FourierEmbed, SelfBlock, init_weights


@dataclass
class VAEConfig:
    width: int = 128          # transformer width D
    heads: int = 4
    num_levels: int = 3       # K pyramid levels, each with its own cross-attention (1 = single-level)
    num_points: int = 1024    # N: finest level of the HR encoding; level k holds N // 4**k points
    hr_tokens: int = 128      # latent tokens of the HR set (queries = first hr_tokens FPS points)
    lr_tokens: int = 32       # latent tokens of the LR set
    enc_layers: int = 2       # self-attention layers after the summed cross-attentions
    dec_layers: int = 2       # self-attention layers over the latent tokens in the decoder
    latent_dim: int = 32      # channels C per latent token (what MAR generates)
    num_freqs: int = 6        # Fourier octaves π·2^k, k < num_freqs
    kl_weight: float = 0.0    # 0: deterministic auto-encoder (posterior mean, no sampling)
    near_weight: float = 1.0  # weight of the near-surface BCE next to the uniform BCE
    out_bias: float = -1.0    # initial logit: most of the box is empty
    latent_noise: float = 0.0  # training only: decode latents + U(0, latent_noise)·std(latents)·ε, so that
                               # tokens a little wrong decode to a shape a little wrong (0 = off)
    queries: str = "fps"      # "fps": token i is queried at the i-th FPS surface point (DESIGN §3); "learned":
                              # one learned query per token index (3DShape2VecSet's other variant), so index i
                              # is the same slot on every shape and the tokens vary smoothly with the shape
    latent_shrink: float = 0.0  # training only: first pull the latents towards their channel means by a factor
                                # a ~ U(1 − latent_shrink, 1), as a regression towards the mean does (0 = off)

    def level_sizes(self, tokens: str) -> list[int]:
        """Point counts of the K levels used for the 'hr' or 'lr' token set."""
        first = {"hr": 0, "lr": 1}[tokens]
        return [self.num_points // 4 ** (first + k) for k in range(self.num_levels)]

    def num_tokens(self, tokens: str) -> int:
        return {"hr": self.hr_tokens, "lr": self.lr_tokens}[tokens]


class PyramidVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        # --------------------------------------------------------------- encoder
        self.fourier = FourierEmbed(cfg.num_freqs)
        self.point_embed = nn.Linear(self.fourier.out_dim + 3, D)  # E = Linear([γ(P), normals])
        self.level_attn = nn.ModuleList(CrossBlock(D, cfg.heads) for _ in range(cfg.num_levels))
        self.encoder = nn.ModuleList(SelfBlock(D, cfg.heads) for _ in range(cfg.enc_layers))
        # --------------------------------------------------------------- bottleneck
        self.to_moments = nn.Linear(D, 2 * cfg.latent_dim)  # mean, log-variance
        self.from_latent = nn.Linear(cfg.latent_dim, D)
        # --------------------------------------------------------------- decoder
        self.decoder = nn.ModuleList(SelfBlock(D, cfg.heads) for _ in range(cfg.dec_layers))
        self.query_embed = nn.Linear(self.fourier.out_dim, D)
        self.query_attn = CrossBlock(D, cfg.heads, mlp=False)
        self.out_norm = nn.LayerNorm(D)
        self.to_logit = nn.Linear(D, 1)

        self.apply(init_weights)
        nn.init.constant_(self.to_logit.bias, cfg.out_bias)
        if cfg.queries == "learned":
            self.hr_queries = nn.Parameter(0.02 * torch.randn(cfg.hr_tokens, D))
            self.lr_queries = nn.Parameter(0.02 * torch.randn(cfg.lr_tokens, D))
        elif cfg.queries != "fps":
            raise ValueError(f"unknown VAE queries {cfg.queries!r} (expected 'fps' or 'learned')")

    # ------------------------------------------------------------------- encoding
    def embed_points(self, pts: torch.Tensor) -> torch.Tensor:
        return self.point_embed(torch.cat([self.fourier(pts[..., :3]), pts[..., 3:6]], dim=-1))

    def encode_moments(self, surface: torch.Tensor, tokens: str = "hr") -> tuple[torch.Tensor, torch.Tensor]:
        """surface (B, ≥N, 6) in FPS order → posterior mean and log-variance, each (B, M, C)."""
        sizes = self.cfg.level_sizes(tokens)
        if surface.shape[1] < sizes[0]:
            raise ValueError(f"need {sizes[0]} surface points for '{tokens}' tokens, got {surface.shape[1]}")
        if self.cfg.queries == "learned":
            queries = (self.hr_queries if tokens == "hr" else self.lr_queries).expand(surface.shape[0], -1, -1)
        else:
            queries = self.embed_points(surface[:, : self.cfg.num_tokens(tokens)])  # (B, M, D)
        x = sum(block(queries, self.embed_points(surface[:, :n])) for block, n in zip(self.level_attn, sizes))
        for block in self.encoder:
            x = block(x)  # (B, M, D)
        mean, logvar = self.to_moments(x).chunk(2, dim=-1)  # (B, M, C) each
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def place_queries(self, hr_points: torch.Tensor, lr_points: torch.Tensor) -> None:
        """Learned queries only: set them to the point embedding of fixed positions (M, 3) (normals 0),
        e.g. anchors of where an FPS VAE queries, so that fine-tuning starts near that VAE."""
        for param, pts in ((self.hr_queries, hr_points), (self.lr_queries, lr_points)):
            pts = torch.as_tensor(pts, dtype=param.dtype, device=param.device)
            param.copy_(self.embed_points(torch.cat([pts, torch.zeros_like(pts)], dim=-1)))

    def encode(self, surface: torch.Tensor, tokens: str = "hr", sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent tokens (B, M, C): the posterior mean, or a sample from it."""
        mean, logvar = self.encode_moments(surface, tokens)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    # ------------------------------------------------------------------- decoding
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent tokens (B, M, C) → token features (B, M, D) that occupancy queries attend to."""
        x = self.from_latent(latents)
        for block in self.decoder:
            x = block(x)
        return x

    def query(self, features: torch.Tensor, points: torch.Tensor, fourier: FourierEmbed | None = None) -> torch.Tensor:
        """Occupancy logits (B, Q) at points (B, Q, 3); positive inside. `fourier`: another embedding
        of the query points than the trained one (a blurred one: `occupancy_fn`)."""
        q = self.query_embed((fourier or self.fourier)(points))  # (B, Q, D)
        q = self.query_attn(q, features)
        return self.to_logit(self.out_norm(q)).squeeze(-1)

    def occupancy_fn(self, latents: torch.Tensor, blur: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
        """A decode function for mesh extraction: points (Q, 3) → logits (Q,), for one shape.

        blur σ > 0: each query's Fourier features are their expectation under a Gaussian jitter of
        the point of that σ (`FourierEmbed`'s blur), a decoding choice that damps the ripples of the
        finest octaves (period 2 / 2^(num_freqs − 1)) and leaves the weights as trained (pilot Q1)."""
        assert latents.shape[0] == 1, "occupancy_fn takes the latents of one shape"
        with torch.no_grad():
            features = self.decode(latents)
        fourier = FourierEmbed(self.cfg.num_freqs, blur).to(features.device) if blur else None

        @torch.no_grad()
        def decode_fn(points: torch.Tensor) -> torch.Tensor:
            return self.query(features, points.to(features)[None], fourier)[0].float()

        return decode_fn

    # ------------------------------------------------------------------- training
    def forward(self, surface: torch.Tensor, points: torch.Tensor, tokens: str = "hr") -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct occupancy at points (B, Q, 3). Returns logits (B, Q) and the KL per token."""
        mean, logvar = self.encode_moments(surface, tokens)
        if self.cfg.kl_weight > 0:
            latents = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        else:
            latents, kl = mean, mean.new_zeros(())
        if self.training and (self.cfg.latent_noise > 0 or self.cfg.latent_shrink > 0):
            latents = noised_latents(latents, self.cfg.latent_noise, self.cfg.latent_shrink)
        return self.query(self.decode(latents), points), kl

    def loss(self, surface: torch.Tensor, uniform: tuple, near: tuple, tokens: str = "hr") -> tuple[torch.Tensor, dict]:
        """BCE(uniform) + near_weight·BCE(near-surface) + kl_weight·KL. uniform/near: (points, labels)."""
        points = torch.cat([uniform[0], near[0]], dim=1)  # (B, Qu + Qn, 3)
        logits, kl = self(surface, points, tokens)
        n_uniform = uniform[0].shape[1]
        bce_u = F.binary_cross_entropy_with_logits(logits[:, :n_uniform].float(), uniform[1].float())
        bce_n = F.binary_cross_entropy_with_logits(logits[:, n_uniform:].float(), near[1].float())
        loss = bce_u + self.cfg.near_weight * bce_n + self.cfg.kl_weight * kl
        return loss, {"bce_uniform": bce_u.item(), "bce_near": bce_n.item(), "kl": float(kl)}


def noised_latents(latents: torch.Tensor, max_noise: float, max_shrink: float = 0.0) -> torch.Tensor:
    """m + a·(latents − m) + s·std(latents)·ε for latents (B, M, C), with a ~ U(1 − max_shrink, 1) and
    s ~ U(0, max_noise) per shape, m the channel means over the batch. m and std are not differentiated,
    so the encoder can escape neither the noise (by growing the latents) nor the shrinkage."""
    shape = (latents.shape[0], 1, 1)
    std = latents.detach().std()
    if max_shrink > 0:
        a = 1 - max_shrink * torch.rand(shape, device=latents.device, dtype=latents.dtype)
        m = latents.detach().mean(dim=(0, 1), keepdim=True)
        latents = m + a * (latents - m)
    s = max_noise * torch.rand(shape, device=latents.device, dtype=latents.dtype)
    return latents + s * std * torch.randn_like(latents)


# ----------------------------------------------------------------------- presets
PRESETS = {
    # Trains end to end on a 2-core CPU (DESIGN §8, §9); what checkpoints/ ships.
    "tiny": VAEConfig(),
    # DESIGN §3, sizes of the reference code: N = 8192 → 1024 HR / 256 LR tokens (1/8 of the finest level).
    "paper": VAEConfig(width=768, heads=12, num_points=8192, hr_tokens=1024, lr_tokens=256,
                       enc_layers=8, dec_layers=16, latent_dim=64, num_freqs=8, kl_weight=1e-3,
                       near_weight=0.1),
}
