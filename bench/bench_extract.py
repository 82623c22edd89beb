"""Benchmark: dense vs hierarchical grid decoding (mar3d.extract).

    python bench/bench_extract.py [--cost-mlp] [--resolutions 128 256]

For each resolution: decoder queries, seconds (decode + marching cubes), the dense/hierarchical
ratios, and the Chamfer distance between the two meshes (mar3d.metrics protocol, not
normalised). Prints a markdown table and machine info.

The decode function comes from ``make_decode_fn(args)``: for now an analytic union of shapes
(logit = -k * signed distance, positive inside); ``--cost-mlp`` also runs every query
through a fixed Fourier-feature MLP (~2 us/query on 2 CPU threads, like the tiny VAE decoder
in DESIGN §9) and adds 0 * its output, so timings reflect a network. A real VAE decoder can be
plugged in by returning it from ``make_decode_fn``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mar3d.extract import (DEFAULT_BAND, DEFAULT_COARSE, dense_grid,  # noqa: E402
                           grid_to_mesh, hierarchical_grid)
from mar3d.metrics import compare_meshes  # noqa: E402


def _sd_box(p, c, h):
    q = (p - torch.tensor(c)).abs() - torch.tensor(h)
    return q.clamp(min=0).norm(dim=1) + q.max(dim=1).values.clamp(max=0)


def _sd_torus(p, c, big_r, r):
    q = p - torch.tensor(c)
    ring = torch.stack([q[:, 0], q[:, 2]], 1).norm(dim=1) - big_r
    return torch.stack([ring, q[:, 1]], 1).norm(dim=1) - r


def _sd_capsule(p, a, b, r):
    a, b = torch.tensor(a), torch.tensor(b)
    h = (((p - a) @ (b - a)) / ((b - a) @ (b - a))).clamp(0, 1)
    return (p - a - h[:, None] * (b - a)).norm(dim=1) - r


def analytic_logits(p: torch.Tensor, slope: float = 100.0) -> torch.Tensor:
    """A chair-like union: seat, back, four thin legs, a torus ornament. Positive inside."""
    parts = [_sd_box(p, [0.0, -0.05, 0.0], [0.55, 0.05, 0.5]),
             _sd_box(p, [0.0, 0.45, -0.45], [0.55, 0.45, 0.04]),
             _sd_torus(p, [0.0, 0.55, -0.45], 0.2, 0.04)]
    for x in (-0.48, 0.48):
        for z in (-0.42, 0.42):
            parts.append(_sd_capsule(p, [x, -0.9, z], [x, -0.1, z], 0.035))
    return -slope * torch.stack(parts).min(0).values


class CostMLP(torch.nn.Module):
    """Fixed random Fourier-feature MLP used only to make queries cost like a network."""

    def __init__(self, width: int = 192, octaves: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(octaves))
        dims = [3 + 6 * octaves, width, width, width, 1]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in zip(dims, dims[1:]))
        for layer in self.layers:
            torch.nn.init.normal_(layer.weight, std=0.05, generator=g)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        x = (p[:, :, None] * self.freqs).flatten(1)
        x = torch.cat([p, x.sin(), x.cos()], 1)
        for layer in self.layers[:-1]:
            x = torch.nn.functional.gelu(layer(x))
        return self.layers[-1](x)[:, 0]


def make_decode_fn(args):
    """Return decode_fn(points (M,3)) -> logits (M,). Plug a real VAE decoder in here."""
    if not args.cost_mlp:
        return analytic_logits
    mlp = CostMLP().eval()

    def decode(p: torch.Tensor) -> torch.Tensor:
        return analytic_logits(p) + 0.0 * mlp(p)

    return decode


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--coarse", type=int, default=DEFAULT_COARSE)
    ap.add_argument("--band", type=float, default=DEFAULT_BAND)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--cost-mlp", action="store_true", help="add a network-like per-query cost")
    args = ap.parse_args()
    decode_fn = make_decode_fn(args)
    with torch.no_grad():  # warm-up: first calls allocate and spin up threads
        decode_fn(torch.rand(args.chunk, 3) * 2 - 1)

    rows = []
    for r in args.resolutions:
        (g_d, q_d), t_d = _timed(dense_grid, decode_fn, r, chunk=args.chunk)
        m_d, mc_d = _timed(grid_to_mesh, g_d)
        (g_h, q_h), t_h = _timed(hierarchical_grid, decode_fn, r, args.coarse,
                                 chunk=args.chunk, band=args.band)
        m_h, mc_h = _timed(grid_to_mesh, g_h)
        cd = compare_meshes(m_h, m_d, normalize=False)["chamfer"]
        rows.append((r, q_d, q_h, t_d + mc_d, t_h + mc_h, cd, len(m_d.faces), len(m_h.faces),
                     int(((g_d > 0) != (g_h > 0)).sum())))

    print(f"decoder: analytic union of shapes{' + cost MLP (width 192, 3 layers)' if args.cost_mlp else ''}; "
          f"hierarchical: coarse {args.coarse}, band {args.band}; chunk {args.chunk}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, CPUs {os.cpu_count()}, "
          f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    print("\n| grid | dense queries | hier. queries | query ratio | dense s | hier. s | time ratio "
          "| Chamfer (dense vs hier.) | faces dense / hier. | sign mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, q_d, q_h, s_d, s_h, cd, f_d, f_h, mism in rows:
        print(f"| {r + 1}^3 | {q_d:,} | {q_h:,} | {q_d / q_h:.1f}x | {s_d:.2f} | {s_h:.2f} | "
              f"{s_d / s_h:.1f}x | {cd:.2e} | {f_d:,} / {f_h:,} | {mism} |")
    print("\nseconds = grid decoding + marching cubes; Chamfer: mar3d.metrics, 100k points, "
          "not normalised, halved.")


if __name__ == "__main__":
    main()
