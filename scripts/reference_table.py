"""The top-k reference table (model card, pilot RR): for each validation (or test) shape, the k
training entries of the reference index with the highest 64² silhouette IoU, each entry's HR tokens
decoded and scored against the ground truth (F@0.05 at the pipeline's resolution), beside cues a
re-ranker could use.

    python scripts/reference_table.py --work data/demo --ckpt checkpoints [--split validation]
        [--shapes 48] [--k 6] [--shard 0/2]

Writes <work>/reference_table_<split>_<shard k>.json: one row per shape, its candidates best first
by IoU, each with its cues and "f"; "ens3" / "ens5" score the mean occupancy logits of the top 3 / 5.
Cues: iou64 (the pipeline's rule), iou32 / iou16 / iou8 (coarser silhouettes), feat_mean / feat_tok
(cosine of MAR-HR's frozen image-encoder features, pooled or token by token), grey32 / rgb32
(minus the mean absolute difference of the 32² grey / RGB images). CI never runs this.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pilot_eval import REFERENCE_IMAGE_SIZE, condition_pixels, score, validation_shapes  # noqa: E402
from train_demo import Recipe, eval_settings, ground_truth, left_out  # noqa: E402

from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.data import is_held_out  # noqa: E402
from mar3d.extract import ExtractionError, extract_mesh  # noqa: E402
from mar3d.retrieval import REFERENCE_FILE, ReferenceIndex, silhouette_iou, silhouettes  # noqa: E402


def cues(encoder, query: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Similarities of two condition images (1, 3, H, W) in [0, 1]; higher is closer."""
    with torch.no_grad():
        q, c = encoder(query).float(), encoder(candidate).float()
    def distance(a, b):  # mean absolute difference at 32²
        return float((F.adaptive_avg_pool2d(a, 32) - F.adaptive_avg_pool2d(b, 32)).abs().mean())

    out = {f"iou{s}": float(silhouette_iou(silhouettes(query, s), silhouettes(candidate, s))[0, 0])
           for s in (32, 16, 8)}
    out["feat_mean"] = float(F.cosine_similarity(q.mean(1), c.mean(1))[0])
    out["feat_tok"] = float(F.cosine_similarity(q.flatten(1), c.flatten(1))[0])
    out["grey32"] = -distance(query.mean(1), candidate.mean(1))
    out["rgb32"] = -distance(query, candidate)
    return out


def decoded_f(vae, latents: list[torch.Tensor], gt, resolution: int) -> float:
    """F@0.05 of the mesh of the mean occupancy logits of these latents (1, L, C) each (0 if empty)."""
    fns = [vae.occupancy_fn(x.float()) for x in latents]
    try:
        mesh, _ = extract_mesh(lambda p: sum(fn(p) for fn in fns) / len(fns), resolution=resolution)
    except ExtractionError:
        return 0.0
    return score(mesh, gt)["fscore@0.05"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--ckpt", required=True, help="directory with vae, mar_hr and reference.safetensors")
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    p.add_argument("--shapes", type=int, default=48)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--shard", default="0/1", metavar="K/N")
    args = p.parse_args(argv)
    work, ckpt, r, settings = Path(args.work), Path(args.ckpt), Recipe(), eval_settings()
    shard, shards = (int(x) for x in args.shard.split("/"))
    index = ReferenceIndex.load(ckpt / REFERENCE_FILE, vae=load_model(ckpt, "vae"))
    # the index holds view 0 of every training shape, in the cache's (name-sorted) order
    names = [f.stem for f in sorted((work / "prepared").glob("*.npz")) if not is_held_out(f.stem, left_out(r))]
    if len(names) != len(index):
        raise SystemExit(f"{len(names)} training shapes in {work} but {len(index)} index entries")
    vae, encoder = load_model(ckpt, "vae"), load_model(ckpt, "mar_hr").image_encoder.eval()

    def pixels(name: str) -> torch.Tensor:
        return condition_pixels(work / "renders" / name / "0.png", settings, REFERENCE_IMAGE_SIZE)

    rows, t0 = [], time.time()
    for npz in validation_shapes(work, r, args.shapes, "spread", args.split)[shard::shards]:
        _, gt = ground_truth(work, npz)
        query = pixels(npz.stem)
        iou = index.exact_iou(silhouettes(query))[0]
        top = iou.topk(args.k).indices.tolist()
        row = {"shape": npz.stem, "cands": [
            {"entry": j, "name": names[j], "iou64": float(iou[j]), **cues(encoder, query, pixels(names[j])),
             "f": decoded_f(vae, [index.hr[j: j + 1]], gt, settings.resolution)} for j in top]}
        for m in (3, 5):
            row[f"ens{m}"] = decoded_f(vae, [index.hr[j: j + 1] for j in top[:m]], gt, settings.resolution)
        rows.append(row)
        print(npz.stem, [round(c["f"], 2) for c in row["cands"]], f"{time.time() - t0:.0f} s", flush=True)
    (work / f"reference_table_{args.split}_{shard}.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
