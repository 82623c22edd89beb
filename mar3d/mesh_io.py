"""Mesh export (GLB default, OBJ, PLY, STL) and summary statistics.

The project's meshes are already +Y up (glTF convention, DESIGN §2), so no rotation is applied
on export: a GLB stands upright in any glTF viewer because the data is stored that way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pygltflib
import trimesh
from trimesh.visual.material import PBRMaterial

FORMATS = ("glb", "obj", "ply", "stl")

# Neutral mid grey, a bit rough, not metallic: under the viewer's lights it reads against the app's
# light viewer background (0.7 came out pale lavender on white, issue 13).
GREY_MATERIAL = dict(name="mar3d_grey", baseColorFactor=[0.5, 0.5, 0.5, 1.0],
                     metallicFactor=0.0, roughnessFactor=0.7)


class ExportError(RuntimeError):
    """An exported file failed validation."""


def _format(path: Path, fmt: str | None) -> str:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown mesh format {fmt!r} for {path}; choose one of {FORMATS}")
    return fmt


def export_mesh(mesh: trimesh.Trimesh, path: str | Path, fmt: str | None = None) -> Path:
    """Write `mesh` to `path` (format from `fmt` or the suffix); returns the path.

    GLB files carry vertex normals and a grey PBR material and are validated with pygltflib
    after writing (raises ExportError if invalid). Parent folders are created.
    """
    path = Path(path)
    fmt = _format(path, fmt)
    if len(mesh.faces) == 0:
        raise ValueError("cannot export an empty mesh")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "glb":
        m = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces,
                            vertex_normals=mesh.vertex_normals, process=False)
        m.visual = trimesh.visual.TextureVisuals(material=PBRMaterial(**GREY_MATERIAL))
        path.write_bytes(m.export(file_type="glb", include_normals=True))
        validate_glb(path)
    elif fmt == "obj":
        path.write_text(mesh.export(file_type="obj", include_normals=True))
    elif fmt == "ply":
        path.write_bytes(mesh.export(file_type="ply", vertex_normal=True))
    else:  # stl: binary, face normals only (the format has no vertex normals)
        path.write_bytes(mesh.export(file_type="stl"))
    return path


def validate_glb(path: str | Path) -> None:
    """Check a GLB is glTF 2.0 with one mesh, a POSITION accessor with min/max and normals."""
    try:
        gltf = pygltflib.GLTF2().load(str(path))
    except Exception as e:  # pygltflib raises assorted errors on broken files
        raise ExportError(f"{path}: not a readable glTF: {e}") from e
    if gltf is None or gltf.asset is None or gltf.asset.version != "2.0":
        raise ExportError(f"{path}: not glTF 2.0")
    if len(gltf.meshes) != 1 or not gltf.meshes[0].primitives:
        raise ExportError(f"{path}: expected exactly one mesh with primitives, got {len(gltf.meshes)}")
    attrs = gltf.meshes[0].primitives[0].attributes
    if attrs.POSITION is None:
        raise ExportError(f"{path}: no POSITION attribute")
    acc = gltf.accessors[attrs.POSITION]
    if not acc.min or not acc.max or len(acc.min) != 3 or len(acc.max) != 3:
        raise ExportError(f"{path}: POSITION accessor lacks min/max")
    if attrs.NORMAL is None:
        raise ExportError(f"{path}: no NORMAL attribute")


def mesh_stats(mesh: trimesh.Trimesh) -> dict:
    """Vertex/face counts, watertightness, signed volume and axis-aligned bounds."""
    return {
        "n_vertices": int(len(mesh.vertices)),
        "n_faces": int(len(mesh.faces)),
        "watertight": bool(mesh.is_watertight),
        "volume": float(mesh.volume) if len(mesh.faces) else 0.0,  # meaningful if watertight
        "bounds": np.asarray(mesh.bounds, dtype=float).tolist() if len(mesh.faces) else None,
    }
