"""Tests for mar3d.mesh_io: export round-trips and GLB validity."""

import numpy as np
import pygltflib
import pytest
import trimesh

from mar3d.mesh_io import FORMATS, ExportError, export_mesh, mesh_stats, validate_glb


@pytest.fixture
def mesh():
    """Asymmetric, +Y-up test mesh: a tall capsule moved off the origin."""
    m = trimesh.creation.capsule(height=0.8, radius=0.25, count=[24, 24])
    m.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # z -> y
    m.apply_translation([0.2, 0.1, -0.3])
    assert m.extents[1] > m.extents[0]  # tall along y
    return m


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, mesh, fmt):
    path = export_mesh(mesh, tmp_path / f"shape.{fmt}")
    assert path.exists() and path.suffix == f".{fmt}"
    back = trimesh.load(path, force="mesh")
    np.testing.assert_allclose(back.bounds, mesh.bounds, atol=1e-5)  # no rotation, +Y stays up
    if fmt != "stl":  # STL stores unshared triangles
        a, b = mesh.copy(), back.copy()
        a.merge_vertices()
        b.merge_vertices()
        assert len(b.vertices) == len(a.vertices)
    assert len(back.faces) == len(mesh.faces)


def test_glb_has_normals_and_grey_material(tmp_path, mesh):
    path = export_mesh(mesh, tmp_path / "shape.glb")
    validate_glb(path)
    gltf = pygltflib.GLTF2().load(str(path))
    assert gltf.asset.version == "2.0" and len(gltf.meshes) == 1
    attrs = gltf.meshes[0].primitives[0].attributes
    assert attrs.NORMAL is not None
    pos = gltf.accessors[attrs.POSITION]
    np.testing.assert_allclose(pos.min, mesh.bounds[0], atol=1e-5)
    np.testing.assert_allclose(pos.max, mesh.bounds[1], atol=1e-5)
    pbr = gltf.materials[gltf.meshes[0].primitives[0].material].pbrMetallicRoughness
    assert pbr.metallicFactor == 0.0 and 0.3 <= pbr.roughnessFactor <= 0.9
    assert np.ptp(pbr.baseColorFactor[:3]) < 1e-6  # neutral grey
    # normals survive loading and point outward at the top
    back = trimesh.load(path, force="mesh", process=False)
    top = np.argmax(back.vertices[:, 1])
    assert back.vertex_normals[top, 1] > 0.9


def test_format_argument_and_unknown_format(tmp_path, mesh):
    path = export_mesh(mesh, tmp_path / "shape.bin", fmt="ply")
    assert len(trimesh.load(path, file_type="ply", force="mesh").faces) == len(mesh.faces)
    with pytest.raises(ValueError, match="unknown mesh format"):
        export_mesh(mesh, tmp_path / "shape.fbx")
    with pytest.raises(ValueError):
        export_mesh(mesh, tmp_path / "shape.glb", fmt="usd")


def test_validate_glb_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"not a gltf file at all")
    with pytest.raises(ExportError):
        validate_glb(bad)


def test_mesh_stats(mesh):
    s = mesh_stats(mesh)
    assert s["n_vertices"] == len(mesh.vertices) and s["n_faces"] == len(mesh.faces)
    assert s["watertight"] is True
    ref = np.pi * 0.25 ** 2 * 0.8 + 4 / 3 * np.pi * 0.25 ** 3
    assert abs(s["volume"] / ref - 1) < 0.02
    np.testing.assert_allclose(s["bounds"], mesh.bounds)


def test_glb_stands_upright_in_a_gltf_viewer(tmp_path, mesh):
    """glTF is +Y up: with no node rotation or matrix, a viewer shows the tall axis (y) vertical."""
    gltf = pygltflib.GLTF2().load(str(export_mesh(mesh, tmp_path / "tall.glb")))
    for node in gltf.nodes:
        assert node.matrix in (None, [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])
        assert node.rotation in (None, [0, 0, 0, 1])
    acc = gltf.accessors[gltf.meshes[0].primitives[0].attributes.POSITION]
    extent = np.array(acc.max) - np.array(acc.min)
    assert extent.argmax() == 1  # the tall capsule is tall in the file's up axis
    np.testing.assert_allclose(acc.min, mesh.bounds[0], atol=1e-5)
