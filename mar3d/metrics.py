"""Shape metrics between a predicted and a reference mesh — the project's evaluation protocol.

Protocol (DESIGN §7; report it next to every number):

1. Normalisation (unless ``normalize=False``): each mesh on its own is translated so its
   axis-aligned bounding-box centre is at the origin and scaled uniformly so its longest
   bounding-box side is 1.9 — the same normalisation as the training data. No rotation
   alignment.
2. Sampling: ``n_points`` (default 100,000) points per mesh, uniformly by area (face chosen
   with probability proportional to its area, uniform barycentric position), each carrying
   its face's normal. Each mesh is sampled with its own generator seeded with ``seed``, so
   results are deterministic and a mesh compared with itself scores exactly perfect.
3. Chamfer distance: nearest-neighbour L2 distances (not squared) in both directions,
   ``CD = (mean_pred d(p, GT) + mean_gt d(g, PRED)) / 2`` — HALVED, i.e. the average of the
   two one-sided means.
4. F-score at threshold tau (0.02 and 0.05 by default, in the normalised units where the
   shape spans 1.9): precision = fraction of predicted points within tau of the reference
   points, recall = fraction of reference points within tau of the predicted points,
   F = 2PR / (P + R) (0 when both are 0).
5. Normal consistency: for each point, |cos| between its normal and the normal of its
   nearest neighbour in the other set (orientation-agnostic); mean over each direction, then
   the average of the two directions.

6. Slab share (of each mesh, no second mesh needed): the share of its surface area whose face
   normal is within about 18° of straight up or down (|n_y| > 0.95). Real shapes here have about
   14 %; the first demo checkpoint's meshes, stacks of horizontal slabs, had 91–95 %.

Nearest neighbours use scipy's cKDTree (exact).
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from mar3d import geometry


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` area-weighted surface points (n, 3) and their face normals (n, 3), seeded."""
    if len(mesh.faces) == 0 or not mesh.area > 0:
        raise ValueError("mesh has no surface (no faces or zero area)")
    samples = geometry.sample_surface(mesh, n, np.random.default_rng(seed))
    return samples[:, :3].astype(np.float64), samples[:, 3:].astype(np.float64)


def slab_share(mesh: trimesh.Trimesh, threshold: float = 0.95) -> float:
    """Share of the surface area whose face normal has |n_y| > threshold (flat horizontal faces)."""
    area = mesh.area_faces
    if len(area) == 0 or not area.sum() > 0:
        raise ValueError("mesh has no surface (no faces or zero area)")
    flat = np.abs(mesh.face_normals[:, 1]) > threshold
    return float(area[flat].sum() / area.sum())


def compare_meshes(pred: trimesh.Trimesh, gt: trimesh.Trimesh, n_points: int = 100_000,
                   thresholds: tuple[float, ...] = (0.02, 0.05), normalize: bool = True,
                   seed: int = 0) -> dict:
    """Chamfer (halved), F-score/precision/recall per threshold and normal consistency.

    See the module docstring for the protocol. Keys: ``chamfer``, ``normal_consistency``,
    ``fscore@T``, ``precision@T``, ``recall@T`` for each threshold T (formatted with ``g``).
    """
    if normalize:  # the data pipeline's normalisation, so evaluation and training agree
        pred, gt = geometry.normalize_mesh(pred)[0], geometry.normalize_mesh(gt)[0]
    p_pts, p_nrm = sample_surface(pred, n_points, seed)
    g_pts, g_nrm = sample_surface(gt, n_points, seed)
    d_pg, i_pg = cKDTree(g_pts).query(p_pts, workers=-1)  # pred -> gt
    d_gp, i_gp = cKDTree(p_pts).query(g_pts, workers=-1)  # gt -> pred
    nc_pg = np.abs(np.sum(p_nrm * g_nrm[i_pg], axis=1)).mean()
    nc_gp = np.abs(np.sum(g_nrm * p_nrm[i_gp], axis=1)).mean()
    out = {"chamfer": float((d_pg.mean() + d_gp.mean()) / 2),
           "normal_consistency": float((nc_pg + nc_gp) / 2),
           "slab_share": slab_share(pred), "gt_slab_share": slab_share(gt)}
    for t in thresholds:
        precision = float((d_pg < t).mean())
        recall = float((d_gp < t).mean())
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[f"fscore@{t:g}"] = f
        out[f"precision@{t:g}"] = precision
        out[f"recall@{t:g}"] = recall
    return out
