"""Benchmark: what the reference index pays for each of its index-only procedural shapes
(scripts/train_demo.py `index_shape`), with its views rendered shaded or flat.

    python bench/bench_index_views.py [--shapes 2] [--views 16] [--number 3100]

For `--shapes` shapes of every family (numbers from `--number`: index-only numbers, never trained
on), one thread: seconds per shape to make the mesh (`procedural_mesh`), its `--views` masks with
the views rendered shaded (`render`, what the cache's condition images are) and flat (`render_flat`,
pilot S14: the same coverage, one colour), each through the stage's own `index_views` (render, cut
out, pool into 64² masks), and its FPS surface points; the flat / shaded ratio of the views and of
the whole shape; and how far the flat masks are from the shaded ones (IoU per view). Interleaved,
so a busy machine slows both alike. Prints a markdown table and the machine.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from mar3d.retrieval import procedural_mesh, procedural_surface  # noqa: E402
from mar3d.shapes import FAMILIES  # noqa: E402
from train_demo import SURFACE_RECIPE, index_views  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=int, default=2, help="shapes per family")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--number", type=int, default=3100, help="the first shape number of each family")
    args = p.parse_args()
    torch.set_num_threads(1)
    seconds = dict.fromkeys(("mesh", "shaded", "flat", "surface"), 0.0)
    ious, count = [], 0

    def timed(key, fn):
        start = time.perf_counter()
        value = fn()
        seconds[key] += time.perf_counter() - start
        return value

    for family in FAMILIES:
        for number in range(args.number, args.number + args.shapes):
            name = f"{family}_{number:05d}"
            try:
                mesh = timed("mesh", lambda: procedural_mesh(name, SURFACE_RECIPE))
            except ValueError:  # the generator rejects it, as the index stage skips it
                continue
            a = timed("shaded", lambda: index_views(mesh, name, args.views, 128, 128, True)[0].flatten(1))
            b = timed("flat", lambda: index_views(mesh, name, args.views, 128, 128, False)[0].flatten(1))
            ious += ((a & b).sum(1) / (a | b).sum(1).clamp_min(1)).tolist()
            timed("surface", lambda: procedural_surface(name, 1024, SURFACE_RECIPE, mesh=mesh))
            count += 1
    per = {k: v / count for k, v in seconds.items()}
    common = per["mesh"] + per["surface"]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, CPUs {os.cpu_count()}, torch "
          f"{torch.__version__}, one thread, python {platform.python_version()}; {count} shapes of "
          f"{len(FAMILIES)} families, {args.views} views of 128² (2×2 rays a pixel) each\n")
    print("| per shape | seconds |\n|---|---|")
    for key in seconds:
        print(f"| {key} | {per[key]:.3f} |")
    print(f"| a shape, shaded views | {common + per['shaded']:.3f} |")
    print(f"| a shape, flat views | {common + per['flat']:.3f} |")
    print(f"\nflat / shaded: views {per['flat'] / per['shaded']:.2f}, whole shape "
          f"{(common + per['flat']) / (common + per['shaded']):.2f}; flat masks against shaded: IoU mean "
          f"{np.mean(ious):.4f}, worst {np.min(ious):.4f}, {np.mean(np.array(ious) == 1):.1%} of views identical")


if __name__ == "__main__":
    main()
