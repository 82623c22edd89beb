"""Choose sampling defaults on TRAINING-split shapes (never the held-out ones), and see which stage limits quality.

    python scripts/sweep_sampling.py --work data/demo --ckpt checkpoints --shapes 24 > sweep.jsonl

For a few training entries (view 0) of the latent cache, each configuration samples tokens from
the cached condition image and scores the decoded mesh against the mesh of the cached HR tokens
(the best this VAE can do), F-score@0.05 at 64³. Besides the full cascade two diagnostic rows:
    gt_lr → HR   MAR-HR conditioned on the cached (true) LR tokens: the HR stage alone;
    LR only      the sampled LR tokens decoded: the LR stage alone.
One json line per configuration: its settings, median F and mean seconds. CI never runs this.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mar3d.cache import load_cache  # noqa: E402
from mar3d.data import is_held_out  # noqa: E402
from mar3d.extract import ExtractionError  # noqa: E402
from mar3d.metrics import compare_meshes  # noqa: E402
from mar3d.pipeline import MAR3DPipeline, Settings  # noqa: E402

SAMPLING = ("lr_steps", "hr_steps", "cfg_lr", "cfg_hr", "temperature", "diffusion_steps", "cond_aug_t")

# (label, overrides of the pipeline's default Settings, mode) — mode: full | gt_lr | lr_only
CONFIGS = [
    ("defaults", {}, "full"),
    ("gt_lr → HR", {}, "gt_lr"),
    ("LR only", {}, "lr_only"),
    ("temperature 0.5", dict(temperature=0.5), "full"),
    ("temperature 0.1", dict(temperature=0.1), "full"),
    ("cfg 1", dict(cfg_lr=1.0, cfg_hr=1.0), "full"),
    ("cfg 2", dict(cfg_lr=2.0, cfg_hr=2.0), "full"),
    ("cfg 5", dict(cfg_lr=5.0, cfg_hr=5.0), "full"),
    ("steps 32/128", dict(lr_steps=32, hr_steps=128), "full"),
    ("cond_aug 0", dict(cond_aug_t=0.0), "full"),
    ("gt_lr → HR, cond_aug 0", dict(cond_aug_t=0.0), "gt_lr"),  # how much of the true LR tokens MAR-HR uses
]


def pick_entries(names: list[str], val_percent: float, count: int, seed: int = 0) -> list[int]:
    """`count` training-split entries of view 0, a seeded draw."""
    train = [i for i, n in enumerate(names) if n.endswith("/0") and not is_held_out(n, val_percent)]
    return sorted(np.random.default_rng(seed).choice(train, size=min(count, len(train)), replace=False).tolist())


def mesh_of(pipe: MAR3DPipeline, latents: torch.Tensor, s: Settings):
    try:
        return pipe.extract(latents, s)
    except ExtractionError:
        return None


@torch.no_grad()
def run(pipe: MAR3DPipeline, image: torch.Tensor, lr_true: torch.Tensor, s: Settings, mode: str, seed: int):
    """VAE latents of one configuration: the cascade, MAR-HR on the true LR tokens, or MAR-LR alone."""
    g = torch.Generator().manual_seed(seed)
    lr = lr_true if mode == "gt_lr" else pipe.sample_lr(image, s, g)
    return lr if mode == "lr_only" else pipe.sample_hr(image, lr, s, g)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="train_demo.py's --work (holds cache/)")
    p.add_argument("--ckpt", required=True, help="a checkpoint directory (vae, mar_lr, mar_hr)")
    p.add_argument("--shapes", type=int, default=24)
    p.add_argument("--val-percent", type=float, default=4.0)
    p.add_argument("--only", nargs="*", help="labels of CONFIGS to run (default: all)")
    args = p.parse_args(argv)

    pipe = MAR3DPipeline.from_pretrained(args.ckpt)
    tensors, meta = load_cache(Path(args.work) / "cache")
    entries = pick_entries(meta["names"], args.val_percent, args.shapes)
    base = Settings(resolution=64)
    refs = {i: mesh_of(pipe, tensors["hr"][i: i + 1].float(), base) for i in entries}
    for label, overrides, mode in CONFIGS:
        if args.only and label not in args.only:
            continue
        s = dataclasses.replace(base, **overrides)
        scores, seconds = [], []
        for seed, i in enumerate(entries):
            image = tensors["images"][i: i + 1].permute(0, 3, 1, 2).float().div(255)
            t = time.perf_counter()
            mesh = mesh_of(pipe, run(pipe, image, tensors["lr"][i: i + 1].float(), s, mode, seed), s)
            seconds.append(time.perf_counter() - t)
            ok = mesh is not None and refs[i] is not None
            scores.append(compare_meshes(mesh, refs[i], n_points=20_000)["fscore@0.05"] if ok else 0.0)
        print(json.dumps({"label": label, "mode": mode, **{k: getattr(s, k) for k in SAMPLING}, "shapes": len(entries),
                          "median_fscore@0.05": round(float(np.median(scores)), 4),
                          "mean_fscore@0.05": round(float(np.mean(scores)), 4),
                          "mean_seconds": round(float(np.mean(seconds)), 2)}), flush=True)


if __name__ == "__main__":
    main()
