"""Pilot V4 (checkpoints/README.md): a reference index of every view of every training shape.

    python scripts/pilot_index_views.py --work data/demo --out runs/v4   # runs/v4 holds vae + mar_lr + mar_hr
    python scripts/train_demo.py --work data/demo --out runs/v4 --only rerank --set reference_views=4

The shipped index keeps view 0 of each training shape (3,042 entries, 21.8 MB). This one keeps
all 4 views (12,168 entries), with its masks binary at the 64² the lookup compares them at
(a quarter of the bits of the shipped 128² masks). At 68.5 MB it does not fit the 60 MiB
checkpoint budget: it measures what more views would give, not a file to ship. The shipped
index since stop 26 is this one stored compactly (`train_demo.py --only reference`, whose Recipe
defaults to `reference_views=4 reference_store=surfaces`: 25.7 MB).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mar3d.cache import load_cache  # noqa: E402
from mar3d.retrieval import MASK_SIZE, REFERENCE_FILE, ReferenceIndex, silhouettes  # noqa: E402
from train_demo import Recipe, in_reference_index  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--views", type=int, default=4)
    a = p.parse_args(argv)
    data, meta = load_cache(Path(a.work) / "cache")
    r = Recipe(reference_views=a.views)
    keep = torch.tensor([in_reference_index(r, n) for n in meta["names"]])
    dark = (silhouettes(data["images"][keep]) > 0.5).view(-1, MASK_SIZE, MASK_SIZE)  # the lookup's own 64²
    ReferenceIndex(dark, data["lr"][keep].half(), data["hr"][keep].half()).save(Path(a.out) / REFERENCE_FILE)
    print(f"{int(keep.sum())} entries → {Path(a.out) / REFERENCE_FILE}")


if __name__ == "__main__":
    main()
