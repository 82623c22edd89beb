"""Silhouette carving: the input view's outline trims the generated occupancy (pilot C1).

    fit = fit_view(lr_mesh, mask)               # the input view's camera (mar3d.colour)
    carved = carve(vae.occupancy_fn(hr), fit, mask)
    mesh, _ = extract_mesh(carved, resolution=128)

The one thing a single picture says for certain about the object is where it is *not*: no part
of it projects outside the object mask. The cascade's shape starts from a retrieved training
shape (mar3d.retrieval), whose outline matches the input's only roughly (silhouette IoU 0.6–0.8
on held-out renders), so parts of it often stick out: a wider table top, an extra armrest, a
tail. `carve` empties every point whose projection through the recovered camera falls outside
the mask, grown by `dilation` pixels against small errors of the fitted camera. That is the
visual hull of one view: it removes, never adds, and says nothing about depth. It works on the
logits (a soft hull, `SLOPE` per pixel of signed distance to the outline), so a cut part's new
surface lies on the outline rather than on the nearest grid point.

Off by default (`Settings.carve`): it did not pay on held-out shapes (checkpoints/README.md,
pilots C1 and C2). The reference shape alone on the 105 validation shapes: median F@0.05 0.642
uncarved, 0.671 carved at dilation 0, 0.661 at 2. The cascade at dilation 1 on the 48 validation
shapes: 0.688 against 0.673 (9 shapes better, 9 worse); on the 133 test shapes 0.574 against
0.572, with aircraft (thin wings, a camera fitted to a wrong-shaped preview) 0.26 against 0.51.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .colour import ViewFit, bilinear
from .extract import DecodeFn

SLOPE = 2.0  # logit per pixel of the condition image: 5 pixels outside the outline is −10 (p ≈ 5e-5)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32: each pixel centre's distance in pixels to the mask's edge, positive inside
    the object mask (H, W) bool, negative outside (±0.5 on the two sides of the edge)."""
    mask = np.asarray(mask, bool)
    if mask.all():  # no edge: everything is deep inside
        return np.full(mask.shape, np.float32(mask.size), np.float32)
    inside = ndimage.distance_transform_edt(mask) - 0.5
    outside = ndimage.distance_transform_edt(~mask) - 0.5
    return np.where(mask, inside, -outside).astype(np.float32)


def outline_distance(points: np.ndarray, fit: ViewFit, distance: np.ndarray) -> np.ndarray:
    """(N,): `distance` (H, H), an image framed as the fit's, sampled bilinearly where the points
    (N, 3), in the view's frame, project (pixel centres at i + 0.5; clamped at the border)."""
    uv = fit.project(np.asarray(points, np.float64), size=distance.shape[0])
    return bilinear(distance[..., None], uv)[:, 0]


def carve(decode_fn: DecodeFn, fit: ViewFit, mask: np.ndarray, dilation: float = 0.0) -> DecodeFn:
    """`decode_fn` limited to the mask's visual hull: each logit becomes min(logit, SLOPE · d),
    d the signed distance (pixels) of the point's projection to the mask's edge grown by
    `dilation` pixels. Inside the hull no sign changes; outside every point is empty, and a part
    cut by the hull gets its surface on the hull, between grid points.
    mask: the processed image's object mask (H, H) bool, framed as `fit`."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("carving needs a non-empty mask")
    if dilation < 0:
        raise ValueError(f"dilation must be ≥ 0, got {dilation}")
    distance = signed_distance(mask) + np.float32(dilation)

    def carved(points: torch.Tensor) -> torch.Tensor:
        logits = decode_fn(points)
        d = outline_distance(points.detach().cpu().numpy(), fit, distance)
        return torch.minimum(logits, torch.from_numpy(SLOPE * d).to(logits))

    return carved
