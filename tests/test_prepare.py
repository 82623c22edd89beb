"""Tests for mar3d.prepare: batch preparation of a mesh folder into npz files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from mar3d.geometry import PrepareConfig, load_mesh
from mar3d.prepare import _atomic_write, prepare_dir, shape_name, shape_seed
from tests.conftest import data_mesh

REPO = Path(__file__).resolve().parents[1]
SMALL = PrepareConfig(num_surface=1024, num_uniform=2048, num_near=2048)
ARRAYS = ["surface", "uniform_points", "uniform_labels", "near_points", "near_labels"]
GOOD = ["animals__spot", "torus"]
# Bad file -> what its failure reason must mention.
BAD = {"bad.obj": "no faces", "empty.ply": "cannot read", "cloud.ply": "point cloud", "junk/nan.obj": "NaN"}


@pytest.fixture
def mesh_dir(tmp_path):
    """2 real meshes (one nested, one with an upper-case extension) and 4 bad files."""
    root = tmp_path / "meshes"
    (root / "animals").mkdir(parents=True)
    (root / "junk").mkdir()
    shutil.copy(data_mesh("spot.obj"), root / "animals" / "spot.obj")
    shutil.copy(data_mesh("torus.obj"), root / "torus.OBJ")
    (root / "bad.obj").write_text("this is not a mesh\n")
    (root / "empty.ply").write_bytes(b"")
    trimesh.PointCloud(np.random.default_rng(0).random((100, 3))).export(root / "cloud.ply")
    (root / "junk" / "nan.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    (root / "notes.txt").write_text("not a mesh extension: ignored\n")
    return root


def load_npz(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def test_names_and_seeds():
    assert shape_name(Path("a") / "b" / "c.obj") == "a__b__c"
    assert shape_name("chair.v2.glb") == "chair.v2"
    assert shape_seed("a__b__c") == shape_seed("a__b__c") != shape_seed("a__b__d")


def test_prepare_dir_good_bad_and_rerun(mesh_dir, tmp_path):
    out = tmp_path / "out"
    report = prepare_dir(mesh_dir, out, SMALL)

    assert report["prepared"] == GOOD
    assert report["skipped_existing"] == []
    failed = {item["source"]: item["reason"] for item in report["failed"]}
    assert set(failed) == set(BAD)
    for source, expected in BAD.items():
        assert expected in failed[source], (source, failed[source])
    assert report["config"]["num_surface"] == 1024
    assert json.loads((out / "report.json").read_text()) == report
    assert sorted(p.name for p in out.iterdir()) == ["animals__spot.npz", "report.json", "torus.npz"]  # no temp files

    data = load_npz(out / "animals__spot.npz")
    assert set(data) == set(ARRAYS) | {"center", "scale", "source"}
    assert str(data["source"]) == "animals/spot.obj"
    assert data["surface"].shape == (1024, 6) and data["uniform_labels"].shape == (2048,)
    # center/scale reproduce the normalisation of the source mesh.
    v = (load_mesh(mesh_dir / "animals" / "spot.obj").vertices - data["center"]) * data["scale"]
    assert np.isclose(np.ptp(v, axis=0).max(), 1.9) and np.abs(v).max() <= 0.95 + 1e-9

    # A rerun prepares nothing new and leaves the files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    again = prepare_dir(mesh_dir, out, SMALL)
    assert again["prepared"] == [] and again["skipped_existing"] == GOOD
    assert {item["source"] for item in again["failed"]} == set(BAD)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == mtimes


def test_parallel_equals_serial(mesh_dir, tmp_path):
    serial = prepare_dir(mesh_dir, tmp_path / "serial", SMALL, workers=1)
    parallel = prepare_dir(mesh_dir, tmp_path / "parallel", SMALL, workers=2)
    assert parallel == serial
    for name in GOOD:
        a, b = load_npz(tmp_path / "serial" / f"{name}.npz"), load_npz(tmp_path / "parallel" / f"{name}.npz")
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            assert a[key].tobytes() == b[key].tobytes(), key


def test_prepare_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare_dir(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no meshes here")
    with pytest.raises(ValueError, match="no mesh files"):
        prepare_dir(tmp_path / "empty", tmp_path / "out")


def test_atomic_write_leaves_no_half_file(tmp_path):
    target = tmp_path / "shape.npz"

    def interrupted(f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(target, interrupted)
    assert list(tmp_path.iterdir()) == []
    _atomic_write(target, lambda f: f.write(b"done"))
    assert target.read_bytes() == b"done"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mar3d.prepare", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli(mesh_dir, tmp_path):
    out = tmp_path / "out"
    small = ["--num-surface", 256, "--num-uniform", 512, "--num-near", 512, "--near-sigmas", 0.01, 0.1]
    result = run_cli(mesh_dir, out, "--workers", 1, *small)
    assert result.returncode == 0, result.stderr
    assert "prepared 2, skipped (existing) 0, failed 4" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["prepared"] == GOOD and report["config"]["near_sigmas"] == [0.01, 0.1]
    assert load_npz(out / "torus.npz")["surface"].shape == (256, 6)

    missing = run_cli(tmp_path / "missing", out)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "nothing").mkdir()
    empty = run_cli(tmp_path / "nothing", out)
    assert empty.returncode == 2 and "no mesh files" in empty.stderr
