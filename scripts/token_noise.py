"""How much of a VAE token is the chance of farthest-point sampling? (model card, "Recipe pilots")

    python scripts/token_noise.py --work data/demo --vae checkpoints [--shapes 48]

For validation shapes it encodes each surface twice, in its stored FPS order and after a second
FPS run from another start point, puts both token sets in anchored order and prints their
normalised mean squared difference: twice the noise no deterministic image → token regression
can remove. It also encodes with "snapped" queries (the surface point nearest to each anchor, a
deterministic choice) and prints the unchanged VAE's occupancy IoU with each kind of query.
A VAE with learned queries (VAEConfig.queries) has no query points: its two token sets are
compared slot by slot, with --work a cache built by it (for its token scale).
"""
import argparse, glob, json, sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from mar3d.cache import load_cache
from mar3d.checkpoint import load_model
from mar3d.geometry import fps_order
from mar3d.data import is_held_out, is_validation
from mar3d.token_order import fit_anchors, anchor_permutation
ap = argparse.ArgumentParser()
ap.add_argument("--work", required=True)
ap.add_argument("--vae", required=True)
ap.add_argument("--shapes", type=int, default=48)
args = ap.parse_args()
torch.set_num_threads(1)
vae = load_model(args.vae, "vae")
files = sorted(glob.glob(f"{args.work}/prepared/*.npz"))
train = [f for f in files if not is_held_out(f.split("/")[-1][:-4], 8.0)]
val = [f for f in files if is_validation(f.split("/")[-1][:-4], 4.0, 4.0)]
rng = np.random.default_rng(0)
train_q = np.stack([np.load(f)["surface"][:128, :3] for f in rng.choice(train, 600, replace=False)])
anchors = fit_anchors(train_q)
pick = [val[i] for i in np.linspace(0, len(val) - 1, args.shapes).astype(int)]
scale = float(load_cache(Path(args.work) / "cache")[1]["latent_scale"])  # the cache's token normalisation
# (a VAE with learned queries: pass --work of a cache built with it, for its own scale)

def enc(surface, queries):
    s = torch.from_numpy(surface).float()[None]
    q = torch.from_numpy(queries).float()[None]
    sizes = vae.cfg.level_sizes("hr")
    x = sum(b(vae.embed_points(q), vae.embed_points(s[:, :n])) for b, n in zip(vae.level_attn, sizes))
    for b in vae.encoder:
        x = b(x)
    return vae.to_moments(x).chunk(2, -1)[0]

def iou(lat, d):
    with torch.no_grad():
        occ = vae.query(vae.decode(lat), torch.from_numpy(d["uniform_points"][:8192]).float()[None])[0] > 0
    lab = torch.from_numpy(d["uniform_labels"][:8192]).bool()
    return ((occ & lab).sum() / (occ | lab).sum().clamp(min=1)).item()

rows = []
with torch.no_grad():
    for f in pick:
        d = np.load(f); surf = d["surface"].astype(np.float32)
        # the stored FPS order, and a second FPS run from another start point
        surf2 = surf[fps_order(surf[:, :3], np.random.default_rng(123))]
        if vae.cfg.queries == "learned":  # no query points: the tokens come in their fixed slots
            t1 = vae.encode(torch.from_numpy(surf)[None], "hr"); t2 = vae.encode(torch.from_numpy(surf2)[None], "hr")
            rows.append(dict(name=f.split("/")[-1], mse_fps=((t1 - t2) ** 2).mean().item() / scale**2, iou_fps=iou(t1, d)))
            continue
        t1 = enc(surf, surf[:128]); t2 = enc(surf2, surf2[:128])
        p1 = anchor_permutation(surf[None, :128, :3], anchors)[0]; p2 = anchor_permutation(surf2[None, :128, :3], anchors)[0]
        a1, a2 = t1[0, p1], t2[0, p2]
        # snapped: the surface point nearest to each anchor
        nn_idx = ((surf[None, :, :3] - anchors[:, None, :]) ** 2).sum(-1).argmin(1)
        ts = enc(surf, surf[nn_idx])
        nn2 = ((surf2[None, :, :3] - anchors[:, None, :]) ** 2).sum(-1).argmin(1)
        ts2 = enc(surf2, surf2[nn2])
        rows.append(dict(name=f.split("/")[-1], mse_fps=((a1 - a2) ** 2).mean().item() / scale**2,
                         mse_snap=((ts - ts2) ** 2).mean().item() / scale**2,
                         iou_fps=iou(t1, d), iou_snap=iou(ts, d), uniq_snap=len(set(nn_idx.tolist()))))
for k in rows[0]:
    if k != "name":
        print(k, np.median([r[k] for r in rows]), np.mean([r[k] for r in rows]))
print(json.dumps(rows))
