"""Training data of MAR: condition images with the VAE tokens of their shapes, in one file.

    <dir>/latents.safetensors
        images  uint8 (S, H, W, 3)   preprocessed condition images (mar3d.preprocess)
        lr      float (S, L_lr, C)   VAE posterior means of the LR token set
        hr      float (S, L_hr, C)   ... of the HR token set
        metadata: names (json list, "<shape>/<view>"), latent_shift, latent_scale, token_order

One entry per (shape, view): a view may rotate the shape into the camera's frame, so its
tokens are its own. The held-out split is by shape (the part of the name before "/").
Token order: "anchored" (the default; mar3d.token_order) or "fps", as the VAE emits them.
"""

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .preprocess import preprocess_image
from .token_order import anchored

CACHE_FILE = "latents.safetensors"


@torch.no_grad()
def build_cache(vae, items: Iterable[tuple[str, np.ndarray, object]], out_dir: str | Path, image_size: int,
                background: str = "auto", foreground_ratio: float = 0.85, batch: int = 32,
                order: str = "anchored", held_out: Callable[[str], bool] | None = None) -> dict:
    """Encode (name, surface (N, 6) FPS-ordered, image) items; write the cache; return its summary.

    order "anchored" fits the anchors on the entries that `held_out(name)` leaves out (all when it
    is None), so held-out shapes never shape the training targets."""
    if order not in ("anchored", "fps"):
        raise ValueError(f"unknown token order {order!r} (expected 'anchored' or 'fps')")
    if order == "anchored" and vae.cfg.queries != "fps":
        raise ValueError("the anchored order pairs FPS query points with anchors; a VAE with learned queries "
                         "already emits its tokens in a fixed order: use order='fps' (as emitted)")
    names, images, queries, lr, hr, pending = [], [], [], [], [], []
    device = next(vae.parameters()).device  # encode where the VAE is; the cache is kept on the CPU

    def flush():
        surface = torch.from_numpy(np.stack(pending)).float().to(device)
        lr.append(vae.encode(surface, "lr").cpu())
        hr.append(vae.encode(surface, "hr").cpu())
        pending.clear()

    for name, surface, image in items:
        names.append(name)
        images.append(np.asarray(preprocess_image(image, background, foreground_ratio, size=image_size).image))
        pending.append(surface[: vae.cfg.num_points])
        queries.append(surface[: vae.cfg.hr_tokens, :3])  # where the tokens are queried (LR: a prefix)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    if not names:
        raise ValueError("build_cache got no items")
    lr, hr = torch.cat(lr), torch.cat(hr)
    if order == "anchored":
        fit = np.array([held_out is None or not held_out(n) for n in names])
        queries = np.stack(queries)
        lr, _ = anchored(lr, queries, fit)
        hr, _ = anchored(hr, queries, fit)
    both = torch.cat([lr.flatten(), hr.flatten()])
    meta = {"names": json.dumps(names), "latent_shift": str(both.mean().item()), "latent_scale": str(both.std().item()),
            "token_order": order}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"images": torch.from_numpy(np.stack(images)), "lr": lr.contiguous(), "hr": hr.contiguous()},
              str(out / CACHE_FILE), metadata=meta)
    return {"entries": len(names), "lr": tuple(lr.shape), "hr": tuple(hr.shape),
            "latent_shift": float(meta["latent_shift"]), "latent_scale": float(meta["latent_scale"]), "token_order": order}


def load_cache(data_dir: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata with names as a list and the normalisation as floats)."""
    path = Path(data_dir) / CACHE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent cache; build one with mar3d.cache.build_cache")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["names"] = json.loads(meta["names"])
    meta["latent_shift"], meta["latent_scale"] = float(meta["latent_shift"]), float(meta["latent_scale"])
    return load_file(str(path)), meta
