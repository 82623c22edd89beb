"""Mesh loading, normalisation, inside/outside labels and point sampling (DESIGN.md §2).

Conventions: +Y is up (glTF), shapes are normalised into [-0.95, 0.95]^3 ⊂ [-1, 1]^3.
All functions are pure: they never modify their inputs and take an explicit RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import igl
import numpy as np
import trimesh

MESH_EXTENSIONS = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")

# Proper rotation (det +1) of -90° about +X: (x, y, z) -> (x, z, -y), so +Z maps to +Y.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


class MeshError(ValueError):
    """A mesh file that cannot be used as a shape; the message says which file and why."""


def load_mesh(path, z_up: bool = False) -> trimesh.Trimesh:
    """Read a mesh file (OBJ/GLB/GLTF/PLY/STL/OFF) into one clean triangle mesh, +Y up.

    Scenes are flattened with their node transforms applied. Only geometry is kept
    (no textures/UVs), which lets duplicate vertices merge across UV seams: a mesh that
    is closed but split along seams then becomes watertight. Open meshes stay open.
    """
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in MESH_EXTENSIONS:
        raise MeshError(f"{name}: unknown mesh format {path.suffix!r} (expected one of {MESH_EXTENSIONS})")
    try:
        scene = trimesh.load_scene(path, process=False)
        geometries = scene.dump()
    except Exception as exc:  # trimesh raises many types for corrupt files
        raise MeshError(f"{name}: cannot read file ({type(exc).__name__}: {exc})") from exc

    meshes = [g for g in geometries if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
    if not meshes:
        if any(isinstance(g, trimesh.PointCloud) for g in geometries):
            raise MeshError(f"{name}: is a point cloud (vertices but no faces)")
        raise MeshError(f"{name}: empty mesh (no faces found)")

    vertices, faces, offset = [], [], 0
    for m in meshes:
        vertices.append(np.asarray(m.vertices, dtype=np.float64))
        faces.append(np.asarray(m.faces, dtype=np.int64) + offset)
        offset += len(m.vertices)
    vertices, faces = np.concatenate(vertices), np.concatenate(faces)
    if not np.isfinite(vertices).all():
        raise MeshError(f"{name}: has NaN or infinite vertex coordinates")
    if z_up:
        vertices = vertices @ Z_UP_TO_Y_UP.T

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    mesh.merge_vertices()  # positions only: there are no UVs/normals left to keep seams apart
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0:
        raise MeshError(f"{name}: empty mesh (all faces are degenerate)")
    if not mesh.extents.max() > 0:
        raise MeshError(f"{name}: degenerate mesh (zero extent)")
    return mesh


def normalize_mesh(mesh: trimesh.Trimesh, extent: float = 1.9, mode: str = "box"):
    """Centre at the bounding-box centre and scale uniformly so the longest side is `extent`.

    mode="cylinder" instead fits the vertical cylinder of diameter and height `extent`: the
    shape then stays inside [-extent/2, extent/2]^3 under any rotation about +Y (the rotation
    that turns a shape into a camera's frame, mar3d.render.rotate_to_view).

    Returns (normalised copy, center (3,), scale) with normalised = (v - center) * scale.
    """
    lo, hi = mesh.bounds
    center = (lo + hi) / 2.0
    longest = float((hi - lo).max())
    if not longest > 0:
        raise MeshError("degenerate mesh (zero extent)")
    scale = extent / longest
    if mode == "cylinder":
        v = np.asarray(mesh.vertices) - center
        scale = extent / (2 * max(np.hypot(v[:, 0], v[:, 2]).max(), (hi - lo)[1] / 2))
    elif mode != "box":
        raise ValueError(f"unknown normalisation {mode!r} (box or cylinder)")
    out = mesh.copy()
    out.vertices = (np.asarray(mesh.vertices) - center) * scale
    return out, center, scale


def inside(mesh: trimesh.Trimesh, points) -> np.ndarray:
    """Boolean inside labels: generalised winding number >= 0.5 (libigl fast winding number).

    Ray parity is wrong on open meshes (a ray leaving through a hole flips the answer) and on
    overlapping parts (inside two parts counts as outside). The winding number degrades
    gracefully instead: ~1 inside a nearly closed surface, ~0 outside, and a union of parts
    adds up to >= 1. Watertight meshes get the exact answer.
    """
    V = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    F = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    Q = np.ascontiguousarray(np.asarray(points).reshape(-1, 3), dtype=np.float64)
    if len(Q) == 0:
        return np.zeros(0, dtype=bool)
    return igl.fast_winding_number(V, F, Q) >= 0.5


def sample_surface(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` area-weighted random points on the faces with their unit face normals, (n, 6) float32."""
    tri = np.asarray(mesh.triangles, dtype=np.float64)  # (F, 3, 3)
    area = np.asarray(mesh.area_faces, dtype=np.float64)
    cdf = np.cumsum(area)
    face = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    face = np.minimum(face, len(area) - 1)
    # Uniform barycentric coordinates: fold the unit square onto the triangle.
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    xyz = a + u[:, None] * (b - a) + v[:, None] * (c - a)
    normal = np.asarray(mesh.face_normals, dtype=np.float64)[face]
    return np.concatenate([xyz, normal], axis=1).astype(np.float32)


def fps_order(points, rng: np.random.Generator) -> np.ndarray:
    """Farthest-point-sampling order of ALL points, starting at a random one.

    Every prefix `order[:k]` is a farthest-point subsample of k points. O(N^2) work in N
    vectorised steps; float32 per-axis arrays and in-place ops keep 8192 points < 0.1 s.
    """
    p = np.asarray(points, dtype=np.float32)[:, :3]
    n = len(p)
    order = np.empty(n, dtype=np.int64)
    if n == 0:
        return order
    x, y, z = (np.ascontiguousarray(p[:, k]) for k in range(3))
    min_d = np.full(n, np.inf, dtype=np.float32)  # squared distance to the chosen set
    d = np.empty(n, dtype=np.float32)
    t = np.empty(n, dtype=np.float32)
    i = int(rng.integers(n))
    for k in range(n):
        order[k] = i
        np.subtract(x, x[i], out=d)
        np.square(d, out=d)
        np.subtract(y, y[i], out=t)
        np.square(t, out=t)
        d += t
        np.subtract(z, z[i], out=t)
        np.square(t, out=t)
        d += t
        np.minimum(min_d, d, out=min_d)
        min_d[i] = -1.0  # chosen points never win again, even with duplicate points
        i = int(min_d.argmax())
    return order


@dataclass
class PrepareConfig:
    """Sizes of the per-shape training arrays (DESIGN.md §2)."""

    num_surface: int = 8192
    num_uniform: int = 32768
    num_near: int = 32768
    near_sigmas: tuple = (0.005, 0.05)  # the near points are split evenly between these σ
    bounds: float = 1.05
    extent: float = 1.9
    normalize: str = "box"  # "cylinder": safe under rotations about +Y (see normalize_mesh)


def prepare_shape(mesh: trimesh.Trimesh, cfg: PrepareConfig, seed: int) -> dict:
    """Training arrays for one already-normalised mesh; deterministic in `seed`.

    Keys (a fixed schema): surface (N, 6) float32 in FPS order (pyramid levels are the
    prefixes N, N/4, N/16, N/64), uniform_points / uniform_labels, near_points / near_labels.
    """
    rng = np.random.default_rng(seed)
    surface = sample_surface(mesh, cfg.num_surface, rng)
    surface = surface[fps_order(surface[:, :3], rng)]

    uniform = rng.uniform(-cfg.bounds, cfg.bounds, size=(cfg.num_uniform, 3))

    base = sample_surface(mesh, cfg.num_near, rng)[:, :3].astype(np.float64)
    sigma = np.concatenate(
        [np.full(len(part), s) for part, s in zip(np.array_split(np.arange(cfg.num_near), len(cfg.near_sigmas)), cfg.near_sigmas)]
    )
    near = base + rng.normal(size=base.shape) * sigma[:, None]

    uniform, near = uniform.astype(np.float32), near.astype(np.float32)
    # Label the float32 points that are stored, so labels match the saved coordinates exactly.
    labels = inside(mesh, np.concatenate([uniform, near]))
    return {
        "surface": surface,
        "uniform_points": uniform,
        "uniform_labels": labels[: len(uniform)],
        "near_points": near,
        "near_labels": labels[len(uniform) :],
    }
