"""Tests for mar3d.shapes: procedural families, real-mesh variants and the dataset builder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from mar3d import shapes
from mar3d.geometry import PrepareConfig, load_mesh, normalize_mesh, prepare_shape
from mar3d.shapes import FAMILIES, build_dataset, make_shape, real_variant, shape_seed
from tests.conftest import data_mesh as real_mesh

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"chair", "table", "stool", "sofa", "shelf", "mug", "vase_bottle", "lamp", "car", "aircraft", "animal"}


def test_families_registered():
    assert REQUIRED <= set(FAMILIES) and len(FAMILIES) >= 10


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_meshes_are_valid(family):
    meshes = [make_shape(family, seed) for seed in range(3)]
    for mesh in meshes:
        assert mesh.is_watertight and mesh.body_count == 1
        assert mesh.volume > 0  # outward normals
        assert np.isfinite(mesh.vertices).all()
        assert 20 < len(mesh.faces) < 50_000
        lo, hi = mesh.bounds
        assert lo[1] == pytest.approx(0.0, abs=1e-9)  # stands on y = 0
        assert np.allclose((lo + hi)[[0, 2]], 0.0, atol=1e-9)  # centred in x and z
        assert mesh.extents[1] > 0.1 * mesh.extents.max()  # not flat
    # deterministic per (family, seed); different seeds give visibly different shapes
    again = make_shape(family, 0)
    assert np.array_equal(again.vertices, meshes[0].vertices) and np.array_equal(again.faces, meshes[0].faces)
    signatures = {tuple(np.round(np.append(m.extents, m.volume), 6)) for m in meshes}
    assert len(signatures) == 3


def _contact_quadrants(mesh: trimesh.Trimesh) -> set:
    """Quadrants (sign x, sign z) around their mean of the vertices touching the floor."""
    v = mesh.vertices
    touch = v[v[:, 1] < 1e-3 * mesh.extents[1]]
    centre = touch.mean(axis=0)
    return {(bool(x > centre[0]), bool(z > centre[2])) for x, _, z in touch}


def _top(mesh: trimesh.Trimesh, frac: float = 1e-6) -> np.ndarray:
    v = mesh.vertices
    return v[v[:, 1] > mesh.bounds[1, 1] - frac * mesh.extents[1]]


SEEDS = range(4)


def test_car_stands_on_four_wheels_nose_along_z():
    for seed in SEEDS:
        mesh = make_shape("car", seed)
        x, y, z = mesh.extents
        assert z > 1.5 * y and z > x
        assert len(_contact_quadrants(mesh)) == 4


def test_animal_four_feet_head_in_front():
    for seed in SEEDS:
        mesh = make_shape("animal", seed)
        assert len(_contact_quadrants(mesh)) == 4
        assert _top(mesh)[:, 2].min() > 0  # the highest point (head or ears) is at +Z


def test_aircraft_span_and_nose():
    for seed in SEEDS:
        mesh = make_shape("aircraft", seed)
        x, y, z = mesh.extents
        assert x > 2 * y and z > 2 * y
        nose = mesh.vertices[mesh.vertices[:, 2].argmax()]
        assert abs(nose[0]) < 0.05 * x  # the foremost point is the fuselage nose, on the axis
        assert _top(mesh, 0.05)[:, 2].max() < 0  # the fin is at the tail (-Z)


def test_backs_at_minus_z():
    for family in ("chair", "sofa", "bed"):
        for seed in SEEDS:
            assert _top(make_shape(family, seed))[:, 2].max() < 0, (family, seed)


def test_mug_is_not_convex():
    for seed in SEEDS:
        mesh = make_shape("mug", seed)
        assert mesh.volume < 0.95 * mesh.convex_hull.volume  # handle hole and cavity


def test_family_proportions():
    for seed in SEEDS:
        shelf = make_shape("shelf", seed).extents
        assert shelf[1] > 1.15 * shelf[0] and shelf[0] > shelf[2]  # tall bookcase, shallow
        vase = make_shape("vase_bottle", seed).extents
        assert vase[0] == pytest.approx(vase[2], rel=0.02)  # surface of revolution
        for family in ("rocket", "tower"):
            ext = make_shape(family, seed).extents
            assert ext[1] > 1.2 * max(ext[0], ext[2]), family
        bench = make_shape("bench", seed).extents
        assert bench[0] > 1.5 * bench[2]
        for family in ("table", "stool"):  # a flat top at full height
            mesh = make_shape(family, seed)
            top = _top(mesh)
            assert np.ptp(top[:, 0]) > 0.5 * mesh.extents[0], family
        lamp = make_shape("lamp", seed)
        base = lamp.vertices[lamp.vertices[:, 1] < 1e-9]
        assert np.ptp(base[:, 0]) > 0.1 * lamp.extents[1]  # stands on a base, not a point


def test_real_variant_is_a_random_pose_and_stretch():
    path = real_mesh("torus.obj")
    src = load_mesh(path)
    a, b, c = real_variant(path, 0), real_variant(path, 0), real_variant(path, 1)
    assert np.array_equal(a.vertices, b.vertices) and not np.allclose(a.vertices, c.vertices)
    assert np.array_equal(a.faces, src.faces) and a.is_watertight and a.volume > 0
    assert a.bounds[0, 1] == pytest.approx(0.0, abs=1e-9)
    # The variant is v -> A v + t with A = R S: S a per-axis stretch, R a turn about +Y and a small tilt.
    hom = np.c_[src.vertices, np.ones(len(src.vertices))]
    A = np.linalg.lstsq(hom, a.vertices, rcond=None)[0][:3].T
    stretch = np.linalg.norm(A, axis=0)
    assert np.all((stretch > 0.8 - 1e-6) & (stretch < 1.2 + 1e-6))
    R = A / stretch
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-6) and np.linalg.det(R) > 0
    assert np.degrees(np.arccos(np.clip(R[1, 1], -1, 1))) <= 10 + 1e-6


def test_real_variant_turns_z_up_scans_upright():
    mesh = real_variant(real_mesh("ycb_mustard_bottle.obj"), 0)
    assert mesh.extents.argmax() == 1  # a bottle stands tall along +Y


def test_build_dataset(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for name in ("torus.obj", "penguin_parts.obj"):  # one closed, one open mesh
        shutil.copy(real_mesh(name), real_dir / name)
    out = tmp_path / "shapes"
    count = 2 * len(FAMILIES)
    report = build_dataset(out, count, seed=0, real_dir=real_dir, real_variants=2)

    expected = {f"{f}_{i:05d}.ply" for f in FAMILIES for i in range(2)}
    expected |= {f"real__{stem}@{k:02d}.ply" for stem in ("torus", "penguin_parts") for k in range(2)}
    assert {p.name for p in out.glob("*.ply")} == expected
    assert report["counts"] == {**{f: 2 for f in FAMILIES}, "real": 4}
    assert report["written"] == len(expected) and report["failures"] == [] and report["total"] == len(expected)
    assert json.loads((out / "shapes.json").read_text())["counts"] == report["counts"]

    # files hold the same shape as make_shape with the derived seed
    chair = load_mesh(out / "chair_00001.ply")
    assert np.allclose(np.sort(chair.vertices, axis=0),
                       np.sort(make_shape("chair", shape_seed(0, "chair", 1)).vertices, axis=0), atol=1e-5)

    # resumable: a rerun writes nothing; a larger count adds only the new files
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.ply")}
    again = build_dataset(out, count, seed=0, real_dir=real_dir, real_variants=2)
    assert again["written"] == 0 and again["skipped_existing"] == len(expected)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.ply")} == mtimes
    more = build_dataset(out, count + 1, seed=0)
    assert more["written"] == 1 and (out / f"{next(iter(FAMILIES))}_00002.ply").exists()

    # every file loads; procedural ones stay watertight through load_mesh's clean-up
    for path in sorted(out.glob("*.ply")):
        mesh = load_mesh(path)
        if not path.name.startswith("real__penguin_parts"):
            assert mesh.is_watertight, path.name

    # occupancy labels of prepared shapes agree with the volume
    cfg = PrepareConfig(num_surface=512, num_uniform=2048, num_near=2048)
    for name in ("chair_00000.ply", "real__torus@01.ply"):
        mesh, _, _ = normalize_mesh(load_mesh(out / name))
        arrays = prepare_shape(mesh, cfg, seed=0)
        expected_frac = mesh.volume / (2 * cfg.bounds) ** 3
        assert arrays["uniform_labels"].mean() == pytest.approx(expected_frac, abs=0.02), name


def test_build_dataset_reports_a_failing_family(tmp_path, monkeypatch):
    def broken(rng):
        raise RuntimeError("boom")

    monkeypatch.setitem(FAMILIES, "mug", broken)
    report = build_dataset(tmp_path, len(FAMILIES), seed=0)
    assert [f["name"] for f in report["failures"]] == ["mug_00000"]
    assert "RuntimeError: boom" in report["failures"][0]["error"]
    assert report["counts"]["mug"] == 0 and report["written"] == len(FAMILIES) - 1
    assert not (tmp_path / "mug_00000.ply").exists() and (tmp_path / "car_00000.ply").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no leftover temp files


def test_counts_spread_evenly():
    jobs = shapes._plan(Path("/nonexistent"), len(FAMILIES) + 2, 0, None, 0)
    per_family = {f: sum(1 for j in jobs if j[1] == f) for f in FAMILIES}
    assert sorted(per_family.values()) == [1] * (len(FAMILIES) - 2) + [2, 2]


def test_cli_parallel(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "mar3d.shapes", str(out), "--count", str(len(FAMILIES)),
                             "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "shapes.json").read_text())
    assert report["total"] == len(FAMILIES) and report["failures"] == []
    serial = make_shape("lamp", shape_seed(0, "lamp", 0))
    assert len(load_mesh(out / "lamp_00000.ply").faces) == len(serial.faces)


def test_plan_over_chosen_families():
    jobs = shapes._plan(Path("/nonexistent"), 5, 0, None, 0, families=["mug", "plush"])
    assert [j[-1].name for j in jobs] == ["mug_00000.ply", "mug_00001.ply", "mug_00002.ply",
                                          "plush_00000.ply", "plush_00001.ply"]


def test_plush_sits_or_stands_on_its_feet():
    """A plush quadruped touches the floor in at least three of the four quadrants around its
    contact points (four feet, or two front paws and the haunches)."""
    for seed in range(6):
        mesh = make_shape("plush", seed)
        assert len(_contact_quadrants(mesh)) >= 3, seed
        assert mesh.extents[2] > 0.5 * mesh.extents[1]  # a body along z, not a column
