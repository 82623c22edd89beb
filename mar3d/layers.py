"""Transformer building blocks shared by the Pyramid VAE and MAR.

All blocks are pre-norm. Shapes: B batch, T tokens, D width.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FourierEmbed(nn.Module):
    """γ(p) = [p, sin(π 2^k p), cos(π 2^k p)] for k = 0 … num_freqs−1 (per coordinate).

    blur σ > 0: the expectation of γ(p + ε) for ε ~ N(0, σ² I) instead (Mip-NeRF's integrated
    positional encoding): each sin and cos of frequency ω scaled by exp(−ω²σ²/2), so octaves finer
    than about σ fade and the coarse ones stay."""

    def __init__(self, num_freqs: int, blur: float = 0.0):
        super().__init__()
        freqs = math.pi * 2.0 ** torch.arange(num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        # one gain per (coordinate, octave), as `angles` are laid out; exactly 1 without blur
        self.register_buffer("gain", torch.exp(-(freqs * blur) ** 2 / 2).repeat(3), persistent=False)
        self.out_dim = 3 * (2 * num_freqs + 1)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        angles = (xyz[..., None] * self.freqs).flatten(-2)  # (..., 3F): coordinate-major
        return torch.cat([xyz, angles.sin() * self.gain, angles.cos() * self.gain], dim=-1)  # (..., 3(2F+1))


class Attention(nn.Module):
    """Multi-head attention; cross-attention when `context` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, D/H)
        k, v = self.to_kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SelfBlock(nn.Module):
    """x ← x + Attn(LN x); x ← x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """q ← q + Attn(LN q, LN ctx), then an optional feed-forward layer.

    The VAE decoder's last cross-attention has no feed-forward layer: DESIGN §9 measured
    one there to make decoding 2.3× slower for no gain.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, mlp: bool = True):
        super().__init__()
        self.norm_q, self.norm_ctx = nn.LayerNorm(dim), nn.LayerNorm(context_dim or dim)
        self.attn = Attention(dim, heads, context_dim)
        self.norm2 = nn.LayerNorm(dim) if mlp else None
        self.mlp = MLP(dim, 4 * dim) if mlp else None

    def forward(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_ctx(context))
        if self.mlp is not None:
            q = q + self.mlp(self.norm2(q))
        return q


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights, zero biases, unit LayerNorms (as in DiT/MAE)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
