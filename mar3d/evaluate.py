"""Compare a predicted mesh with a reference mesh: ``python -m mar3d.evaluate PRED GT``.

Prints Chamfer distance, F-scores and normal consistency under the protocol of
:mod:`mar3d.metrics` (stated in ``--help``). Exit code 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trimesh

from mar3d import geometry, metrics

PROTOCOL = """protocol: each mesh normalised on its own (bounding-box centre to the origin, longest
side 1.9, as the training data; disable with --no-normalize); N points sampled uniformly by
area from each surface (seeded), with face normals; Chamfer = (mean NN L2 distance pred->gt +
mean NN L2 distance gt->pred) / 2 (halved, distances not squared); F-score@t = harmonic mean
of precision (pred points within t of gt) and recall (gt points within t of pred), t = 0.02
and 0.05; normal consistency = mean |cos| between each point's normal and its nearest
neighbour's, averaged over both directions."""


def load_mesh(path: str) -> trimesh.Trimesh:
    """Load one mesh with the project loader (+Y up as stored); raises OSError or ValueError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return geometry.load_mesh(path, z_up=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mar3d.evaluate",
        description="Chamfer distance, F-score and normal consistency between two meshes.",
        epilog=PROTOCOL, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred", help="predicted mesh (glb/obj/ply/stl/...)")
    parser.add_argument("gt", help="reference mesh")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--points", type=int, default=100_000, metavar="N",
                        help="surface samples per mesh (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="compare in the meshes' own coordinates")
    args = parser.parse_args(argv)
    if args.points < 1:
        parser.error("--points must be positive")

    try:
        pred, gt = load_mesh(args.pred), load_mesh(args.gt)
        result = metrics.compare_meshes(pred, gt, n_points=args.points,
                                        normalize=not args.no_normalize, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result = {"pred": args.pred, "gt": args.gt, "n_points": args.points,
              "normalized": not args.no_normalize, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pred: {args.pred}\ngt:   {args.gt}")
        print(f"({args.points} points per mesh, "
              f"{'normalised' if not args.no_normalize else 'not normalised'}, Chamfer halved)")
        print("| metric | value |\n|---|---|")
        for key, value in result.items():
            if isinstance(value, float):
                print(f"| {key} | {value:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
