"""The tiny VAE learns a real mesh, and the reconstruct CLI turns it back into a mesh."""

import json
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from mar3d.geometry import PrepareConfig, load_mesh, normalize_mesh, prepare_shape
from mar3d.train import TrainConfig, train
from mar3d.vae import PRESETS
from tests.conftest import data_mesh


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """Train the tiny preset on one real mesh (spot.obj) for a few CPU-minutes."""
    root = tmp_path_factory.mktemp("overfit")
    mesh, _, _ = normalize_mesh(load_mesh(data_mesh("spot.obj")))
    arrays = prepare_shape(mesh, PrepareConfig(num_surface=2048, num_uniform=16384, num_near=16384), seed=0)
    (root / "data").mkdir()
    np.savez(root / "data" / "spot.npz", **arrays)
    cfg = TrainConfig(steps=1000, batch_size=8, lr=2e-3, warmup=50, queries=2048, log_every=200,
                      eval_every=1000, save_every=1000, val_percent=0.0)
    last = train("vae", PRESETS["tiny"], cfg, root / "data", root / "run")
    return root, mesh, last


@pytest.mark.slow
def test_tiny_vae_overfits_one_real_mesh(overfit_run):
    _, _, last = overfit_run
    print("overfit IoU:", last)
    assert last["train_iou_hr"] >= 0.9
    assert last["train_iou_lr"] >= 0.8


@pytest.mark.slow
def test_reconstruct_cli_round_trip(overfit_run, tmp_path):
    root, mesh, _ = overfit_run
    out = tmp_path / "spot.glb"
    proc = subprocess.run([sys.executable, "-m", "mar3d.reconstruct", str(data_mesh("spot.obj")), "-o", str(out),
                           "--checkpoint", str(root / "run"), "--resolution", "128", "--evaluate"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    print("reconstruction:", record)
    assert record["n_tokens"] == PRESETS["tiny"].hr_tokens
    assert record["metrics"]["fscore@0.05"] >= 0.8
    loaded = trimesh.load(out, force="mesh")
    assert len(loaded.faces) > 100 and np.all(np.abs(loaded.bounds) <= 1.05)


def test_reconstruct_cli_clear_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mar3d.reconstruct", str(data_mesh("spot.obj")), "-o",
                           str(tmp_path / "x.glb"), "--checkpoint", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "vae.json: missing" in proc.stderr
