"""The training script's handling of the real meshes no stage may train on (Recipe.unseen_meshes)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MICRO_VAE
from mar3d.checkpoint import save_model
from mar3d.geometry import load_mesh
from mar3d.shapes import build_dataset
from mar3d.vae import PyramidVAE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_demo  # noqa: E402

MESHES = Path(__file__).parent / "data" / "meshes"


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A shared-mesh folder of two meshes, torus and penguin_parts, as the script's SHARED_MESHES."""
    folder = tmp_path / "shared_meshes"
    folder.mkdir()
    for name in ("torus.obj", "penguin_parts.obj"):
        shutil.copy(MESHES / name, folder / name)
    monkeypatch.setattr(train_demo, "SHARED_MESHES", folder)
    return folder


def test_real_mesh_of():
    assert train_demo.real_mesh_of("real__utah_teapot@07") == "utah_teapot"
    assert train_demo.real_mesh_of("chair_00012") is None


@pytest.mark.slow
def test_unseen_meshes_stay_out_of_training_and_are_built_apart(tmp_path, shared):
    r = train_demo.Recipe(shapes=0, real_variants=2, workers=1, unseen_meshes="torus")
    work = tmp_path / "work"
    train_demo.stage_shapes(r, work)
    assert sorted(p.name for p in (work / "shapes").glob("*.ply")) == \
        ["real__penguin_parts@00.ply", "real__penguin_parts@01.ply"]

    out = tmp_path / "ckpt"
    save_model(PyramidVAE(MICRO_VAE), out, "vae")
    train_demo.stage_unseen(r, work, out)
    u = work / "unseen"
    assert sorted(p.stem for p in (u / "shapes").glob("*.ply")) == ["real__torus@00", "real__torus@01"]
    # the same variants a folder that trained on the torus would hold
    everything = build_dataset(tmp_path / "all", 0, seed=train_demo.DATASET_SEED, real_dir=shared, real_variants=2)
    assert everything["total"] == 4
    apart, together = load_mesh(u / "shapes" / "real__torus@01.ply"), load_mesh(tmp_path / "all" / "real__torus@01.ply")
    assert np.allclose(apart.vertices, together.vertices)
    # prepared, rendered in `views` views, and the VAE's reconstructions scored per mesh
    assert sorted(p.stem for p in (u / "prepared").glob("*.npz")) == ["real__torus@00", "real__torus@01"]
    assert len(json.loads((u / "renders" / "real__torus@00" / "cameras.json").read_text())) == r.views
    rows = json.loads((u / "eval" / "vae.json").read_text())["rows"]
    assert [row["shape"] for row in rows] == ["real__torus@00", "real__torus@01"]
    record = json.loads((work / "stages.jsonl").read_text().splitlines()[-1])
    assert record["stage"] == "unseen" and record["meshes"] == ["torus"]
    assert set(record["vae_fscore_by_mesh"]) == {"torus"}

    # a training folder built before the torus was left out is refused, naming it
    shutil.copy(u / "shapes" / "real__torus@00.ply", work / "shapes")
    with pytest.raises(SystemExit, match="torus"):
        train_demo.stage_shapes(r, work)


def test_unseen_is_skipped_without_shared_meshes(tmp_path, monkeypatch):
    monkeypatch.setattr(train_demo, "SHARED_MESHES", tmp_path / "none")
    (tmp_path / "work").mkdir()
    train_demo.stage_unseen(train_demo.Recipe(), tmp_path / "work", tmp_path / "ckpt")  # needs no checkpoint
    record = json.loads((tmp_path / "work" / "stages.jsonl").read_text())
    assert record["stage"] == "unseen" and record["skipped"] is True
    assert not (tmp_path / "work" / "unseen").exists()


def test_index_only_families_stay_out_of_training(tmp_path, monkeypatch):
    """The shapes stage builds every family but the index-only ones (the shipped recipe: "plush"),
    with `shapes` spread over the rest, so adding a family to mar3d.shapes leaves the training
    data, and the index-only names numbered after it, as they were."""
    from mar3d.shapes import FAMILIES

    r = train_demo.Recipe(shapes=len(FAMILIES) - 1, real_variants=0, workers=1)
    assert "plush" in r.index_only_families.split(",")
    trained = train_demo.training_families(r)
    assert "plush" not in trained and set(trained) | {"plush"} == set(FAMILIES)
    monkeypatch.setattr(train_demo, "SHARED_MESHES", tmp_path / "none")
    train_demo.stage_shapes(r, tmp_path / "work")
    assert sorted(p.stem for p in (tmp_path / "work" / "shapes").glob("*.ply")) == sorted(f"{f}_00000" for f in trained)
    assert set(train_demo.training_families(train_demo.Recipe(index_only_families=""))) == set(FAMILIES)
    with pytest.raises(ValueError, match="plushy"):
        train_demo.training_families(train_demo.Recipe(index_only_families="plush,plushy"))


def test_vae_tune_trains_the_decoder_alone_once(tmp_path, synthetic_data):
    """Stage vae_tune (pilot D2) writes over the VAE in `out` one with more decoder layers and the
    very same encoder (so the cache and the index stay valid), and is skipped when run again."""
    import torch

    from mar3d.checkpoint import load_model, read_header
    from mar3d.vae import PRESETS

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "prepared").symlink_to(synthetic_data)
    start = PyramidVAE(PRESETS["tiny"]).eval()
    save_model(start, out, "vae")
    r = train_demo.Recipe(vae_tune_steps=3, vae_tune_layers=1, vae_batch=2)
    train_demo.stage_vae_tune(r, work, out, threads=1)
    tuned = load_model(out, "vae").eval()
    assert tuned.cfg.dec_layers == PRESETS["tiny"].dec_layers + 1
    assert read_header(out, "vae")["metadata"]["tune_steps"] == 3
    surface = torch.from_numpy(np.load(sorted(synthetic_data.glob("*.npz"))[0])["surface"][:1024]).float()[None]
    with torch.no_grad():
        assert torch.equal(tuned.encode(surface), start.encode(surface))
    before = (out / "vae.safetensors").read_bytes()
    train_demo.stage_vae_tune(r, work, out, threads=1)
    assert (out / "vae.safetensors").read_bytes() == before
    stages = [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines()]
    assert [s.get("skipped", False) for s in stages] == [False, True]
