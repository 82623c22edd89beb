"""scripts/ablations.py end to end at micro size: pack → both ablations → results.json."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from mar3d.checkpoint import load_model
from mar3d.data import is_held_out
from mar3d.render import Camera
from tests.conftest import MICRO_MAR, MICRO_VAE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablations.py"
VAL_PERCENT = 30.0


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablations"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def fake_demo(root: Path, n_train: int = 4, n_held: int = 2) -> None:
    """A train_demo work directory in miniature: spheres and boxes with prepared npz, renders, cameras."""
    rng = np.random.default_rng(0)
    names, i = [], 0
    while sum(map(lambda n: is_held_out(n, VAL_PERCENT), names)) < n_held or \
            sum(map(lambda n: not is_held_out(n, VAL_PERCENT), names)) < n_train:
        name = f"shape_{i:03d}"
        held = is_held_out(name, VAL_PERCENT)
        if (held and sum(map(lambda n: is_held_out(n, VAL_PERCENT), names)) < n_held) or \
                (not held and sum(map(lambda n: not is_held_out(n, VAL_PERCENT), names)) < n_train):
            names.append(name)
        i += 1
    for d in ("shapes", "prepared", "renders"):
        (root / d).mkdir(parents=True)
    for k, name in enumerate(names):
        if k % 2:
            half = rng.uniform(0.3, 0.6, 3)
            mesh = trimesh.creation.box(extents=2 * half)
            inside = lambda p: np.all(np.abs(p) < half, axis=1)  # noqa: E731
        else:
            r = rng.uniform(0.4, 0.8)
            mesh = trimesh.creation.icosphere(subdivisions=2, radius=r)
            inside = lambda p: np.linalg.norm(p, axis=1) < r  # noqa: E731
        mesh.export(root / "shapes" / f"{name}.ply")
        pts, face = trimesh.sample.sample_surface(mesh, 512, seed=k)
        uniform = rng.uniform(-1.05, 1.05, (1024, 3))
        near = pts[rng.integers(0, len(pts), 1024)] + rng.normal(scale=0.03, size=(1024, 3))
        np.savez(root / "prepared" / f"{name}.npz",
                 surface=np.concatenate([pts, mesh.face_normals[face]], 1).astype(np.float32),
                 uniform_points=uniform.astype(np.float32), uniform_labels=inside(uniform),
                 near_points=near.astype(np.float32), near_labels=inside(near),
                 center=np.zeros(3), scale=np.float64(1.0), source=np.array(f"{name}.ply"))
        folder = root / "renders" / name
        folder.mkdir()
        cameras = []
        for view in range(2):
            rgba = np.zeros((64, 64, 4), np.uint8)
            rgba[16:48, 20:44] = (200, 50 + 100 * (k % 2), 80, 255)
            Image.fromarray(rgba).save(folder / f"{view}.png")
            cameras.append(Camera(float(rng.uniform(0, 360)), 20.0, 3.0, 40.0, 64).to_dict())
        (folder / "cameras.json").write_text(json.dumps(cameras))


def test_ablations_end_to_end(ablations, tmp_path):
    fake_demo(tmp_path / "demo")
    summary = ablations.build_pack(tmp_path / "demo", tmp_path / "pack", n_train=3, views=2, pool=512,
                                   surface_points=256, val_percent=VAL_PERCENT)
    assert (summary["train_shapes"], summary["held_out_shapes"], summary["images"]) == (3, 2, 3 * 2 + 2)

    cfg = ablations.AblationConfig(device="cpu", val_percent=VAL_PERCENT, vae_steps=4, vae_batch=4, mar_steps=6,
                                   mar_batch=4, threads=1, parallel=False, lr_steps=2, hr_steps=2, direct_steps=4,
                                   diffusion_steps=4, resolution=16, n_points=500, workers=0)
    out = tmp_path / "out"
    results = ablations.run(cfg, tmp_path / "pack", out, tmp_path / "work", vae_base=MICRO_VAE, mar_base=MICRO_MAR)

    # (a): the arms differ only in the pyramid levels, at the same token count, steps and batch
    pyramid, single = (load_model(out / f"vae_{arm}", "vae") for arm in ("pyramid", "single"))
    assert (len(pyramid.level_attn), len(single.level_attn)) == (3, 1)
    assert {k: v for k, v in vars(pyramid.cfg).items() if k != "num_levels"} == \
           {k: v for k, v in vars(single.cfg).items() if k != "num_levels"}
    surface = torch.randn(2, MICRO_VAE.num_points, 6)
    assert pyramid.encode(surface).shape == single.encode(surface).shape == (2, MICRO_VAE.hr_tokens, MICRO_VAE.latent_dim)
    arms = results["a_training"]["arms"]
    assert arms["pyramid"]["steps"] == arms["single"]["steps"] == 4
    assert arms["pyramid"]["batch"] == arms["single"]["batch"]
    for arm in ("pyramid", "single"):
        assert 0.0 <= results["a_iou"][arm]["val_iou_hr"] <= 1.0

    # (b): the same training budget; the direct MAR has no LR prefix, MAR-HR has one
    budget = results["b_training"]["budget"]
    assert budget["cascade_lr"] + budget["cascade_hr"] == budget["direct"] == 6
    runs = results["b_training"]["runs"]
    assert [runs[t]["steps"] for t in ("mar_lr", "mar_hr", "mar_direct")] == [3, 3, 6]
    direct = load_model(tmp_path / "work" / "direct", "mar_direct")
    mar_hr = load_model(tmp_path / "work" / "cascade", "mar_hr")
    assert direct.cfg.lr_seq_len == 0 and direct.cfg.seq_len == MICRO_VAE.hr_tokens
    assert mar_hr.cfg.lr_seq_len == MICRO_VAE.lr_tokens and mar_hr.cfg.seq_len == MICRO_VAE.hr_tokens

    # results: every arm scored on every held-out shape, finite numbers
    m = results["metrics"]
    assert m["shapes"] == 2 and len(m["rows"]) == 2
    for arm in ("pyramid", "single", "cascade", "direct"):
        assert 0.0 <= m[arm]["fscore@0.05"] <= 1.0 and 0.0 <= m[arm]["fscore@0.02"] <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]) >= {"pyramid", "single", "cascade", "direct", "pyramid_vs_single", "cascade_vs_direct"}


def test_score_turns_the_ground_truth_into_the_view(ablations):
    """A box's exact occupancy grid scores ~1 against the box, and less once the box is turned 45°."""
    half = np.array([0.8, 0.3, 0.3])
    box = trimesh.creation.box(extents=2 * half)
    ax = np.linspace(-1.05, 1.05, 33)
    p = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    grid = (np.min(half - np.abs(p), axis=-1) * 20).astype(np.float32)  # positive inside
    v, f = np.asarray(box.vertices, np.float32), np.asarray(box.faces, np.int32)
    _, same = ablations._score(("k", grid, v, f, None, 2000))
    _, turned = ablations._score(("k", grid, v, f, Camera(45.0, 0.0, 3.0, 40.0, 64).to_dict(), 2000))
    assert same["fscore@0.05"] > 0.85
    assert turned["fscore@0.05"] < same["fscore@0.05"] - 0.2


def test_paired_comparison(ablations):
    a = [{"fscore@0.05": 0.9, "chamfer": 0.02}, None, {"fscore@0.05": 0.5, "chamfer": 0.05}]
    b = [{"fscore@0.05": 0.8, "chamfer": 0.03}, {"fscore@0.05": 0.4, "chamfer": 0.04}, {"fscore@0.05": 0.5, "chamfer": 0.06}]
    f = ablations.paired(a, b, "fscore@0.05")
    assert f["n"] == 3 and f["a_better"] == 1 and f["ties"] == 1
    assert f["mean_diff"] == pytest.approx((0.1 - 0.4 + 0.0) / 3)
    c = ablations.paired(a, b, "chamfer")  # failed extractions leave the Chamfer comparison
    assert c["n"] == 2 and c["a_better"] == 2 and math.isclose(c["mean_diff"], -0.01)


def test_grid_decoder_matches_dense_grid(ablations):
    """The GPU path (every grid point at once) decodes exactly mar3d.extract.dense_grid's points."""
    from mar3d.extract import dense_grid
    from mar3d.vae import PyramidVAE

    torch.manual_seed(0)
    vae = PyramidVAE(MICRO_VAE).eval()
    latents = torch.randn(1, MICRO_VAE.hr_tokens, MICRO_VAE.latent_dim)
    fast = ablations.GridDecoder(12, torch.device("cpu"), chunk=500, fast=True)(vae, latents)
    reference = dense_grid(vae.occupancy_fn(latents), 12)[0]
    np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-5)
