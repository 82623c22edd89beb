"""Diagnostic: how much of a pilot's F-score is lost to the box (per-axis extents), not the shape in it?

    python scripts/box_oracle.py --work data/demo --pilot r3-recon-conv-stem-1500-steps-q256 [--kind recon]

For each mesh scripts/pilot_eval.py wrote under <work>/pilots/<pilot>/, scores F@0.05 as
pilot_eval does (both meshes normalised on their own) and again after an oracle fit of the box:
the mesh scaled per axis and moved so its bounding box is the ground truth's. If the second
score is much higher, the shapes are right but their proportions wrong. CI never runs this.
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_demo import ground_truth  # noqa: E402

from mar3d.geometry import normalize_mesh  # noqa: E402
from mar3d.metrics import compare_meshes  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--pilot", required=True, help="a folder under <work>/pilots")
    p.add_argument("--kind", choices=["recon", "hr"], default="recon", help="the reconstructor's or the HR meshes")
    p.add_argument("--points", type=int, default=30_000)
    args = p.parse_args(argv)
    work = Path(args.work)
    meshes = [f for f in sorted((work / "pilots" / args.pilot).glob("*.ply"))
              if f.name.endswith(".recon.ply") == (args.kind == "recon")]  # <shape>.recon.ply or <shape>.ply
    plain, boxed = [], []
    for ply in meshes:
        name = ply.name.split(".")[0]
        _, gt = ground_truth(work, work / "prepared" / f"{name}.npz")
        pred, gt = normalize_mesh(trimesh.load(ply, force="mesh"))[0], normalize_mesh(gt)[0]
        extent, gt_extent = pred.extents, gt.extents
        fitted = pred.copy()
        fitted.vertices = (pred.vertices - pred.bounds.mean(0)) * (gt_extent / np.maximum(extent, 1e-6)) + gt.bounds.mean(0)
        plain.append(compare_meshes(pred, gt, n_points=args.points)["fscore@0.05"])
        boxed.append(compare_meshes(fitted, gt, n_points=args.points, normalize=False)["fscore@0.05"])
        print(f"{name}: F {plain[-1]:.3f}, box fitted {boxed[-1]:.3f}, extent / truth {np.round(extent / gt_extent, 2)}",
              flush=True)
    for label, f in (("as scored", plain), ("box fitted", boxed)):
        print(f"{label}: median F@0.05 {statistics.median(f):.3f}, mean {statistics.fmean(f):.3f} ({len(f)} meshes)")


if __name__ == "__main__":
    main()
