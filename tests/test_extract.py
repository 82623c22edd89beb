"""Tests for mar3d.extract on analytic occupancy fields (logit = -slope * signed distance)."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from mar3d.sdf import sd_box, sd_capsule, sd_sphere, sd_torus, union
from mar3d.extract import (ExtractionError, dense_grid, extract_mesh, grid_to_mesh,
                           hierarchical_grid, postprocess)

CHUNK = 1 << 18  # larger chunks: the analytic fields are cheap, per-call overhead dominates


def thin_shape(p):
    """Sphere + thin torus (tube 0.1) + diagonal rod (0.06 thick) + plate (0.05 thick)."""
    return -100.0 * union(sd_sphere(p, [0.0, -0.3, 0.0], 0.4),
                          sd_torus(p, [0.0, 0.45, 0.0], 0.55, 0.05),
                          sd_capsule(p, [-0.7, -0.8, 0.5], [0.7, 0.6, -0.5], 0.03),
                          sd_box(p, [0.0, -0.8, 0.0], [0.5, 0.025, 0.4]))


def vertex_chamfer(a, b):
    """Halved symmetric mean nearest-vertex distance (sampling-free)."""
    return (cKDTree(b.vertices).query(a.vertices)[0].mean()
            + cKDTree(a.vertices).query(b.vertices)[0].mean()) / 2


def test_hierarchical_matches_dense_at_256():
    dense, n_dense = dense_grid(thin_shape, 256, chunk=CHUNK)
    hier, n_hier = hierarchical_grid(thin_shape, 256, chunk=CHUNK)
    assert dense.shape == hier.shape == (257, 257, 257)
    m_dense, m_hier = grid_to_mesh(dense), grid_to_mesh(hier)
    cd = vertex_chamfer(m_dense, m_hier)
    mismatch = int(((dense > 0) != (hier > 0)).sum())
    print(f"\n256^3: dense {n_dense:,} queries, hierarchical {n_hier:,} "
          f"({n_dense / n_hier:.1f}x fewer); Chamfer {cd:.2e}; sign mismatches {mismatch}; "
          f"faces {len(m_dense.faces)} / {len(m_hier.faces)}")
    assert cd < 1e-3
    assert len(m_hier.faces) == len(m_dense.faces)
    assert len(m_hier.split(only_watertight=False)) == len(m_dense.split(only_watertight=False))
    assert n_dense >= 10 * n_hier


def test_band_recovers_thin_part_between_coarse_samples():
    # A 0.01-thick plate centred between two coarse (32-cell) sample planes: no coarse sample
    # is inside it, so only the |logit| band can find it. The fine (128) grid samples it.
    y0 = -1.05 + 16.5 * 2.1 / 32

    def field(p):
        return -60.0 * union(sd_sphere(p, [0.0, -0.5, 0.0], 0.3),
                             sd_box(p, [0.0, y0, 0.0], [0.6, 0.005, 0.6]))

    dense, _ = dense_grid(field, 128, chunk=CHUNK)
    blind, _ = hierarchical_grid(field, 128, 32, chunk=CHUNK, band=0.0, dilate=0)
    banded, _ = hierarchical_grid(field, 128, 32, chunk=CHUNK)  # default band
    assert len(grid_to_mesh(dense).split(only_watertight=False)) == 2
    assert len(grid_to_mesh(blind).split(only_watertight=False)) == 1  # the documented limit
    assert vertex_chamfer(grid_to_mesh(banded), grid_to_mesh(dense)) < 1e-6


def test_axis_order_follows_grid_indexing():
    # Box elongated along x only, off-centre: the mesh must be long in x and sit where the box is.
    centre, half = np.array([0.3, -0.2, 0.1]), np.array([0.7, 0.15, 0.25])
    grid, _ = dense_grid(lambda p: -50.0 * sd_box(p, centre.tolist(), half.tolist()), 64)
    mesh = grid_to_mesh(grid)
    extent = mesh.extents
    cell = 2.1 / 64
    assert np.argmax(extent) == 0
    np.testing.assert_allclose(extent, 2 * half, atol=cell)
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), centre, atol=cell / 2)


def test_sphere_volume_and_outward_normals():
    r = 0.6
    grid, _ = dense_grid(lambda p: -50.0 * sd_sphere(p, [0.0, 0.0, 0.0], r), 128, chunk=CHUNK)
    mesh = postprocess(grid_to_mesh(grid))
    assert mesh.is_watertight
    assert mesh.volume > 0
    assert abs(mesh.volume / (4 / 3 * np.pi * r ** 3) - 1) < 0.02
    top = np.argmax(mesh.vertices[:, 1])
    assert mesh.vertex_normals[top, 1] > 0.95  # +Y up, normals point out
    # every face normal points away from the centre
    assert (np.sum(mesh.face_normals * mesh.triangles_center, axis=1) > 0).all()


def test_no_surface_raises():
    with pytest.raises(ExtractionError, match="no surface"):
        grid_to_mesh(np.full((9, 9, 9), -3.0, dtype=np.float32))
    with pytest.raises(ExtractionError):
        grid_to_mesh(np.full((9, 9, 9), np.nan, dtype=np.float32))


def test_hierarchical_rejects_non_power_of_two_ratio():
    field = lambda p: -sd_sphere(p, [0.0, 0.0, 0.0], 0.5)  # noqa: E731
    for res, coarse in ((96, 32), (192, 32), (100, 64)):
        with pytest.raises(ValueError, match="power of two"):
            hierarchical_grid(field, res, coarse)


def test_decoder_failures_raise():
    with pytest.raises(ExtractionError, match="non-finite"):
        dense_grid(lambda p: torch.full((len(p),), float("nan")), 8)
    with pytest.raises(ValueError):
        dense_grid(lambda p: torch.zeros(len(p), 2), 8)


def test_postprocess_drops_floater_and_decimates():
    big = lambda p: sd_sphere(p, [-0.3, 0.0, 0.0], 0.6)  # noqa: E731
    floater = lambda p: sd_sphere(p, [0.65, 0.6, 0.0], 0.05)  # noqa: E731
    grid, _ = dense_grid(lambda p: -50.0 * union(big(p), floater(p)), 96)
    raw = grid_to_mesh(grid)
    assert len(raw.split(only_watertight=False)) == 2
    kept_all = postprocess(raw, min_component_fraction=0.0)
    assert len(kept_all.split(only_watertight=False)) == 2
    clean = postprocess(raw)
    parts = clean.split(only_watertight=False)
    assert len(parts) == 1 and parts[0].bounds[1, 0] < 0.35  # the big sphere is what is left

    target = 3000
    small = postprocess(raw, target_faces=target)
    print(f"\ndecimation: {len(clean.faces)} -> {len(small.faces)} faces (target {target})")
    assert abs(len(small.faces) - target) <= 0.2 * target
    assert small.volume > 0 and small.vertex_normals.shape == small.vertices.shape


def test_extract_mesh_end_to_end():
    field = lambda p: -50.0 * sd_torus(p, [0.0, 0.0, 0.0], 0.5, 0.2)  # noqa: E731
    mesh, stats = extract_mesh(field, resolution=128)
    assert stats["hierarchical"] and stats["n_queries"] < 129 ** 3
    assert {"n_queries", "decode_seconds", "mesh_seconds", "n_vertices", "n_faces"} <= set(stats)
    assert stats["n_faces"] == len(mesh.faces) and mesh.volume > 0
    ref = 2 * np.pi ** 2 * 0.5 * 0.2 ** 2  # torus volume
    assert abs(mesh.volume / ref - 1) < 0.03
    dense_mesh, dense_stats = extract_mesh(field, resolution=128, hierarchical=False)
    assert dense_stats["n_queries"] == 129 ** 3
    assert len(dense_mesh.faces) == len(mesh.faces)


def test_grid_helpers_match_torch_reference():
    # The numpy helpers are separable rewrites of 3-D pooling / trilinear upsampling.
    import torch.nn.functional as F

    from mar3d.extract import _cell_minmax, _dilate, _refine_points, _upsample

    rng = np.random.default_rng(0)
    g = rng.normal(size=(9, 9, 9)).astype(np.float32)
    t = torch.from_numpy(g)[None, None]
    lo, hi = _cell_minmax(g)
    np.testing.assert_array_equal(hi, F.max_pool3d(t, 2, 1)[0, 0].numpy())
    np.testing.assert_array_equal(lo, -F.max_pool3d(-t, 2, 1)[0, 0].numpy())
    up = F.interpolate(t, size=(17, 17, 17), mode="trilinear", align_corners=True)[0, 0]
    np.testing.assert_allclose(_upsample(g), up.numpy(), atol=1e-6)

    cells = rng.random((8, 8, 8)) > 0.95
    c = torch.from_numpy(cells)[None, None].float()
    np.testing.assert_array_equal(_dilate(cells, 1), F.max_pool3d(c, 3, 1, 1)[0, 0].numpy() > 0)
    fine = c.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    corners = F.max_pool3d(fine, 2, 1, 1)  # corners of marked fine cells ...
    halo = F.max_pool3d(corners, 3, 1, 1)[0, 0].numpy() > 0  # ... plus one point
    np.testing.assert_array_equal(_refine_points(cells), halo)


def test_extract_drops_parts_at_the_box_faces():
    """Occupancy that reaches the decoded box's faces (outside the ±0.95 training volume) is an
    open, cut surface: extract_mesh drops it; parts inside the volume stay, the mesh is watertight."""
    body = lambda p: sd_sphere(p, [0.0, 0.0, 0.0], 0.5)  # noqa: E731
    wheel = lambda p: sd_sphere(p, [0.0, -0.7, 0.6], 0.12)  # noqa: E731  a real detached part
    corner = lambda p: sd_box(p, [-1.05, 0.3, 1.05], [0.12, 0.12, 0.12])  # noqa: E731  cut by the box
    sdf = lambda p: union(union(body(p), wheel(p)), corner(p))  # noqa: E731
    raw = postprocess(grid_to_mesh(dense_grid(lambda p: -50.0 * sdf(p), 64)[0]), keep_within=None)
    assert len(raw.split(only_watertight=False)) == 3 and not raw.is_watertight
    mesh, _ = extract_mesh(lambda p: -50.0 * sdf(p), resolution=64)
    parts = mesh.split(only_watertight=False)
    assert len(parts) == 2 and mesh.is_watertight
    assert np.abs(mesh.bounds).max() < 0.95
