"""The pipeline and the generate CLI, on a micro cascade trained on two shapes (tests/conftest.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh

from mar3d.carve import outline_distance, signed_distance
from mar3d.colour import ALPHA_OBJECT, fit_view
from mar3d.pipeline import PREVIEW_RESOLUTION, MAR3DPipeline, Settings
from mar3d.train import occupancy_iou
from tests.conftest import data_image

FAST = Settings(lr_steps=4, hr_steps=8, diffusion_steps=25, resolution=64)
CHAIR = data_image("instantmesh_chair_wood.jpg")


@pytest.fixture(scope="module")
def pipe(tiny_cascade):
    root, _ = tiny_cascade
    return MAR3DPipeline.from_pretrained(root / "cascade")


@pytest.mark.slow
def test_pipeline_generates_the_shape_in_the_picture(pipe, tiny_cascade):
    root, names = tiny_cascade
    stages, previews = [], []
    result = pipe(CHAIR, FAST, on_lr_mesh=previews.append, progress=lambda *a: stages.append(a))
    assert result.background_method == "fallback" and result.image.size == (32, 32)
    assert [s for s in stages if s[0] == "lr"] == [("lr", i, 4) for i in (1, 2, 3, 4)]
    assert [s for s in stages if s[0] == "hr"] == [("hr", i, 8) for i in range(1, 9)]
    assert len(previews) == 1 and previews[0] is result.lr_mesh
    mesh = result.mesh
    assert len(mesh.faces) > 100 and np.all(np.abs(mesh.bounds) <= 1.05)
    assert set(result.seconds) == {"preprocess", "mar_lr", "lr_mesh", "mar_hr", "hr_mesh", "colour"}
    assert [s[0] for s in stages if s[0] in ("hr_mesh", "colour")] == ["hr_mesh", "colour"]
    # coloured from the picture: every vertex, with the processed image's colours (fallback cut-out of
    # the wooden chair: browns, never the white background)
    colours = np.asarray(mesh.visual.vertex_colors)
    assert mesh.visual.kind == "vertex" and len(colours) == len(mesh.vertices) and result.view is not None
    assert colours[:, :3].mean() < 235
    # the chair photo was paired with the box: the HR tokens decode to the box, not the sphere
    ious = []
    for name in names:
        shape = np.load(root / "prepared" / f"{name}.npz")
        points = torch.from_numpy(shape["uniform_points"][:4096])[None]
        with torch.no_grad():
            occupied = pipe.vae.query(pipe.vae.decode(result.hr_tokens), points) > 0
        ious.append(occupancy_iou(occupied, torch.from_numpy(shape["uniform_labels"][:4096])[None]).item())
    print("HR IoU with box, sphere:", ious)
    assert ious[0] > ious[1]


@pytest.mark.slow
def test_pipeline_is_seeded(pipe):
    a = pipe(CHAIR, FAST, seed=3, lr_mesh=False)
    b = pipe(CHAIR, FAST, seed=3, lr_mesh=False)
    c = pipe(CHAIR, FAST, seed=4, lr_mesh=False)
    assert a.lr_mesh is None
    assert torch.equal(a.hr_tokens, b.hr_tokens) and np.array_equal(a.mesh.vertices, b.mesh.vertices)
    assert np.array_equal(a.mesh.visual.vertex_colors, b.mesh.visual.vertex_colors)
    grey = pipe(CHAIR, FAST, seed=3, lr_mesh=False, colour=False)
    assert grey.mesh.visual.kind is None and grey.view is None and "colour" not in grey.seconds
    assert np.array_equal(grey.mesh.vertices, a.mesh.vertices)
    assert not torch.equal(a.hr_tokens, c.hr_tokens)


@pytest.mark.slow
def test_carving_trims_the_mesh_to_the_outline_and_keeps_the_tokens(pipe):
    plain = pipe(CHAIR, FAST, seed=2, colour=False)
    carved = pipe(CHAIR, FAST, seed=2, colour=False, carve=True, carve_dilation=0)
    assert torch.equal(plain.hr_tokens, carved.hr_tokens)
    cell = 2.1 / FAST.resolution
    assert (carved.mesh.bounds[0] >= plain.mesh.bounds[0] - cell).all()
    assert (carved.mesh.bounds[1] <= plain.mesh.bounds[1] + cell).all()
    # seen through the camera fitted to the preview, the carved mesh lies inside the object's outline
    mask = np.asarray(pipe.preprocess(CHAIR).rgba)[..., 3] >= ALPHA_OBJECT
    distance = signed_distance(mask)
    fit = fit_view(plain.lr_mesh, mask)
    assert outline_distance(carved.mesh.vertices, fit, distance).min() > -1.0
    assert outline_distance(plain.mesh.vertices, fit, distance).min() < -1.0  # there was something to carve
    # carving needs the preview's camera even when no preview is asked for
    quiet = pipe(CHAIR, FAST, seed=2, colour=False, carve=True, carve_dilation=0, lr_mesh=False)
    assert quiet.lr_mesh is None and np.array_equal(quiet.mesh.vertices, carved.mesh.vertices)


@pytest.mark.slow
def test_preview_is_extracted_on_the_coarse_grid(pipe, monkeypatch):
    grids = []
    extract = pipe.extract
    monkeypatch.setattr(pipe, "extract", lambda latents, s, resolution=None, **kw: grids.append(
        (latents.shape[1], resolution or s.resolution)) or extract(latents, s, resolution, **kw))
    for resolution in (32, 128):
        pipe(CHAIR, FAST, resolution=resolution)
    lr, hr = pipe.mar_lr.cfg.seq_len, pipe.mar_hr.cfg.seq_len
    assert grids == [(lr, 32), (hr, 32), (lr, PREVIEW_RESOLUTION), (hr, 128)]


@pytest.mark.slow
def test_generate_cli_goes_on_past_a_bad_image(tiny_cascade, tmp_path):
    root, _ = tiny_cascade
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    cmd = [sys.executable, "-m", "mar3d.generate", str(CHAIR), str(bad), str(data_image("triposr_flamingo.png")),
           "-o", str(tmp_path / "out"), "--checkpoint", str(root / "cascade"), "--lr-steps", "4", "--hr-steps", "8",
           "--diffusion-steps", "25", "--resolution", "64", "--format", "obj"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [("error" in r) for r in lines] == [False, True, False]
    assert "not_an_image.png" in lines[1]["image"] and lines[1]["error"].startswith("ImageError")
    for r in (lines[0], lines[2]):
        assert set(r["seconds"]) >= {"mar_lr", "mar_hr", "hr_mesh"} and r["n_faces"] > 0
        out = trimesh.load(r["output"], force="mesh")
        assert len(out.faces) == r["n_faces"] and out.visual.kind == "vertex"  # coloured by default
        assert "colour" in r["seconds"]


@pytest.mark.parametrize("flags,want", [([], True), (["--colour"], True), (["--no-colour"], False),
                                        (["--colour", "false"], False), (["--lr-mesh", "0"], True)])
def test_bool_settings_flags(flags, want):
    import argparse

    from mar3d.cli import add_dataclass_flags, dataclass_from_args

    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Settings)
    s = dataclass_from_args(Settings, p.parse_args(flags))
    assert s.colour is want and s.lr_mesh is (flags != ["--lr-mesh", "0"])


def test_generate_cli_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mar3d.generate", str(CHAIR), "-o", str(tmp_path),
                           "--checkpoint", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "vae.json: missing" in proc.stderr
