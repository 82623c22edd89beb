"""Analytic signed distances (negative inside) for tests and benchmarks of mesh extraction.

`occupancy_logits(sd, slope)` turns one into a decode function's output: positive inside.
"""

import torch


def sd_sphere(p: torch.Tensor, c, r: float) -> torch.Tensor:
    return (p - torch.tensor(c)).norm(dim=1) - r


def sd_box(p: torch.Tensor, c, h) -> torch.Tensor:
    """Axis-aligned box with centre c and half-extents h."""
    q = (p - torch.tensor(c)).abs() - torch.tensor(h)
    return q.clamp(min=0).norm(dim=1) + q.max(dim=1).values.clamp(max=0)


def sd_torus(p: torch.Tensor, c, big_r: float, r: float) -> torch.Tensor:
    """Torus around the Y axis."""
    q = p - torch.tensor(c)
    ring = torch.stack([q[:, 0], q[:, 2]], 1).norm(dim=1) - big_r
    return torch.stack([ring, q[:, 1]], 1).norm(dim=1) - r


def sd_capsule(p: torch.Tensor, a, b, r: float) -> torch.Tensor:
    a, b = torch.tensor(a), torch.tensor(b)
    h = (((p - a) @ (b - a)) / ((b - a) @ (b - a))).clamp(0, 1)
    return (p - a - h[:, None] * (b - a)).norm(dim=1) - r


def union(*distances: torch.Tensor) -> torch.Tensor:
    return torch.stack(distances).min(0).values
