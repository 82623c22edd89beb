"""Mesh export (GLB default, OBJ, PLY, STL) and summary statistics.

The project's meshes are already +Y up (glTF convention, DESIGN §2), so no rotation is applied
on export: a GLB stands upright in any glTF viewer because the data is stored that way.

Vertex colours (mesh.visual.vertex_colors, sRGB, from mar3d.colour) go into every format that
has them: GLB as COLOR_0 under a white material (glTF defines COLOR_0 as linear, so the sRGB
values are converted), PLY and OBJ as sRGB, the formats' usual meaning. STL stays geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pygltflib
import trimesh
from trimesh.visual.material import PBRMaterial

from .colour import linear_to_srgb, srgb_to_linear

FORMATS = ("glb", "obj", "ply", "stl")

# Neutral mid grey, a bit rough, not metallic: under the viewer's lights it reads against the app's
# light viewer background (0.7 came out pale lavender on white, issue 13).
GREY_MATERIAL = dict(name="mar3d_grey", baseColorFactor=[0.5, 0.5, 0.5, 1.0],
                     metallicFactor=0.0, roughnessFactor=0.7)
# With vertex colours the material is white: glTF multiplies COLOR_0 by the base colour.
COLOUR_MATERIAL = dict(GREY_MATERIAL, name="mar3d_vertex_colour", baseColorFactor=[1.0, 1.0, 1.0, 1.0])


def vertex_colours(mesh: trimesh.Trimesh) -> np.ndarray | None:
    """The mesh's (V, 4) uint8 vertex colours, or None when it has none. (trimesh drops a GLB's
    COLOR_0 when the primitive has a material: load ours with `skip_materials=True`, then
    glb_colours_to_srgb, since glTF's COLOR_0 is linear.)"""
    if getattr(mesh.visual, "kind", None) != "vertex":
        return None
    return np.asarray(mesh.visual.vertex_colors, dtype=np.uint8)


def glb_colours_to_srgb(colours: np.ndarray) -> np.ndarray:
    """COLOR_0 as read back from one of our GLBs (linear, uint8) -> sRGB uint8."""
    out = np.array(colours, dtype=np.uint8, copy=True)
    out[:, :3] = np.round(linear_to_srgb(out[:, :3] / 255.0) * 255.0)
    return out


class ExportError(RuntimeError):
    """An exported file failed validation."""


def _format(path: Path, fmt: str | None) -> str:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown mesh format {fmt!r} for {path}; choose one of {FORMATS}")
    return fmt


def export_mesh(mesh: trimesh.Trimesh, path: str | Path, fmt: str | None = None) -> Path:
    """Write `mesh` to `path` (format from `fmt` or the suffix); returns the path.

    GLB files carry vertex normals and a grey PBR material (or vertex colours under a white
    one) and are validated with pygltflib after writing (raises ExportError if invalid).
    Parent folders are created.
    """
    path = Path(path)
    fmt = _format(path, fmt)
    if len(mesh.faces) == 0:
        raise ValueError("cannot export an empty mesh")
    path.parent.mkdir(parents=True, exist_ok=True)
    colours = vertex_colours(mesh)
    if fmt == "glb":
        m = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces,
                            vertex_normals=mesh.vertex_normals, process=False)
        m.visual = trimesh.visual.TextureVisuals(
            material=PBRMaterial(**(GREY_MATERIAL if colours is None else COLOUR_MATERIAL)))
        if colours is not None:
            linear = colours.copy()
            linear[:, :3] = np.round(srgb_to_linear(colours[:, :3] / 255.0) * 255.0)
            m.visual.vertex_attributes["color"] = linear  # trimesh writes it as COLOR_0
        path.write_bytes(m.export(file_type="glb", include_normals=True))
        validate_glb(path, colours=colours is not None)
    elif fmt == "obj":
        path.write_text(mesh.export(file_type="obj", include_normals=True, include_color=colours is not None))
    elif fmt == "ply":
        path.write_bytes(mesh.export(file_type="ply", vertex_normal=True))
    else:  # stl: binary, face normals only (the format has no vertex normals, nor colours)
        path.write_bytes(mesh.export(file_type="stl"))
    return path


def validate_glb(path: str | Path, colours: bool = False) -> None:
    """Check a GLB is glTF 2.0 with one mesh, a POSITION accessor with min/max and normals (and,
    if `colours`, a COLOR_0 accessor with one colour per vertex)."""
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
    if colours and (attrs.COLOR_0 is None or gltf.accessors[attrs.COLOR_0].count != acc.count):
        raise ExportError(f"{path}: no COLOR_0 attribute with one colour per vertex")


def mesh_stats(mesh: trimesh.Trimesh) -> dict:
    """Vertex/face counts, watertightness, signed volume and axis-aligned bounds."""
    return {
        "n_vertices": int(len(mesh.vertices)),
        "n_faces": int(len(mesh.faces)),
        "watertight": bool(mesh.is_watertight),
        "volume": float(mesh.volume) if len(mesh.faces) else 0.0,  # meaningful if watertight
        "bounds": np.asarray(mesh.bounds, dtype=float).tolist() if len(mesh.faces) else None,
    }
