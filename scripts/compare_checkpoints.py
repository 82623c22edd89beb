"""Two or more checkpoints side by side on the same pictures: a contact sheet and the slab share.

    python scripts/compare_checkpoints.py --ckpt checkpoints runs/pilot --images assets/*.png --out sheet.png

For each image (seed 0, the pipeline's defaults, no colour) it writes one row: the input, then
each checkpoint's HR mesh rendered grey from the front, and prints each mesh's slab share
(mar3d.metrics.slab_share: the share of surface area with |n_y| > 0.95). CI never runs this.
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

from mar3d.metrics import slab_share  # noqa: E402
from mar3d.pipeline import MAR3DPipeline, Settings  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoint directories, one column each")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipes = [MAR3DPipeline.from_pretrained(c) for c in args.ckpt]
    rows = []
    for image in map(Path, args.images):
        line = [composite(Image.open(image))]
        shares = {}
        for ckpt, pipe in zip(args.ckpt, pipes):
            mesh = pipe(image, Settings(seed=args.seed, lr_mesh=False, colour=False)).mesh
            shares[ckpt] = round(float(slab_share(mesh)), 3)
            line.append(mesh_tile(mesh, None))
        print(json.dumps({"image": image.name, "slab_share": shares}), flush=True)
        rows.append(np.concatenate([np.asarray(t.convert("RGB").resize((128, 128))) for t in line], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)


if __name__ == "__main__":
    main()
