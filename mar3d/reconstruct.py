"""Encode a mesh into Pyramid-VAE tokens and decode it back to a mesh.

    python -m mar3d.reconstruct MESH -o OUT.glb --checkpoint DIR [--tokens lr|hr] [--resolution R]

The output lies in the model's frame: the input normalised as in data preparation (bounding
box centred, longest side 1.9, Y up). `--evaluate` compares it with that normalised input
(mar3d.evaluate's protocol) and adds the metrics to the printed JSON line.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model
from .extract import ExtractionError, extract_mesh
from .geometry import MeshError, fps_order, load_mesh, normalize_mesh, sample_surface
from .mesh_io import FORMATS, export_mesh


def encode_mesh(vae, mesh, tokens: str = "hr", seed: int = 0) -> torch.Tensor:
    """Latent tokens (1, M, C) of an already normalised mesh, sampled the way prepare samples it."""
    rng = np.random.default_rng(seed)
    surface = sample_surface(mesh, vae.cfg.num_points, rng)
    surface = surface[fps_order(surface[:, :3], rng)]
    with torch.no_grad():
        return vae.encode(torch.from_numpy(surface)[None].float(), tokens)


def reconstruct(vae, mesh, tokens: str = "hr", resolution: int = 256, target_faces: int | None = None, seed: int = 0):
    """(mesh, stats) decoded from the tokens of `mesh` (normalised)."""
    t0 = time.perf_counter()
    latents = encode_mesh(vae, mesh, tokens, seed)
    encode_s = time.perf_counter() - t0
    out, stats = extract_mesh(vae.occupancy_fn(latents), resolution=resolution, target_faces=target_faces)
    return out, {"tokens": tokens, "n_tokens": latents.shape[1], "encode_seconds": round(encode_s, 3), **stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mesh")
    p.add_argument("-o", "--output", required=True, help=f"output file ({', '.join(FORMATS)})")
    p.add_argument("--checkpoint", required=True, help="directory holding vae.json + vae.safetensors")
    p.add_argument("--tokens", choices=("lr", "hr"), default="hr")
    p.add_argument("--resolution", type=int, default=256, help="marching-cubes cells per axis (power-of-two multiple of 32)")
    p.add_argument("--target-faces", type=int, default=None)
    p.add_argument("--z-up", action="store_true", help="the input mesh is Z-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="also compare with the normalised input")
    args = p.parse_args(argv)
    try:
        vae = load_model(args.checkpoint, "vae")
        mesh, _, _ = normalize_mesh(load_mesh(args.mesh, z_up=args.z_up))
        out, stats = reconstruct(vae, mesh, args.tokens, args.resolution, args.target_faces, args.seed)
        path = export_mesh(out, args.output)
    except (CheckpointError, MeshError, ExtractionError, ValueError) as e:
        print(f"mar3d.reconstruct: {e}", file=sys.stderr)
        return 2
    record = {"input": args.mesh, "output": str(path), **stats}
    if args.evaluate:
        from .metrics import compare_meshes

        record["metrics"] = compare_meshes(out, mesh, normalize=False)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
