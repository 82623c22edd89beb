"""Compare predicted meshes with reference meshes: ``python -m mar3d.evaluate PRED GT``.

PRED and GT are two mesh files, or two directories whose meshes pair up by file stem
(``PRED/chair_0001.ply`` ↔ ``GT/chair_0001.glb``); a reference with no prediction counts as a
failure (F-score 0, Chamfer not counted) and the medians are taken over every reference.
Prints Chamfer distance, F-scores and normal consistency under the protocol of
:mod:`mar3d.metrics` (stated in ``--help``). Exit code 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import statistics

import trimesh

from mar3d import geometry, metrics

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")

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


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, n_points: int = 100_000, seed: int = 0,
                  normalize: bool = True) -> dict:
    """Compare every reference mesh in gt_dir with the prediction of the same stem in pred_dir.

    Returns {"rows": [{"shape", metrics… or "error"}], "summary": medians over all references
    (a missing or unreadable prediction scores F = 0), "failed": count}."""
    gts = sorted(p for p in Path(gt_dir).iterdir() if p.suffix.lower() in MESH_SUFFIXES)
    if not gts:
        raise ValueError(f"{gt_dir}: no reference meshes ({', '.join(MESH_SUFFIXES)})")
    preds = {p.stem: p for p in Path(pred_dir).iterdir() if p.suffix.lower() in MESH_SUFFIXES}
    rows = []
    for gt in gts:
        row = {"shape": gt.stem}
        try:
            if gt.stem not in preds:
                raise ValueError("no prediction")
            row |= metrics.compare_meshes(load_mesh(str(preds[gt.stem])), load_mesh(str(gt)), n_points=n_points,
                                          normalize=normalize, seed=seed)
        except (ValueError, OSError) as e:
            row["error"] = str(e)
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    summary = {f"median_{k}": statistics.median(r.get(k, 0.0) for r in rows)
               for k in ("fscore@0.05", "fscore@0.02", "normal_consistency")}
    summary["median_chamfer"] = statistics.median(r["chamfer"] for r in ok) if ok else float("nan")
    for k in ("slab_share", "gt_slab_share"):  # means over the meshes there are
        summary[f"mean_{k}"] = statistics.fmean(r[k] for r in ok) if ok else float("nan")
    return {"rows": rows, "summary": summary, "failed": len(rows) - len(ok), "count": len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mar3d.evaluate",
        description="Chamfer distance, F-score and normal consistency between two meshes.",
        epilog=PROTOCOL, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred", help="predicted mesh (glb/obj/ply/stl/...), or a directory of them")
    parser.add_argument("gt", help="reference mesh, or a directory of them (paired by file stem)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--points", type=int, default=100_000, metavar="N",
                        help="surface samples per mesh (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="compare in the meshes' own coordinates")
    args = parser.parse_args(argv)
    if args.points < 1:
        parser.error("--points must be positive")

    if Path(args.pred).is_dir() and Path(args.gt).is_dir():
        try:
            result = evaluate_dirs(args.pred, args.gt, args.points, args.seed, not args.no_normalize)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['count']} references, {result['failed']} without a usable prediction "
                  f"({args.points} points per mesh, Chamfer halved)")
            print("| metric | median |\n|---|---|")
            for key, value in result["summary"].items():
                print(f"| {key.removeprefix('median_')} | {value:.4f} |")
        return 0

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
