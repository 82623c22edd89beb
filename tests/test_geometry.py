"""Tests for mar3d.geometry: loading, normalisation, inside labels, sampling, FPS order."""

import time

import igl
import numpy as np
import pytest
import trimesh

from mar3d.geometry import (
    Z_UP_TO_Y_UP,
    MeshError,
    PrepareConfig,
    fps_order,
    inside,
    load_mesh,
    normalize_mesh,
    prepare_shape,
    sample_surface,
)

from tests.conftest import data_mesh as real_mesh


def normalized(name: str) -> trimesh.Trimesh:
    return normalize_mesh(load_mesh(real_mesh(name)))[0]


def unsigned_distance(mesh, points) -> np.ndarray:
    V, F = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    return np.abs(igl.signed_distance(np.asarray(points, np.float64), V, F, igl.SIGNED_DISTANCE_TYPE_UNSIGNED)[0])


def query_points(mesh, rng, n_uniform=5000, n_near=5000):
    """Uniform points in the box plus near-surface points at σ = 0.005 and 0.05."""
    uniform = rng.uniform(-1.05, 1.05, size=(n_uniform, 3))
    base = sample_surface(mesh, n_near, rng)[:, :3].astype(np.float64)
    sigma = np.where(np.arange(n_near) < n_near // 2, 0.005, 0.05)[:, None]
    return np.concatenate([uniform, base + rng.normal(size=base.shape) * sigma])


def min_pairwise_distance(p) -> float:
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    return float(d[np.triu_indices(len(p), 1)].min())


# ---------------------------------------------------------------- load_mesh


TETRA_OBJ = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n"


@pytest.mark.parametrize(
    "filename, content, reason",
    [
        ("bad.obj", "this is not a mesh\njust some text\n", "no faces"),
        ("empty.ply", "", "cannot read"),
        ("nan.obj", TETRA_OBJ.replace("v 0 0 1", "v 0 nan 1"), "NaN"),
        ("inf.obj", TETRA_OBJ.replace("v 0 0 1", "v 0 inf 1"), "infinite"),
        ("flat.obj", "v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n", "degenerate"),
        ("mesh.xyz", "0 0 0\n", "unknown mesh format"),
    ],
)
def test_load_mesh_rejects_bad_files(tmp_path, filename, content, reason):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(MeshError, match=reason) as info:
        load_mesh(path)
    assert filename in str(info.value)  # the message names the file


def test_load_mesh_rejects_point_cloud(tmp_path):
    path = tmp_path / "cloud.ply"
    trimesh.PointCloud(np.random.default_rng(0).random((50, 3))).export(path)
    with pytest.raises(MeshError, match="point cloud"):
        load_mesh(path)


def test_load_mesh_scene_applies_node_transforms(tmp_path):
    scene = trimesh.Scene()
    box = trimesh.creation.box(extents=(1, 1, 1))
    scene.add_geometry(box, node_name="a", transform=trimesh.transformations.translation_matrix((10, 0, 0)))
    scene.add_geometry(box, node_name="b", transform=trimesh.transformations.translation_matrix((0, 0, -5)))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path)
    assert len(mesh.faces) == 24  # both instances, concatenated
    np.testing.assert_allclose(mesh.bounds, [[-0.5, -0.5, -5.5], [10.5, 0.5, 0.5]], atol=1e-6)


def test_load_mesh_merges_seam_vertices_and_cleans(tmp_path):
    # spot.obj splits vertices along UV seams; merging by position makes it watertight.
    assert not trimesh.load(real_mesh("spot.obj"), force="mesh").is_watertight
    assert load_mesh(real_mesh("spot.obj")).is_watertight
    # Duplicate and degenerate faces and unreferenced vertices are dropped.
    path = tmp_path / "dirty.obj"
    path.write_text(TETRA_OBJ + "v 5 5 5\nf 1 3 2\nf 1 1 2\n")
    mesh = load_mesh(path)
    assert (len(mesh.vertices), len(mesh.faces)) == (4, 4)
    assert mesh.is_watertight and mesh.volume > 0


def test_load_mesh_keeps_open_meshes_open():
    for name in ("fish_open.obj", "penguin_parts.obj"):
        assert not load_mesh(real_mesh(name)).is_watertight, f"{name} should stay open (no repair in load_mesh)"


def test_z_up_rotation(tmp_path):
    assert np.isclose(np.linalg.det(Z_UP_TO_Y_UP), 1.0)
    path = tmp_path / "tetra.obj"
    path.write_text(TETRA_OBJ)
    plain, rotated = load_mesh(path), load_mesh(path, z_up=True)
    top = np.argmax(plain.vertices[:, 2])  # the vertex at +Z ...
    np.testing.assert_allclose(plain.vertices[top], [0, 0, 1])
    np.testing.assert_allclose(rotated.vertices[top], [0, 1, 0], atol=1e-12)  # ... ends at +Y
    assert plain.volume > 0 and np.isclose(rotated.volume, plain.volume)  # no mirroring
    # A real Z-up load keeps the mesh intact: same extents, permuted.
    spot, spot_z = load_mesh(real_mesh("spot.obj")), load_mesh(real_mesh("spot.obj"), z_up=True)
    np.testing.assert_allclose(spot_z.extents, spot.extents[[0, 2, 1]], rtol=1e-9)
    assert np.isclose(spot_z.volume, spot.volume)


# ---------------------------------------------------------------- normalize_mesh


@pytest.mark.parametrize("name", ["spot.obj", "fish_open.obj", "ycb_banana.obj", "goathead.obj"])
def test_normalize_mesh(name):
    mesh = load_mesh(real_mesh(name))
    before = mesh.vertices.copy()
    norm, center, scale = normalize_mesh(mesh)
    np.testing.assert_array_equal(mesh.vertices, before)  # input untouched
    assert norm.vertices.min() >= -0.95 - 1e-9 and norm.vertices.max() <= 0.95 + 1e-9
    assert np.isclose(norm.extents.max(), 1.9)
    np.testing.assert_allclose(norm.bounds.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(norm.vertices, (before - center) * scale)
    assert center.shape == (3,) and isinstance(scale, float)


def test_normalize_mesh_custom_extent():
    norm, _, _ = normalize_mesh(trimesh.creation.box(extents=(2, 4, 8)), extent=1.0)
    np.testing.assert_allclose(norm.extents, [0.25, 0.5, 1.0])


# ---------------------------------------------------------------- inside


@pytest.mark.parametrize("name", ["fish_open.obj", "penguin_parts.obj"])
def test_inside_open_mesh_matches_independent_reference(name):
    """Open meshes (holes, open interpenetrating parts) still get the filled solid's labels.

    fish_open: four patches with open seams 1e-4 wide; penguin_parts: a body with two holes, each
    covered by an open sphere that pierces it (ray parity gets ~1 % of these points wrong);
    tests/data/make_test_data.py.

    Reference: point-cloud-utils' Manifold reconstruction makes a watertight version; on a
    closed mesh any exact inside test is valid (the exact igl winding number is used as that
    test, same answer as trimesh `contains` on a closed mesh, 50x faster). The reconstruction is
    an offset surface (~1 voxel out), so it is only a valid reference for points farther than
    its measured offset from the surface. Near the surface, the check is against the exact
    (non-approximated) winding number of the open mesh.
    """
    pcu = pytest.importorskip("point_cloud_utils")
    mesh = normalized(name)
    points = query_points(mesh, np.random.default_rng(0))
    labels = inside(mesh, points)
    assert labels.shape == (10000,) and labels.dtype == bool

    V, F = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    vw, fw = pcu.make_mesh_watertight(V, F, 5000, seed=0)
    closed = trimesh.Trimesh(vw, fw)
    assert closed.is_watertight
    reference = igl.winding_number(np.asarray(vw, np.float64), np.asarray(fw, np.int64), points) >= 0.5
    margin = 1.5 * unsigned_distance(mesh, vw).max()  # beyond the reconstruction's offset
    far = unsigned_distance(mesh, points) > margin
    far_agreement = (labels[far] == reference[far]).mean()

    exact = igl.winding_number(V, F, points) >= 0.5
    exact_agreement = (labels == exact).mean()
    print(
        f"{name}: inside() vs watertight reconstruction {far_agreement:.4f} on {far.sum()} points "
        f"farther than {margin:.3f}; vs exact winding number {exact_agreement:.4f} on 10000 points"
    )
    assert far.sum() > 5000 and 0.02 < labels[far].mean() < 0.5  # a real test: both classes present
    assert far_agreement >= 0.99
    assert exact_agreement >= 0.99


def test_inside_watertight_matches_ray_test():
    name = "spot.obj"  # watertight once seams are merged (torus.obj is too; one mesh keeps this fast)
    mesh = normalized(name)
    assert mesh.is_watertight
    points = query_points(mesh, np.random.default_rng(1), 3000, 3000)  # trimesh's ray test is slow
    labels = inside(mesh, points)
    reference = mesh.contains(points)  # ray parity: valid on a watertight mesh
    agreement = (labels == reference).mean()
    print(f"{name}: inside() vs trimesh contains {agreement:.4f} on {len(points)} points")
    assert 0.05 < labels.mean() < 0.6
    assert agreement >= 0.995


def test_inside_box_and_union_of_overlapping_parts():
    a = trimesh.creation.box(extents=(1, 1, 1))
    b = trimesh.creation.box(extents=(1, 1, 1), transform=trimesh.transformations.translation_matrix((0.5, 0, 0)))
    union = trimesh.util.concatenate([a, b])  # overlapping parts: ray parity says "outside" in the overlap
    points = np.array([[0.25, 0, 0], [-0.4, 0, 0], [0.9, 0, 0], [1.2, 0, 0], [0, 0.7, 0]])
    np.testing.assert_array_equal(inside(union, points), [True, True, True, False, False])
    assert inside(a, np.zeros((0, 3))).shape == (0,)


# ---------------------------------------------------------------- sample_surface


def test_sample_surface_on_faces_with_normals():
    mesh = normalized("spot.obj")
    s = sample_surface(mesh, 4000, np.random.default_rng(0))
    assert s.shape == (4000, 6) and s.dtype == np.float32
    assert unsigned_distance(mesh, s[:, :3]).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(s[:, 3:], axis=1), 1, atol=1e-5)
    # Normals are the normals of the faces the points lie on (outward on this closed mesh).
    _, _, face = trimesh.proximity.closest_point(mesh, s[:, :3])
    assert (np.sum(mesh.face_normals[face] * s[:, 3:], axis=1) > 0.99).mean() > 0.99
    np.testing.assert_array_equal(s, sample_surface(mesh, 4000, np.random.default_rng(0)))


def test_sample_surface_is_area_weighted():
    small = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    big = trimesh.Trimesh([[0, 0, 5], [3, 0, 5], [0, 3, 5]], [[0, 1, 2]])  # 9x the area
    s = sample_surface(trimesh.util.concatenate([small, big]), 20000, np.random.default_rng(0))
    assert abs((s[:, 2] > 1).mean() - 0.9) < 0.01
    on_small = s[s[:, 2] < 1]
    assert (on_small[:, 0] + on_small[:, 1] <= 1 + 1e-6).all() and (on_small[:, :2] >= 0).all()
    # Uniform inside a triangle: the mean is the centroid.
    np.testing.assert_allclose(on_small[:, :2].mean(axis=0), [1 / 3, 1 / 3], atol=0.01)


# ---------------------------------------------------------------- fps_order


def sphere_points(n, seed=0):
    p = np.random.default_rng(seed).normal(size=(n, 3))
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


def test_fps_order_is_a_farthest_point_permutation():
    p = sphere_points(4096)
    order = fps_order(p, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(order), np.arange(4096))
    # Each next point is the one farthest from those already chosen (the FPS definition).
    for k in (1, 2, 10, 63, 500):
        chosen = p[order[:k]]
        dist = np.linalg.norm(p[:, None] - chosen[None], axis=-1).min(axis=1)
        assert np.isclose(dist[order[k]], dist.max(), rtol=1e-5)
    # A 64-prefix is spread out far better than a random 64-subset.
    fps_min = min_pairwise_distance(p[order[:64]])
    rand_min = max(min_pairwise_distance(p[np.random.default_rng(s).choice(4096, 64, replace=False)]) for s in range(5))
    print(f"min pairwise distance of 64 points: fps {fps_min:.3f}, best of 5 random {rand_min:.3f}")
    assert fps_min > 2 * rand_min


def test_fps_order_random_start_and_duplicates():
    p = sphere_points(256)
    starts = {int(fps_order(p, np.random.default_rng(s))[0]) for s in range(10)}
    assert len(starts) > 1
    dup = np.concatenate([p[:10]] * 5)  # many identical points must still give a permutation
    np.testing.assert_array_equal(np.sort(fps_order(dup, np.random.default_rng(0))), np.arange(50))
    assert fps_order(np.zeros((0, 3)), np.random.default_rng(0)).shape == (0,)


def test_fps_order_timing():
    p = sphere_points(8192)
    start = time.perf_counter()
    fps_order(p, np.random.default_rng(0))
    print(f"fps_order on 8192 points: {time.perf_counter() - start:.3f} s")


# ---------------------------------------------------------------- prepare_shape


SCHEMA = {
    "surface": (np.float32, (8192, 6)),
    "uniform_points": (np.float32, (32768, 3)),
    "uniform_labels": (np.bool_, (32768,)),
    "near_points": (np.float32, (32768, 3)),
    "near_labels": (np.bool_, (32768,)),
}


def test_prepare_shape_schema_and_labels():
    mesh = normalized("spot.obj")
    cfg = PrepareConfig()
    start = time.perf_counter()
    out = prepare_shape(mesh, cfg, seed=3)
    print(f"prepare_shape(spot, default config): {time.perf_counter() - start:.2f} s")
    assert set(out) == set(SCHEMA)
    for key, (dtype, shape) in SCHEMA.items():
        assert out[key].dtype == dtype and out[key].shape == shape, key

    surface = out["surface"]
    assert unsigned_distance(mesh, surface[:, :3]).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(surface[:, 3:], axis=1), 1, atol=1e-5)
    # Pyramid levels are prefixes: the N/64 prefix is far more spread out than the last N/64.
    lr = 8192 // 64
    assert min_pairwise_distance(surface[:lr, :3]) > 3 * min_pairwise_distance(surface[-lr:, :3])

    assert np.abs(out["uniform_points"]).max() <= cfg.bounds
    # Inside fraction of uniform points ≈ volume / box volume (std ≈ 1.6 % relative here).
    expected = mesh.volume / (2 * cfg.bounds) ** 3
    frac = out["uniform_labels"].mean()
    print(f"uniform inside fraction {frac:.4f}, volume ratio {expected:.4f}")
    assert abs(frac - expected) < 0.05 * expected

    # Near points: first half σ = 0.005, second half σ = 0.05; about half of them inside.
    half = 32768 // 2
    dist = unsigned_distance(mesh, out["near_points"])
    assert np.median(dist[:half]) < 0.006 < 0.02 < np.median(dist[half:])
    assert 0.35 < out["near_labels"][:half].mean() < 0.65
    # Labels are those of the stored float32 coordinates.
    np.testing.assert_array_equal(out["near_labels"], inside(mesh, out["near_points"]))


def test_prepare_shape_is_deterministic():
    mesh = normalized("torus.obj")
    cfg = PrepareConfig(num_surface=512, num_uniform=1024, num_near=1024)
    a, b, c = prepare_shape(mesh, cfg, 7), prepare_shape(mesh, cfg, 7), prepare_shape(mesh, cfg, 8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["uniform_points"], c["uniform_points"])
    assert not np.array_equal(a["surface"], c["surface"])


def test_cylinder_normalisation_survives_rotation_about_y():
    mesh = normalize_mesh(load_mesh(real_mesh("spot.obj")), mode="cylinder")[0]
    for angle in np.linspace(0, 2 * np.pi, 13):
        turned = mesh.copy()
        turned.apply_transform(trimesh.transformations.rotation_matrix(angle, [0, 1, 0]))
        assert np.abs(turned.vertices).max() <= 0.95 + 1e-9
    box = normalize_mesh(trimesh.creation.box(extents=[1.0, 0.5, 1.0]))[0]
    turned = box.copy()
    turned.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 4, [0, 1, 0]))
    assert np.abs(turned.vertices).max() > 0.95  # why the cylinder mode exists
    with pytest.raises(ValueError):
        normalize_mesh(mesh, mode="sphere")
