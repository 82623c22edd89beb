"""How gracefully does a VAE decode tokens that are a little wrong? (a diagnostic; CI never runs it)

    python scripts/latent_noise.py --work data/demo --vae checkpoints [--shapes 16]

For validation shapes (view 0, its cached HR tokens, normalised to unit variance; with --encode
the VAE's own tokens of the shape turned into view 0's frame, normalised by their own mean and
spread, for a VAE that did not make the cache) it decodes the
true tokens, the tokens plus Gaussian noise of std 0.3 / 0.5 / 0.75, shrunk to 0.7 towards the
mean, and shrunk plus noise 0.5, meshes each at 96³ and prints F@0.05 (mar3d.evaluate's protocol)
and the slab share per condition.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pilot_eval import score, validation_shapes  # noqa: E402
from train_demo import Recipe, ground_truth  # noqa: E402

from mar3d.cache import load_cache  # noqa: E402
from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.extract import ExtractionError, extract_mesh  # noqa: E402
from mar3d.render import Camera, rotate_to_view  # noqa: E402

CONDITIONS = {"clean": (1.0, 0.0), "noise 0.3": (1.0, 0.3), "noise 0.5": (1.0, 0.5), "noise 0.75": (1.0, 0.75),
              "shrink 0.7": (0.7, 0.0), "shrink 0.7 + noise 0.5": (0.7, 0.5)}  # (a, s): a·tokens + s·ε


@torch.no_grad()
def encode_view0(vae, work: Path, npz: Path) -> torch.Tensor:
    """HR tokens (M, C) of the prepared shape turned into its view 0's frame, as the cache makes them."""
    cam = Camera.from_dict(json.loads((work / "renders" / npz.stem / "cameras.json").read_text())[0])
    surface = rotate_to_view(np.load(npz)["surface"], cam).astype(np.float32)[: vae.cfg.num_points]
    return vae.encode(torch.from_numpy(surface)[None], "hr")[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--vae", required=True, help="directory with vae.json / vae.safetensors")
    p.add_argument("--shapes", type=int, default=16)
    p.add_argument("--encode", action="store_true", help="encode the shapes with this VAE instead of reading the cache")
    args = p.parse_args(argv)
    work = Path(args.work)
    torch.manual_seed(0)
    vae = load_model(args.vae, "vae")
    shapes = validation_shapes(work, Recipe(), args.shapes)
    if args.encode:
        latents = {npz.stem: encode_view0(vae, work, npz) for npz in shapes}
        everything = torch.cat(list(latents.values()))
        shift, scale = everything.mean().item(), everything.std().item()
    else:
        data, meta = load_cache(work / "cache")
        row = {name: i for i, name in enumerate(meta["names"])}
        latents = {npz.stem: data["hr"][row[f"{npz.stem}/0"]].float() for npz in shapes}
        shift, scale = meta["latent_shift"], meta["latent_scale"]
    scores = {k: [] for k in CONDITIONS}
    t0 = time.time()
    for npz in shapes:
        _, gt = ground_truth(work, npz)
        tokens = (latents[npz.stem] - shift) / scale
        for k, (a, s) in CONDITIONS.items():
            x = a * tokens + s * torch.randn_like(tokens)
            try:
                mesh, _ = extract_mesh(vae.occupancy_fn((x * scale + shift)[None]), resolution=96)
            except ExtractionError:
                mesh = None
            scores[k].append(score(mesh, gt))
        print(npz.stem, {k: v[-1]["fscore@0.05"] for k, v in scores.items()}, flush=True)
    for k, rows in scores.items():
        f = [r["fscore@0.05"] for r in rows]
        slabs = [r["slab_share"] for r in rows if "slab_share" in r]
        print(f"{k}: median F {statistics.median(f):.3f}, mean {statistics.fmean(f):.3f}, "
              f"slab share {statistics.fmean(slabs):.3f}" if slabs else f"{k}: all failed")
    print(f"{(time.time() - t0) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
