"""A contact sheet of a pilot's validation meshes: input render, generated meshes, ground truth.

    python scripts/pilot_sheet.py --work data/demo --pilot p1-aligned --out sheet.png [--count 8] [--kinds recon hr occ ...]

Reads the meshes scripts/pilot_eval.py wrote under <work>/pilots/<pilot>/ (<shape>.ply = the HR
mesh, <shape>.recon.ply = the reconstructor's), renders each grey from the input's elevation in
the view's frame, and writes one row per shape. CI never runs this.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_assets import composite, mesh_tile  # noqa: E402
from train_demo import ground_truth  # noqa: E402

from mar3d.evaluate import load_mesh  # noqa: E402
from mar3d.render import Camera  # noqa: E402


SUFFIX = {"hr": ".ply", "recon": ".recon.ply", "occ": ".occ.ply", "occ_refit": ".occ_refit.ply", "occ_true": ".occ_true.ply"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--pilot", required=True, help="folder name under <work>/pilots")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--kinds", nargs="+", default=["hr"], choices=sorted(SUFFIX))
    args = p.parse_args(argv)
    work = Path(args.work)
    rows = json.loads((work / "pilots" / f"{args.pilot}.json").read_text())[: args.count]
    tiles = []
    for row in rows:
        name = row["shape"]
        cam = Camera.from_dict(json.loads((work / "renders" / name / "cameras.json").read_text())[0])
        line = [composite(Image.open(work / "renders" / name / "0.png"))]
        for kind in args.kinds:
            path = work / "pilots" / args.pilot / f"{name}{SUFFIX[kind]}"
            line.append(mesh_tile(load_mesh(str(path)), cam) if path.exists() else Image.new("RGB", (128, 128), "white"))
        line.append(mesh_tile(ground_truth(work, work / "prepared" / f"{name}.npz")[1], cam))
        tiles.append(np.concatenate([np.asarray(t.convert("RGB").resize((128, 128))) for t in line], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(args.out)


if __name__ == "__main__":
    main()
