"""Colour from the picture: paint a generated mesh with the input image's colours (issue 14).

    fit = fit_view(mesh, mask)                     # the input view's camera, recovered
    colours = vertex_colours(mesh, rgba, fit)      # (V, 4) uint8 sRGB, every vertex coloured
    mesh = colour_mesh(mesh, rgba)                 # both, on a copy; mesh.visual has the colours

MAR-3D generates geometry only. Our meshes are generated in the frame of the input view: the
shape is turned so the camera sits at azimuth 0 (mar3d.render.rotate_to_view), so the picture
can paint the side it shows.

Camera recovery. Training renders come from `random_camera`: elevation, field of view and a
distance that frames the shape's bounding ball; preprocessing then crops the object's box and
scales it into the square. A crop-and-scale of a pinhole image is again a pinhole image, so the
processed image's camera is (elevation, fov) plus an image-space scale and offset. For each
candidate (elevation, fov) on a grid, the scale and offset follow from the projected vertices'
box (a mesh's silhouette box is its projected vertices' box) matched to the mask's box; the
candidate whose ray-cast silhouette best overlaps the mask (IoU, at 96²) wins, then elevation and
fov are refined on a finer grid at 128² (on 30 held-out renders: 97 % within 5° against 93 % with
the fine search at 96², scripts/colour_eval.py; 0.64–0.78 s for a 21k-face mesh, bench/bench_app.py).

Colouring. A vertex is seen when it faces the camera and the ray from it to the camera leaves
the mesh unobstructed (Embree, through trimesh). Seen vertices sample the image bilinearly in
linear light; background pixels are first replaced by their nearest object pixel, so the
cut-out's background is never sampled. Unseen vertices take the colour of the nearest seen vertex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import trimesh
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from .render import Camera, _transform, bounding_radius, fit_distance

ELEVATIONS = tuple(np.arange(-20.0, 60.1, 5.0))  # coarse search (degrees); training draws −10…40
FOVS = (30.0, 35.0, 40.0, 45.0, 50.0)             # training draws 30…50
REFINE_STEP = 1.0                                 # the fine search: ±5° elevation around the best, this step,
REFINE_FOV = (-2.5, -1.25, 0.0, 1.25, 2.5)        # and these fov offsets
COARSE_SIDE = 96                                  # silhouettes are compared at this many pixels (coarse search)
FIT_SIDE = 128                                    # and at this many in the fine search
ALPHA_OBJECT = 128                                # a pixel is the object's when alpha ≥ this (of 255)
SEEN_OFFSET = 2e-3                                # visibility rays start this far off the surface


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB values in [0, 1] -> linear light (IEC 61966-2-1)."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)


@dataclass
class ViewFit:
    """The processed image's camera: `camera` (azimuth 0) followed by an image-space scale and
    offset, in pixels of a `size`² image (the mask's)."""

    camera: Camera
    scale: float
    offset: tuple[float, float]
    size: int
    iou: float

    def project(self, points, size: int | None = None) -> np.ndarray:
        """World points (N, 3) -> pixel coordinates (u right, v down) in a size² image
        (default the mask's size) framed as the processed image."""
        uv = self.scale * self.camera.project(points) + np.asarray(self.offset)
        return uv * ((size or self.size) / self.size)

    def rays(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Origin (3,) and unit directions (size², 3) through the pixel centres of a size² image."""
        s = (np.arange(size) + 0.5) * (self.size / size)
        u, v = np.meshgrid(s, s)
        cu, cv = (u - self.offset[0]) / self.scale, (v - self.offset[1]) / self.scale  # camera pixels
        c, f = self.camera.size / 2.0, self.camera.focal
        d = np.stack([(cu - c) / f, -(cv - c) / f, -np.ones_like(cu)], -1).reshape(-1, 3)
        d = _transform(d, self.camera.rotation)
        return self.camera.position, d / np.linalg.norm(d, axis=1, keepdims=True)


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _candidate(mesh, radius, elevation, fov, box, size) -> ViewFit:
    """Camera (elevation, fov) with the scale/offset that puts the projected vertices' box on `box`."""
    camera = Camera(0.0, float(elevation), fit_distance(radius, fov), float(fov), size)
    uv = camera.project(mesh.vertices)
    lo, hi = uv.min(0), uv.max(0)
    want = np.array([box[2] - box[0], box[3] - box[1]])
    have = np.maximum(hi - lo, 1e-9)
    scale = float(want @ have / (have @ have))  # least squares over width and height
    centre = np.array([box[0] + box[2], box[1] + box[3]]) / 2.0
    offset = centre - scale * (lo + hi) / 2.0
    return ViewFit(camera, scale, (float(offset[0]), float(offset[1])), size, 0.0)


def silhouette(mesh: trimesh.Trimesh, fit: ViewFit, size: int) -> np.ndarray:
    """Boolean (size, size) image of the pixels whose centre ray hits the mesh."""
    origin, dirs = fit.rays(size)
    hit = mesh.ray.intersects_any(np.broadcast_to(origin, dirs.shape), dirs)
    return hit.reshape(size, size)


def fit_view(mesh: trimesh.Trimesh, mask: np.ndarray, elevations=ELEVATIONS, fovs=FOVS,
             refine_step: float = REFINE_STEP, side: int = FIT_SIDE, coarse_side: int = COARSE_SIDE) -> ViewFit:
    """Recover the camera of a processed image whose object mask is `mask` (H×W bool, square)
    for `mesh`, given in that image's view frame (camera at azimuth 0). Raises ValueError on an
    empty mask or mesh."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"expected a square mask, got shape {mask.shape}")
    if not mask.any() or len(mesh.faces) == 0:
        raise ValueError("fit_view needs a non-empty mask and mesh")
    radius = bounding_radius(mesh)

    def at(n):  # the mask at n² pixels and its box
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((n, n), Image.BILINEAR)) >= 128
        return (small, _box(small)) if small.any() else (None, None)

    def score(elevation, fov, n, small, box):
        fit = _candidate(mesh, radius, elevation, fov, box, n)
        sil = silhouette(mesh, fit, n)
        fit.iou = float((sil & small).sum() / max((sil | small).sum(), 1))
        return fit

    coarse_mask, fine_mask = at(coarse_side), at(side)
    if coarse_mask[0] is None or fine_mask[0] is None:
        raise ValueError("fit_view needs a non-empty mask and mesh (the object vanishes when the mask is shrunk)")
    best = max((score(e, f, coarse_side, *coarse_mask) for f in fovs for e in elevations), key=lambda f: f.iou)
    coarse = float(np.min(np.diff(sorted(elevations)))) if len(elevations) > 1 else 0.0
    e0, f0 = best.camera.elevation_deg, best.camera.fov_deg
    fine = np.arange(e0 - coarse, e0 + coarse + 1e-9, refine_step) if refine_step and coarse > refine_step else [e0]
    best = max((score(e, f0 + df, side, *fine_mask) for e in fine for df in REFINE_FOV), key=lambda f: f.iou)
    # Express the fit at the mask's own size.
    k = mask.shape[0] / side
    return ViewFit(best.camera, best.scale * k, (best.offset[0] * k, best.offset[1] * k), mask.shape[0], best.iou)


def seen_vertices(mesh: trimesh.Trimesh, fit: ViewFit) -> np.ndarray:
    """Boolean (V,): the vertex faces the camera and nothing lies between it and the camera."""
    v = np.asarray(mesh.vertices)
    to_cam = fit.camera.position - v
    dist = np.linalg.norm(to_cam, axis=1, keepdims=True)
    to_cam = to_cam / np.maximum(dist, 1e-12)
    facing = np.einsum("ij,ij->i", np.asarray(mesh.vertex_normals), to_cam) > 0.0
    seen = np.zeros(len(v), bool)
    idx = np.nonzero(facing)[0]
    if len(idx):
        blocked = mesh.ray.intersects_any(v[idx] + SEEN_OFFSET * to_cam[idx], to_cam[idx])
        seen[idx] = ~blocked
    return seen


def bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Sample image (H, W, C) at pixel coordinates uv (N, 2) (pixel centres at i + 0.5), clamped."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] - 0.5, 0.0, w - 1.0)
    y = np.clip(uv[:, 1] - 0.5, 0.0, h - 1.0)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def object_colours_linear(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 3) linear-light colours where every background pixel holds its nearest object
    pixel's colour (so sampling near the silhouette never picks up the background)."""
    rgba = np.asarray(rgba)
    obj = rgba[..., 3] >= ALPHA_OBJECT
    if not obj.any():
        raise ValueError("the image has no object pixels (alpha)")
    linear = srgb_to_linear(rgba[..., :3] / 255.0)
    _, (iy, ix) = ndimage.distance_transform_edt(~obj, return_indices=True)
    return linear[iy, ix]


def vertex_colours(mesh: trimesh.Trimesh, rgba, fit: ViewFit) -> tuple[np.ndarray, np.ndarray]:
    """(V, 4) uint8 sRGB colours for every vertex and the (V,) mask of those seen from `fit`.
    rgba: the processed image with its alpha (H×W×4, any square size framed as the fit's)."""
    rgba = np.asarray(rgba)
    colours_lin = object_colours_linear(rgba)
    seen = seen_vertices(mesh, fit)
    v = np.asarray(mesh.vertices)
    lin = np.empty((len(v), 3))
    if seen.any():
        lin[seen] = bilinear(colours_lin, fit.project(v[seen], size=rgba.shape[0]))
        if (~seen).any():
            _, nearest = cKDTree(v[seen]).query(v[~seen])
            lin[~seen] = lin[seen][nearest]
    else:  # nothing visible (a failed fit): the object's mean colour everywhere
        lin[:] = colours_lin[rgba[..., 3] >= ALPHA_OBJECT].mean(0)
    out = np.empty((len(v), 4), np.uint8)
    out[:, :3] = np.round(linear_to_srgb(lin) * 255.0)
    out[:, 3] = 255
    return out, seen


def colour_mesh(mesh: trimesh.Trimesh, rgba) -> tuple[trimesh.Trimesh, ViewFit]:
    """A copy of `mesh` with vertex colours from the processed image `rgba` (PIL RGBA or array),
    and the recovered view."""
    rgba = np.asarray(rgba.convert("RGBA") if isinstance(rgba, Image.Image) else rgba)
    fit = fit_view(mesh, rgba[..., 3] >= ALPHA_OBJECT)
    colours, _ = vertex_colours(mesh, rgba, fit)
    out = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=colours, process=False)
    return out, fit


def colour_error(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean Euclidean distance of sRGB colours in [0, 1] (uint8 inputs are scaled), over channels RGB,
    divided by √3 so that 1 is black against white."""
    p = np.asarray(predicted)[..., :3] / (255.0 if np.asarray(predicted).dtype == np.uint8 else 1.0)
    t = np.asarray(target)[..., :3] / (255.0 if np.asarray(target).dtype == np.uint8 else 1.0)
    return float(np.linalg.norm(p - t, axis=-1).mean() / math.sqrt(3.0))
