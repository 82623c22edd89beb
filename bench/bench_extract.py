"""Benchmark: dense vs hierarchical grid decoding (mar3d.extract).

    python bench/bench_extract.py [--cost-mlp] [--resolutions 128 256]

For each resolution: decoder queries, seconds (decode + marching cubes), the dense/hierarchical
ratios, and the Chamfer distance between the two meshes (mar3d.metrics protocol, not
normalised). Prints a markdown table and machine info.

The decode function comes from ``make_decode_fn(args)``:
- ``--checkpoint DIR [--mesh PATH]``: the real Pyramid VAE decoder on the HR tokens of a mesh
  (default: the shared spot.obj) — the number that matters;
- otherwise an analytic union of shapes (logit = -k * signed distance, positive inside);
  ``--cost-mlp`` also runs every query through a fixed Fourier-feature MLP (~2 us/query on
  2 CPU threads, like the tiny VAE decoder in DESIGN §9) and adds 0 * its output, so timings
  reflect a network.
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
from mar3d.sdf import sd_box, sd_capsule, sd_torus  # noqa: E402


def analytic_logits(p: torch.Tensor, slope: float = 100.0) -> torch.Tensor:
    """A chair-like union: seat, back, four thin legs, a torus ornament. Positive inside."""
    parts = [sd_box(p, [0.0, -0.05, 0.0], [0.55, 0.05, 0.5]),
             sd_box(p, [0.0, 0.45, -0.45], [0.55, 0.45, 0.04]),
             sd_torus(p, [0.0, 0.55, -0.45], 0.2, 0.04)]
    for x in (-0.48, 0.48):
        for z in (-0.42, 0.42):
            parts.append(sd_capsule(p, [x, -0.9, z], [x, -0.1, z], 0.035))
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
    """Return decode_fn(points (M,3)) -> logits (M,)."""
    if args.checkpoint:
        from mar3d.checkpoint import load_model
        from mar3d.geometry import load_mesh, normalize_mesh
        from mar3d.reconstruct import encode_mesh

        vae = load_model(args.checkpoint, "vae")
        mesh = normalize_mesh(load_mesh(args.mesh))[0]
        return vae.occupancy_fn(encode_mesh(vae, mesh, "hr"))
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
    ap.add_argument("--checkpoint", help="directory with vae.json + vae.safetensors: bench the real decoder")
    ap.add_argument("--mesh", default=str(Path(__file__).resolve().parents[2] / "shared/data/meshes/spot.obj"),
                    help="mesh whose HR tokens the VAE decodes (with --checkpoint)")
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

    source = (f"Pyramid VAE {args.checkpoint} on the HR tokens of {Path(args.mesh).name}" if args.checkpoint else
              f"analytic union of shapes{' + cost MLP (width 192, 3 layers)' if args.cost_mlp else ''}")
    print(f"decoder: {source}; "
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
