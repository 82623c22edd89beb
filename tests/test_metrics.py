"""Tests for mar3d.metrics and the mar3d.evaluate CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from mar3d.geometry import normalize_mesh
from mar3d.metrics import compare_meshes, sample_surface

ROOT = Path(__file__).resolve().parents[1]
N = 20_000  # fewer points than the protocol's 100k: fast, and plenty for these checks


def shape():
    """Asymmetric test shape: box with a sphere on one corner."""
    box = trimesh.creation.box(extents=[0.8, 0.4, 0.5])
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.2)
    ball.apply_translation([0.4, 0.2, 0.25])
    return trimesh.util.concatenate([box, ball])


def test_self_comparison_is_perfect():
    m = shape()
    r = compare_meshes(m, m, n_points=N)
    assert r["chamfer"] < 1e-9
    assert r["fscore@0.02"] == 1.0 and r["fscore@0.05"] == 1.0
    assert r["normal_consistency"] > 0.999


def test_different_tessellations_of_one_sphere_score_nearly_perfect():
    a = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    b = trimesh.creation.uv_sphere(radius=0.5, count=[128, 128])
    r = compare_meshes(a, b, n_points=N, normalize=False)
    # floor of the protocol: ~half the sample spacing sqrt(area / N) = 0.0125 here
    assert r["chamfer"] < 0.01
    assert r["fscore@0.02"] > 0.99 and r["normal_consistency"] > 0.98


def test_scaled_sphere_matches_analytic_gap():
    r0, scale = 0.5, 1.1
    a = trimesh.creation.icosphere(subdivisions=5, radius=r0)
    b = a.copy()
    b.apply_scale(scale)
    r = compare_meshes(a, b, n_points=N, normalize=False)
    gap = r0 * (scale - 1)  # every point is 0.05 from the other sphere, both ways
    print(f"\nchamfer {r['chamfer']:.5f} vs analytic gap {gap:.5f}")
    assert abs(r["chamfer"] - gap) < 0.05 * gap
    assert r["fscore@0.02"] == 0.0 and r["normal_consistency"] > 0.99
    # normalisation maps both to the same sphere
    assert compare_meshes(a, b, n_points=N)["chamfer"] < 1e-6


def test_normalize_removes_scale_and_translation():
    a = shape()
    b = a.copy()
    b.apply_scale(2.3)
    b.apply_translation([1.0, -2.0, 3.0])
    good = compare_meshes(b, a, n_points=N)
    assert good["chamfer"] < 1e-6 and good["fscore@0.02"] == 1.0
    assert good["normal_consistency"] > 0.999
    bad = compare_meshes(b, a, n_points=N, normalize=False)
    assert bad["chamfer"] > 1.0 and bad["fscore@0.05"] == 0.0
    n = normalize_mesh(b)[0]
    np.testing.assert_allclose(n.bounds.mean(axis=0), 0, atol=1e-9)
    assert abs(n.extents.max() - 1.9) < 1e-9


def test_sampling_is_area_weighted_and_deterministic():
    # two unit squares, one 3x the area: ~75 % of the samples land on the big one
    big = trimesh.creation.box(extents=[np.sqrt(3), np.sqrt(3), 1e-3])
    small = trimesh.creation.box(extents=[1.0, 1.0, 1e-3])
    small.apply_translation([5.0, 0, 0])
    m = trimesh.util.concatenate([big, small])
    pts, nrm = sample_surface(m, 40_000, seed=1)
    frac_big = (pts[:, 0] < 2.5).mean()
    assert abs(frac_big - 0.75) < 0.01
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0)
    again, _ = sample_surface(m, 40_000, seed=1)
    np.testing.assert_array_equal(pts, again)
    r1 = compare_meshes(shape(), big, n_points=5000, seed=3)
    r2 = compare_meshes(shape(), big, n_points=5000, seed=3)
    assert r1 == r2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mar3d.evaluate", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_json(tmp_path):
    a = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    b = a.copy()
    b.apply_scale(1.5)
    a.export(tmp_path / "pred.ply")
    b.export(tmp_path / "gt.obj")
    out = run_cli(tmp_path / "pred.ply", tmp_path / "gt.obj", "--json", "--points", 5000)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["chamfer"] < 1e-6 and result["fscore@0.02"] == 1.0  # normalised: same sphere
    assert {"fscore@0.05", "normal_consistency"} <= set(result)
    raw = json.loads(run_cli(tmp_path / "pred.ply", tmp_path / "gt.obj", "--json",
                             "--points", 5000, "--no-normalize").stdout)
    assert raw["chamfer"] == pytest.approx(0.25, rel=0.05)
    table = run_cli(tmp_path / "pred.ply", tmp_path / "gt.obj", "--points", 2000)
    assert table.returncode == 0 and "| chamfer |" in table.stdout


def test_cli_errors(tmp_path):
    out = run_cli(tmp_path / "missing.glb", tmp_path / "also_missing.obj")
    assert out.returncode == 2
    assert "missing.glb" in out.stderr and "Traceback" not in out.stderr
    junk = tmp_path / "junk.obj"
    junk.write_text("this is not a mesh\n")
    out = run_cli(junk, junk)
    assert out.returncode == 2 and "junk.obj" in out.stderr
    helptext = run_cli("--help").stdout
    assert "halved" in helptext and "1.9" in helptext


def test_cli_directories(tmp_path):
    """Directory mode pairs meshes by stem; a missing prediction is a failure scored F = 0."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    box = trimesh.creation.box((1.0, 0.4, 0.6))
    sphere.export(gt / "a.obj"), box.export(gt / "b.ply"), box.export(gt / "c.ply")
    sphere.export(pred / "a.ply")                  # right shape
    sphere.export(pred / "b.ply")                  # wrong shape; c has no prediction
    out = run_cli(pred, gt, "--json", "--points", 4000)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    rows = {r["shape"]: r for r in result["rows"]}
    assert result["count"] == 3 and result["failed"] == 1 and "error" in rows["c"]
    assert rows["a"]["fscore@0.05"] == 1.0 and rows["b"]["fscore@0.05"] < 0.9
    assert result["summary"]["median_fscore@0.05"] == rows["b"]["fscore@0.05"]  # median of (1, F_b, 0)
    assert result["summary"]["median_chamfer"] == pytest.approx((rows["a"]["chamfer"] + rows["b"]["chamfer"]) / 2)
    table = run_cli(pred, gt, "--points", 2000)
    assert table.returncode == 0 and "| fscore@0.05 |" in table.stdout


def test_slab_share_of_boxes_and_a_sphere():
    from mar3d.metrics import slab_share

    # a box w × h × d: top and bottom are 2·w·d of the area 2(wh + wd + hd)
    for w, h, d in ((1.0, 1.0, 1.0), (2.0, 0.1, 1.0), (0.2, 3.0, 0.5)):
        box = trimesh.creation.box((w, h, d))
        assert slab_share(box) == pytest.approx(2 * w * d / (2 * (w * h + w * d + h * d)), abs=1e-9)
    # a sphere: |n_y| > 0.95 on two caps of height 0.05 r each → 5 % of the area (up to facetting)
    assert slab_share(trimesh.creation.icosphere(subdivisions=5)) == pytest.approx(0.05, abs=0.01)
