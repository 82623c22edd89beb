"""Diagnostic: can the tiny MAR-HR memorise a few training entries, and what F-score follows?

    python scripts/overfit_hr.py --work data/demo --ckpt checkpoints --out runs/overfit_hr

It takes the first `--entries` of scripts/sweep_sampling.py's training entries (view 0) from
<work>/cache and trains a fresh MAR-HR (the `tiny` preset, recipe learning rate) on them alone. It
then scores MAR-HR on their true LR tokens with the sweep's protocol (F@0.05 at 64³ against the
VAE's reconstruction), with and without condition augmentation. The shipped VAE and MAR-LR come
from --ckpt. If the model memorises, the loss falls and the meshes approach the VAE's. This says
how low the loss must go for good meshes, which the shipped model's loss does not tell.
CI never runs this.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mar3d.cache import CACHE_FILE, load_cache  # noqa: E402
from mar3d.mar import PRESETS  # noqa: E402
from mar3d.train import TrainConfig, train  # noqa: E402
from sweep_sampling import main as sweep, pick_entries  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="train_demo.py's --work (holds cache/)")
    p.add_argument("--ckpt", required=True, help="the VAE and MAR-LR to use (a checkpoint directory)")
    p.add_argument("--out", required=True, help="gets work/cache (the subset) and ckpt/ (the memorising MAR-HR)")
    p.add_argument("--entries", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--val-percent", type=float, default=4.0)
    args = p.parse_args(argv)
    out = Path(args.out)

    tensors, meta = load_cache(Path(args.work) / "cache")
    idx = pick_entries(meta["names"], args.val_percent, 24)[: args.entries]  # the sweep's first entries
    raw = {k: str(v) for k, v in meta.items()} | {"names": json.dumps([meta["names"][i] for i in idx])}
    (out / "work" / "cache").mkdir(parents=True, exist_ok=True)
    save_file({k: tensors[k][idx].contiguous() for k in ("images", "lr", "hr")},
              str(out / "work" / "cache" / CACHE_FILE), metadata=raw)

    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "mar_lr"):
        for ext in ("json", "safetensors"):
            shutil.copy(Path(args.ckpt) / f"{name}.{ext}", ckpt)
    cfg = TrainConfig(steps=args.steps, batch_size=args.entries, lr=5e-4, min_lr=5e-5, val_percent=0.0,
                      eval_every=args.steps, save_every=250, log_every=100)
    print(json.dumps(train("mar_hr", PRESETS["tiny"], cfg, out / "work" / "cache", ckpt)), file=sys.stderr)
    sweep(["--work", str(out / "work"), "--ckpt", str(ckpt), "--shapes", str(args.entries),
           "--val-percent", str(args.val_percent), "--only", "gt_lr → HR", "gt_lr → HR, cond_aug 0"])


if __name__ == "__main__":
    main()
