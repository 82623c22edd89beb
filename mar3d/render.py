"""Condition images: RGBA renders of a normalised shape from random cameras (DESIGN.md §2, §5).

    cam = random_camera(rng, size=128, radius=bounding_radius(mesh))
    rgba = render(mesh, cam, rng)                  # (128, 128, 4) uint8, straight (not premultiplied) alpha
    views = render_views(mesh, 4, rng)             # [(rgba, camera), ...]
    surface_in_view = rotate_to_view(surface, cam) # turn the shape the way it faces in that picture

Conventions (world = the shape's frame: +Y up, the object's front faces +Z, glTF):
- The camera orbits the origin and looks at it. In its own frame (glTF/OpenGL) it looks down −Z,
  +X is right, +Y is up. `Camera.pose` is the 4×4 camera-to-world matrix.
- azimuth 0° puts the camera on +Z (it sees the front); azimuth grows counter-clockwise seen from
  above (a positive rotation about +Y), so azimuth 90° puts it on +X. Elevation > 0 is above.
  pose rotation = R_y(azimuth) · R_x(−elevation); position = rotation · (0, 0, distance).
- `Camera.K` is the usual OpenCV intrinsics: pixel (u right, v down, origin at the image's top-left
  corner, pixel centres at i + 0.5) = K · (x, −y, −z) / (−z) for a point (x, y, z) in the camera
  frame. `Camera.project` does this for world points. The field of view is the full angle across
  the (square) image.

Ray casting uses trimesh's `mesh.ray`, which is Intel Embree when the `embreex` package is
installed (milliseconds per image) and a pure-numpy tracer otherwise (far slower).
"""

from __future__ import annotations

import colorsys
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import trimesh
from scipy import sparse

log = logging.getLogger(__name__)

GAMMA = 2.2           # shade in linear light, store sRGB-ish values
CREASE_DEG = 30.0     # edges sharper than this keep hard shading (boxes stay flat-faced)


def _transform(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """points (N, k) -> points @ M.T. einsum, not `@`: OpenBLAS threads a tall (N, 3) @ (3, 3)
    matmul and on a busy 2-core machine that is ~20× slower than a plain loop."""
    return np.einsum("ij,kj->ik", points, M)


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass
class Camera:
    """A pinhole camera orbiting the origin and looking at it (conventions: module docstring)."""

    azimuth_deg: float
    elevation_deg: float
    distance: float
    fov_deg: float
    size: int

    @property
    def rotation(self) -> np.ndarray:
        """3×3 camera-to-world rotation (columns: camera right, up, back in world coordinates)."""
        return _rot_y(self.azimuth_deg) @ _rot_x(-self.elevation_deg)

    @property
    def position(self) -> np.ndarray:
        return self.rotation @ np.array([0.0, 0.0, self.distance])

    @property
    def pose(self) -> np.ndarray:
        """4×4 camera-to-world matrix (glTF camera frame: looks down −Z, +Y up)."""
        pose = np.eye(4)
        pose[:3, :3] = self.rotation
        pose[:3, 3] = self.position
        return pose

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return self.size / 2.0 / math.tan(math.radians(self.fov_deg) / 2.0)

    @property
    def K(self) -> np.ndarray:
        """3×3 OpenCV-style intrinsics (acts on (x, −y, −z) of glTF camera coordinates)."""
        f, c = self.focal, self.size / 2.0
        return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])

    def project(self, points) -> np.ndarray:
        """World points (N, 3) -> pixel coordinates (N, 2) as (u, v): u right, v down."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        cam = _transform(points - self.position, self.rotation.T)  # world -> camera: R^T · (p − t)
        cv = cam * np.array([1.0, -1.0, -1.0])                      # glTF -> OpenCV camera axes
        uvw = _transform(cv, self.K)
        return uvw[:, :2] / uvw[:, 2:3]

    def to_dict(self) -> dict:
        return {k: (int(v) if k == "size" else float(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        return cls(azimuth_deg=float(d["azimuth_deg"]), elevation_deg=float(d["elevation_deg"]),
                   distance=float(d["distance"]), fov_deg=float(d["fov_deg"]), size=int(d["size"]))


def fit_distance(radius: float, fov_deg: float, fill: float = 0.9) -> float:
    """Distance at which a sphere of `radius` centred at the origin projects to a disc whose
    diameter is `fill` × the image width. (The disc radius in pixels is f·r / √(d² − r²).)"""
    t = math.tan(math.radians(fov_deg) / 2.0)
    return radius * math.sqrt(1.0 + 1.0 / (fill * t) ** 2)


def bounding_radius(mesh: trimesh.Trimesh) -> float:
    """Radius of the smallest origin-centred ball holding the mesh (the camera aims at the origin)."""
    return float(np.linalg.norm(mesh.vertices, axis=1).max())


def random_camera(rng: np.random.Generator, size: int = 128, elevation=(-10.0, 40.0), fov=(30.0, 50.0),
                  radius: float = 0.95 * math.sqrt(3.0), fill: float = 0.9) -> Camera:
    """Azimuth uniform in [0, 360), elevation and fov uniform in their ranges (degrees).

    The distance makes the origin-centred ball of `radius` fill `fill` of the frame, so anything
    inside it is fully visible with a margin. The default radius holds any shape normalised into
    [-0.95, 0.95]^3; pass `bounding_radius(mesh)` for a tighter framing (render_views does).
    """
    az = float(rng.uniform(0.0, 360.0))
    el = float(rng.uniform(*elevation))
    fov_deg = float(rng.uniform(*fov))
    return Camera(az, el, fit_distance(radius, fov_deg, fill), fov_deg, int(size))


def rotate_to_view(points, camera: Camera) -> np.ndarray:
    """Rotate points about +Y by −azimuth, so that in the new frame `camera` sits at azimuth 0.

    Accepts (N, 3) points or (N, 6) points + normals (both rotated). Elevation is not undone:
    shapes stay upright. Rendering the result from azimuth 0 (same elevation, fov, distance)
    gives the same picture as rendering the original from `camera`.
    """
    return rotate_to_azimuth(points, camera.azimuth_deg)


def rotate_to_azimuth(points, azimuth_deg: float) -> np.ndarray:
    """`rotate_to_view` for a camera at `azimuth_deg` (the only part of the camera it uses)."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise ValueError(f"expected (N, 3) or (N, 6) points, got shape {points.shape}")
    R = _rot_y(-azimuth_deg)
    out = np.array(points, dtype=np.result_type(points.dtype, np.float32), copy=True)
    for start in range(0, points.shape[-1], 3):  # xyz, then normals if present
        out[:, start:start + 3] = _transform(points[:, start:start + 3], R)
    return out


def rotate_mesh_to_view(mesh: trimesh.Trimesh, camera: Camera) -> trimesh.Trimesh:
    """A copy of `mesh` rotated like `rotate_to_view`."""
    out = mesh.copy()
    out.vertices = rotate_to_view(mesh.vertices, camera)
    return out


def corner_normals(mesh: trimesh.Trimesh, crease_deg: float = CREASE_DEG) -> np.ndarray:
    """Per-corner shading normals (F, 3, 3): area-weighted mean of the face normals around each
    corner's vertex, over the faces within `crease_deg` of this face (so sharp edges stay sharp,
    smooth surfaces shade smoothly)."""
    faces = np.asarray(mesh.faces)
    n_faces = len(faces)
    fn = np.asarray(mesh.face_normals)
    weighted = fn * np.asarray(mesh.area_faces)[:, None]
    corner_v, corner_f = faces.ravel(), np.repeat(np.arange(n_faces), 3)
    incidence = sparse.csr_matrix((np.ones(3 * n_faces), (corner_v, corner_f)),
                                  shape=(len(mesh.vertices), n_faces))
    pairs = incidence[corner_v].tocoo()  # (corner, face sharing the corner's vertex)
    keep = np.einsum("ij,ij->i", fn[corner_f[pairs.row]], fn[pairs.col]) > math.cos(math.radians(crease_deg))
    rows, cols = pairs.row[keep], pairs.col[keep]
    normals = np.stack([np.bincount(rows, weighted[cols, k], minlength=3 * n_faces) for k in range(3)], 1)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-12, normals / np.maximum(length, 1e-12), fn[corner_f])
    return normals.reshape(n_faces, 3, 3)


def random_color(rng: np.random.Generator) -> np.ndarray:
    """A random RGB base colour in [0, 1]: any hue, moderate saturation and value
    (never near black or white, so lit and shaded parts stay distinguishable)."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.15, 0.7), rng.uniform(0.45, 0.85)))


def random_light(rng: np.random.Generator) -> np.ndarray:
    """A unit direction towards the light, in the camera frame: from above (y > 0) and from the
    viewer's side (z > 0, so the visible side is mostly lit), anywhere left to right."""
    d = np.array([rng.uniform(-1.0, 1.0), rng.uniform(0.1, 1.0), rng.uniform(0.3, 1.0)])
    return d / np.linalg.norm(d)


_warned_no_embree = False


def render(mesh: trimesh.Trimesh, camera: Camera, rng: np.random.Generator | None = None, color=None,
           light_dir=None, ambient: float | None = None, specular: float | None = None,
           supersample: int = 2, normals: np.ndarray | None = None) -> np.ndarray:
    """RGBA uint8 image (size, size, 4) of `mesh` seen from `camera`.

    One ray per sub-pixel (supersample × supersample per pixel, for anti-aliased edges); Lambert
    shading with crease-aware smooth normals, one directional light plus ambient and a mild
    Blinn-Phong highlight. Alpha is the covered fraction of each pixel; RGB is the mean colour of
    the covered sub-pixels (0 where nothing is hit). Faces seen from behind are shaded with their
    normal flipped towards the camera, so open meshes look sane.

    color: RGB in [0, 1] (default: `random_color`), or one RGB per face (F, 3); light_dir: direction towards the light in
    the camera frame (default: `random_light`); ambient in [0, 1] (default uniform 0.2–0.4);
    specular strength (default uniform 0–0.2). Defaults are drawn from `rng` (a fresh generator
    if None). `normals`: precomputed `corner_normals(mesh)`, to reuse across views.
    """
    global _warned_no_embree
    if not trimesh.ray.has_embree and not _warned_no_embree:
        log.warning("embreex is not installed: rendering with trimesh's slow pure-numpy ray tracer")
        _warned_no_embree = True
    rng = np.random.default_rng() if rng is None else rng
    color = random_color(rng) if color is None else np.asarray(color, dtype=np.float64)
    light_cam = random_light(rng) if light_dir is None else np.asarray(light_dir, dtype=np.float64)
    ambient = float(rng.uniform(0.2, 0.4)) if ambient is None else float(ambient)
    specular = float(rng.uniform(0.0, 0.2)) if specular is None else float(specular)

    size, ss = int(camera.size), int(supersample)
    n = size * ss
    R, origin = camera.rotation, camera.position
    tri, hit_dirs = _cast(mesh, camera, ss)
    hit = tri >= 0

    rgb = np.zeros((n * n, 3))
    if hit.any():
        tri_h, d = tri[hit], hit_dirs
        fn = np.asarray(mesh.face_normals)[tri_h]
        a, b, cc = (np.asarray(mesh.triangles)[tri_h, k] for k in range(3))
        # Hit point: intersect the ray with the face's plane.
        denom = np.einsum("ij,ij->i", d, fn)
        t = np.einsum("ij,ij->i", a - origin, fn) / np.where(np.abs(denom) > 1e-12, denom, 1e-12)
        p = origin + t[:, None] * d
        # Barycentric coordinates of p -> interpolated shading normal.
        e0, e1, e2 = b - a, cc - a, p - a
        d00, d01, d11 = (np.einsum("ij,ij->i", x, y) for x, y in ((e0, e0), (e0, e1), (e1, e1)))
        d20, d21 = np.einsum("ij,ij->i", e2, e0), np.einsum("ij,ij->i", e2, e1)
        det = d00 * d11 - d01 * d01
        det = np.where(np.abs(det) > 1e-20, det, 1e-20)
        w1 = np.clip((d11 * d20 - d01 * d21) / det, 0.0, 1.0)
        w2 = np.clip((d00 * d21 - d01 * d20) / det, 0.0, 1.0)
        w0 = np.clip(1.0 - w1 - w2, 0.0, 1.0)
        cn = corner_normals(mesh) if normals is None else normals
        cn = cn[tri_h]
        nrm = w0[:, None] * cn[:, 0] + w1[:, None] * cn[:, 1] + w2[:, None] * cn[:, 2]
        nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
        nrm *= np.where(denom > 0, -1.0, 1.0)[:, None]  # back faces: flip towards the camera

        light = R @ (light_cam / np.linalg.norm(light_cam))
        half = light - d
        half /= np.maximum(np.linalg.norm(half, axis=1, keepdims=True), 1e-12)
        diffuse = np.clip(nrm @ light, 0.0, None)
        highlight = specular * np.clip(np.einsum("ij,ij->i", nrm, half), 0.0, None) ** 32 * (diffuse > 0)
        base = np.clip(color, 0.0, 1.0) ** GAMMA       # linear-light albedo
        if base.ndim == 2:                             # per-face colours
            base = base[tri_h]
        lin = base * (ambient + (1.0 - ambient) * diffuse)[:, None] + highlight[:, None]
        rgb[hit] = np.clip(lin, 0.0, 1.0) ** (1.0 / GAMMA)

    # Average sub-pixels: alpha = coverage, RGB = mean over covered sub-pixels (straight alpha).
    rgb = rgb.reshape(size, ss, size, ss, 3).sum(axis=(1, 3))
    cover = hit.reshape(size, ss, size, ss).sum(axis=(1, 3)).astype(np.float64)
    rgb = rgb / np.maximum(cover, 1.0)[..., None]
    return _rgba(rgb, cover / (ss * ss))


def _cast(mesh: trimesh.Trimesh, camera: Camera, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays through the centres of ss × ss sub-pixels of each pixel: the first triangle each hits
    ((size·ss)², −1: none, row-major) and the world directions of the rays that hit (in that order).
    Only the sub-pixels inside the box around the mesh's projected vertices are cast (a triangle
    projects inside its corners' hull): each ray and its hit are as if all were cast."""
    size = int(camera.size)
    n = size * ss
    box = camera.project(mesh.vertices) * ss - 0.5     # in sub-pixel indices
    (u0, v0), (u1, v1) = np.floor(box.min(0)) - 1, np.ceil(box.max(0)) + 2
    cols = np.arange(max(int(u0), 0), min(int(u1), n))
    rows = np.arange(max(int(v0), 0), min(int(v1), n))
    u, v = np.meshgrid((cols + 0.5) / ss, (rows + 0.5) / ss)  # sub-pixel centres in pixel units, u right, v down
    c, f = size / 2.0, camera.focal
    dirs_cam = np.stack([(u - c) / f, -(v - c) / f, -np.ones_like(u)], -1).reshape(-1, 3)
    dirs = _transform(dirs_cam, camera.rotation)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    tri = np.full((n, n), -1, dtype=np.int64)
    if len(dirs):
        window = mesh.ray.intersects_first(np.broadcast_to(camera.position, dirs.shape), dirs)
        tri[rows[:, None], cols[None]] = window.reshape(len(rows), len(cols))
        dirs = dirs[window >= 0]
    return tri.reshape(-1), dirs


def _rgba(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(size, size, 3) colours and (size, size) alphas in [0, 1] → RGBA uint8."""
    out = np.empty((*alpha.shape, 4), dtype=np.uint8)
    out[..., :3] = np.round(rgb * 255.0).astype(np.uint8)
    out[..., 3] = np.round(alpha * 255.0).astype(np.uint8)
    return out


def render_flat(mesh: trimesh.Trimesh, camera: Camera, rng: np.random.Generator, supersample: int = 2) -> np.ndarray:
    """`render`'s alpha (the same rays, so the same coverage) under one flat colour: the random
    base colour `render` would draw, at mid shading (ambient + half the diffuse, no highlight). For
    silhouettes only (the reference index's masks, pilot S14): it skips the shading, about half of
    `render`'s time. It draws from `rng` everything `render` draws, so the views after it are the same."""
    color, _light = random_color(rng), random_light(rng)
    ambient, _specular = float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.0, 0.2))
    size, ss = int(camera.size), int(supersample)
    hit = _cast(mesh, camera, ss)[0] >= 0
    cover = hit.reshape(size, ss, size, ss).sum(axis=(1, 3))
    flat = (color ** GAMMA * (ambient + (1.0 - ambient) * 0.5)) ** (1.0 / GAMMA)
    return _rgba(flat * (cover > 0)[..., None], cover / (ss * ss))


def render_views(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator, size: int = 128, shaded: bool = True,
                 **camera_kwargs) -> list[tuple[np.ndarray, Camera]]:
    """`n` renders from `random_camera`s framed on the mesh's bounding ball (each with its own
    random colour and light; `shaded=False`: `render_flat`, the same cameras). `camera_kwargs` go
    to `random_camera` (elevation, fov, fill)."""
    radius = bounding_radius(mesh)
    normals = corner_normals(mesh) if shaded else None
    views = []
    for _ in range(n):
        camera = random_camera(rng, size=size, radius=radius, **camera_kwargs)
        views.append((render(mesh, camera, rng, normals=normals) if shaded else render_flat(mesh, camera, rng), camera))
    return views
