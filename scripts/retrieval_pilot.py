"""Score reference indexes on the validation split, the retrieval alone (no MAR): pilot V16.

    python scripts/retrieval_pilot.py --work data/demo proxy checkpoints runs/v16
    python scripts/retrieval_pilot.py --work data/demo fscore --shard 0/2 v4c=runs/v4c:rerank v16=checkpoints

`proxy`: for every validation query of views 0-3 (the cache's images), the 24³ occupancy IoU of the
looked-up entry's LR tokens with the query's own LR tokens, top-1 and (for an index that can)
re-ranked; fast (about a minute an index). `fscore`: for views 0-1 of every validation shape, the
picked reference's HR tokens decoded at 64³ and scored against the shape turned into that view's
frame (F@0.05, mar3d.evaluate's protocol); one json line per query, every index side by side
(LABEL=CKPT, with ":rerank" to re-rank); summarise the shards' lines with `summary FILE...`. The
VAE and image encoder are the shipped checkpoint's. CI never runs this.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pilot_eval import condition_pixels, score, validation_shapes  # noqa: E402
from train_demo import Recipe, eval_settings  # noqa: E402

from mar3d.cache import load_cache  # noqa: E402
from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.data import is_validation  # noqa: E402
from mar3d.extract import ExtractionError, extract_mesh  # noqa: E402
from mar3d.geometry import load_mesh  # noqa: E402
from mar3d.render import Camera, rotate_mesh_to_view  # noqa: E402
from mar3d.retrieval import REFERENCE_FILE, ReferenceIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def proxy(work: Path, checkpoints: list[str]) -> None:
    r = Recipe()
    data, meta = load_cache(work / "cache")
    rows = [i for i, n in enumerate(meta["names"]) if is_validation(n.split("/")[0], r.val_percent, r.validation_percent)]
    vae = load_model(ROOT / "checkpoints", "vae").eval()
    encoder = load_model(ROOT / "checkpoints", "mar_lr").image_encoder.eval()
    side = torch.linspace(-0.95, 0.95, 24)
    grid = torch.stack(torch.meshgrid(side, side, side, indexing="ij"), -1).reshape(-1, 3)

    def occupied(latents):
        return vae.occupancy_fn(latents[None].float())(grid) > 0

    for ckpt in checkpoints:
        index = ReferenceIndex.load(Path(ckpt) / REFERENCE_FILE, vae=vae)
        ious = {"top1": [], "reranked": []}
        with torch.no_grad():
            for s in range(0, len(rows), 32):
                batch = rows[s: s + 32]
                pixels = data["images"][batch].permute(0, 3, 1, 2).float().div(255)
                for key, features in (("top1", None), ("reranked", encoder(pixels))):
                    lr = index.lookup(pixels, features)[0]
                    for j, i in enumerate(batch):
                        a, t = occupied(lr[j]), occupied(data["lr"][i])
                        ious[key].append(float((a & t).sum() / max(int((a | t).sum()), 1)))
        print(json.dumps({"index": ckpt, "queries": len(rows), "reranks": index.reranks,
                          **{k: round(float(np.mean(v)), 4) for k, v in ious.items()}}))


def fscore(work: Path, configs: list[str], shard: str) -> None:
    k, n = (int(x) for x in shard.split("/"))
    vae = load_model(ROOT / "checkpoints", "vae").eval()
    encoder = load_model(ROOT / "checkpoints", "mar_lr").image_encoder.eval()
    indexes = {}
    for config in configs:
        label, ckpt = config.split("=", 1)
        indexes[label] = (ReferenceIndex.load(Path(ckpt.removesuffix(":rerank")) / REFERENCE_FILE, vae=vae),
                          ckpt.endswith(":rerank"))
    jobs = [(npz, v) for npz in validation_shapes(work, Recipe(), 10**6) for v in (0, 1)][k::n]
    for npz, view in jobs:
        data = np.load(npz)
        mesh = load_mesh(work / "shapes" / str(data["source"]))
        mesh.vertices = (mesh.vertices - data["center"]) * data["scale"]
        camera = Camera.from_dict(json.loads((work / "renders" / npz.stem / "cameras.json").read_text())[view])
        truth = rotate_mesh_to_view(mesh, camera)
        pixels = condition_pixels(work / "renders" / npz.stem / f"{view}.png", eval_settings(), 128)
        row = {"shape": npz.stem, "view": view}
        with torch.no_grad():
            features = encoder(pixels)
            for label, (index, rerank) in indexes.items():
                hr = index.lookup(pixels, features if rerank else None)[1]
                try:
                    row[label] = score(extract_mesh(vae.occupancy_fn(hr), resolution=64)[0], truth)["fscore@0.05"]
                except ExtractionError:
                    row[label] = 0.0
        print(json.dumps(row), flush=True)


def summary(files: list[str]) -> None:
    rows = [json.loads(line) for f in files for line in open(f) if line.startswith("{")]
    labels = [k for k in rows[0] if k not in ("shape", "view")]
    for label in labels:
        f = [r[label] for r in rows]
        print(f"{label}: {len(f)} queries, median {statistics.median(f):.3f}, mean {statistics.fmean(f):.3f}, "
              f"≥ 0.5 {np.mean([x >= 0.5 for x in f]):.0%}")
    for a in labels:
        for b in labels:
            if a < b:
                d = [r[b] - r[a] for r in rows]
                print(f"{b} against {a}: {sum(x > 0.01 for x in d)} better, {sum(x < -0.01 for x in d)} worse")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="data/demo")
    p.add_argument("--shard", default="0/1", metavar="K/N")
    p.add_argument("mode", choices=["proxy", "fscore", "summary"])
    p.add_argument("items", nargs="+", help="checkpoint dirs (proxy), LABEL=CKPT[:rerank] (fscore), files (summary)")
    a = p.parse_args(argv)
    if a.mode == "proxy":
        proxy(Path(a.work), a.items)
    elif a.mode == "fscore":
        fscore(Path(a.work), a.items, a.shard)
    else:
        summary(a.items)


if __name__ == "__main__":
    main()
