"""Benchmark: MAR sampling speed, batched vs unbatched classifier-free guidance, and FLOP/s.

    python bench/bench_sampling.py [--checkpoint DIR] [--batch 1] [--steps 8 16] [--diffusion-steps 50]

For MAR-LR and MAR-HR (the `tiny` presets at the tiny VAE's token counts, random weights, or
the models of --checkpoint): tokens generated per second
  - batched CFG: conditional and unconditional passes as one batch of 2B (what the sampler does);
  - unbatched CFG: the two passes one after the other, measured as two cfg = 1 samplings of
    batch B (the guidance arithmetic itself is negligible).
and the achieved FLOP/s of the batched sampler (FLOPs counted by torch.utils.flop_counter)
as a fraction of a 2048 × 2048 fp32 matmul measured in the same run.
"""

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mar3d.mar import MAR, PRESETS  # noqa: E402
from mar3d.vae import PRESETS as VAE_PRESETS  # noqa: E402


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def models(checkpoint: str | None) -> dict:
    if checkpoint:
        from mar3d.checkpoint import load_model

        return {"mar_lr": load_model(checkpoint, "mar_lr"), "mar_hr": load_model(checkpoint, "mar_hr")}
    vae = VAE_PRESETS["tiny"]
    base = dataclasses.replace(PRESETS["tiny"], token_dim=vae.latent_dim)
    torch.manual_seed(0)
    return {"mar_lr": MAR(dataclasses.replace(base, seq_len=vae.lr_tokens)).eval(),
            "mar_hr": MAR(dataclasses.replace(base, seq_len=vae.hr_tokens, lr_seq_len=vae.lr_tokens)).eval()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="directory with mar_lr / mar_hr (default: random tiny presets)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs=2, default=[8, 16], metavar=("LR", "HR"))
    ap.add_argument("--diffusion-steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    args = ap.parse_args()
    peak = matmul_flops_per_s()
    rows = []
    for (name, mar), steps in zip(models(args.checkpoint).items(), args.steps):
        B, L = args.batch, mar.cfg.seq_len
        size = mar.image_encoder.size
        images = torch.rand(B, 3, size, size)
        lr = torch.randn(B, mar.cfg.lr_seq_len, mar.cfg.token_dim) if mar.cfg.lr_seq_len else None

        def run(cfg):
            return mar.sample(images, lr, steps=steps, cfg=cfg, diffusion_steps=args.diffusion_steps,
                              generator=torch.Generator().manual_seed(0))

        batched = timed(lambda: run(args.cfg))
        unbatched = 2 * timed(lambda: run(1.0))
        with FlopCounterMode(display=False) as counter:
            run(args.cfg)
        flops = counter.get_total_flops()
        rows.append((name, L, steps, B * L / batched, B * L / unbatched, unbatched / batched,
                     flops / batched / 1e9, flops / batched / peak))

    print(f"machine: {platform.machine()}, CPUs {os.cpu_count()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; 2048² fp32 matmul: {peak / 1e9:.0f} GFLOP/s")
    print(f"settings: batch {args.batch}, CFG {args.cfg}, diffusion steps {args.diffusion_steps}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'tiny presets, random weights'}\n")
    print("| model | tokens | MAR steps | tokens/s batched CFG | tokens/s unbatched | speed-up | GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for name, L, steps, tb, tu, speedup, gflops, frac in rows:
        print(f"| {name} | {L} | {steps} | {tb:.1f} | {tu:.1f} | {speedup:.2f}x | {gflops:.1f} | {frac:.1%} |")


if __name__ == "__main__":
    main()
