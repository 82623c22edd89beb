"""Where a reconstructor's occupancy BCE sits: the VAE decoding the true tokens, the training set's
mean token set, and the reconstructor's prediction (model card, "What the latent-space pilots say").
Also the HR token MSE (normalised units) of the mean tokens and of the reconstructor, and the
share of the tokens' variance about their per-index mean that the reconstructor explains.

    python scripts/bce_baselines.py --work data/demo --ckpt runs/r3 [--entries 256]

--work is a training work directory (its cache and prepared shapes), --ckpt holds the VAE that made
the cache and the reconstructor (`recon`). The BCE is ReconTask's held-out one (256 queries per entry).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.image_encoder import ImageEncoderConfig  # noqa: E402
from mar3d.single_view import ReconConfig  # noqa: E402
from mar3d.train import ReconTask, TrainConfig  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--entries", type=int, default=256)
    p.add_argument("--gains", type=float, nargs="*", default=[],
                   help="also score mean + g · (prediction − mean) for each g: is the prediction too timid?")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(val_percent=8.0, vae_dir=args.ckpt, queries=256)  # the test and validation splits
    task = ReconTask(ReconConfig(encoder=ImageEncoderConfig(kind="readout")), cfg, args.work)
    recon = load_model(args.ckpt, "recon")
    mean = task.hr[task.train_idx].float().mean(0, keepdim=True)  # per index, over training entries
    sums, mse, n = {"true tokens": 0.0, "mean tokens": 0.0, "reconstructor": 0.0}, {"mean tokens": 0.0, "reconstructor": 0.0}, 0
    sums.update({f"reconstructor, gain {g}": 0.0 for g in args.gains})
    with torch.no_grad():
        for s in range(0, min(args.entries, len(task.val_idx)), 32):
            idx = task.val_idx[s: s + 32]
            pixels = task.images[idx].permute(0, 3, 1, 2).float().div(255)
            predicted = recon(pixels)[1]
            scaled = [(f"reconstructor, gain {g}", mean + g * (predicted - mean)) for g in args.gains]
            for key, tokens in [("true tokens", task.hr[idx].float()), ("mean tokens", mean.expand(len(idx), -1, -1)),
                                ("reconstructor", predicted)] + scaled:
                sums[key] += task.decode_bce(task.vae, tokens, idx, torch.Generator().manual_seed(s), "cpu").item() * len(idx)
                if key in mse:
                    mse[key] += (tokens - task.hr[idx].float()).pow(2).mean().item() * len(idx)
            n += len(idx)
    explained = 1 - mse["reconstructor"] / mse["mean tokens"]
    print("BCE", {k: round(v / n, 4) for k, v in sums.items()}, "| HR token MSE", {k: round(v / n, 4) for k, v in mse.items()},
          f"| variance explained {explained:.3f} | {n} held-out entries")


if __name__ == "__main__":
    main()
