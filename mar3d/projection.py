"""Where a point of a view's frame lands in its preprocessed condition image (pilot O3's pixel-aligned
features, mar3d.single_view.ImageOccupancy).

A training view is rendered by `Camera(azimuth, elevation, distance, fov)` (mar3d.render), and the
shape is turned into the view's frame (azimuth 0). Preprocessing then crops the render to the mask's
box and scales it so the longer side fills `foreground_ratio` of the square (mar3d.preprocess). So a
view-frame point p lands at

    c = R_x(elevation) · p − (0, 0, distance)            camera coordinates, looking down −z
    (x, y) = (c_x, c_y) / (−c_z)                          the normalised image plane
    (u, v) = (a · x + b_u, −a · y + b_v)                  the crop, in grid_sample units ([-1, 1], v down)

with a = focal · crop scale / (size / 2). Five numbers per view, `CAMERA_FIELDS`: the model learns to
read them off the picture (a user's photo has no camera), and is trained looking up its features at
the true ones, jittered.
"""

import math

import numpy as np
import torch

from .preprocess import ALPHA_MIN, _mask_bbox, crop_placement
from .render import Camera

CAMERA_FIELDS = ("elevation_deg", "distance", "a", "b_u", "b_v")


def crop_camera(camera: Camera, alpha: np.ndarray, foreground_ratio: float = 0.85, size: int | None = None) -> np.ndarray:
    """The five `CAMERA_FIELDS` of a render (its camera and its alpha (H, W) uint8) after preprocessing
    to a `size`² square (default: the render's size). Raises ValueError on an empty mask."""
    box = _mask_bbox(alpha > ALPHA_MIN)
    if box is None:
        raise ValueError("the render's mask is empty")
    size = size or alpha.shape[1]
    x0, y0, x1, y1 = box
    (nw, nh), (off_x, off_y) = crop_placement((x1 - x0, y1 - y0), size, foreground_ratio)
    sx, sy = nw / (x1 - x0), nh / (y1 - y0)
    half, c = size / 2.0, camera.size / 2.0
    a = camera.focal * (sx + sy) / 2.0 / half
    b_u = ((c - x0) * sx + off_x) / half - 1.0
    b_v = ((c - y0) * sy + off_y) / half - 1.0
    return np.array([camera.elevation_deg, camera.distance, a, b_u, b_v], dtype=np.float32)


def project(points: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """View-frame points (B, Q, 3) → crop coordinates (B, Q, 2) in [-1, 1] (u right, v down), given
    each view's `CAMERA_FIELDS` (B, 5)."""
    el = camera[:, 0:1] * (math.pi / 180.0)
    cos, sin = el.cos(), el.sin()  # (B, 1)
    x, y, z = points.unbind(-1)
    cy = cos * y - sin * z
    cz = sin * y + cos * z - camera[:, 1:2]
    depth = (-cz).clamp(min=1e-3)
    u = camera[:, 2:3] * x / depth + camera[:, 3:4]
    v = -camera[:, 2:3] * cy / depth + camera[:, 4:5]
    return torch.stack([u, v], -1)


def from_view_fit(fit) -> np.ndarray:
    """The `CAMERA_FIELDS` of a camera recovered by mar3d.colour.fit_view (a ViewFit on the mask of
    the preprocessed image): a mesh's silhouette fitted to the picture gives the lookups' camera."""
    half, c = fit.size / 2.0, fit.camera.size / 2.0
    a = fit.scale * fit.camera.focal / half
    b_u = (fit.scale * c + fit.offset[0]) / half - 1.0
    b_v = (fit.scale * c + fit.offset[1]) / half - 1.0
    return np.array([fit.camera.elevation_deg, fit.camera.distance, a, b_u, b_v], dtype=np.float32)
