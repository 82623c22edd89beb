import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mar3d.checkpoint import load_model
from mar3d.train import TrainConfig, ema_decay_at, lr_at, train
from tests.test_vae import MICRO

FAST = TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup=3, queries=128, log_every=4, eval_every=6,
                   save_every=6, threads=1, val_percent=20.0)


def test_lr_schedule():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(1000, cfg) == pytest.approx(1e-4)
    assert lr_at(550, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    after = [lr_at(s, cfg) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_train_writes_checkpoint_and_log(synthetic_data, tmp_path):
    last = train("vae", MICRO, FAST, synthetic_data, tmp_path)
    assert last["step"] == 12 and "val_iou_hr" in last and "train_iou_lr" in last
    assert 0.0 <= last["val_fscore@0.05_hr"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "vae.log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(l == l for l in losses)  # logged at 4, 8, 12; finite
    vae = load_model(tmp_path, "vae")
    assert vae.cfg == MICRO
    header = json.loads((tmp_path / "vae.json").read_text())
    assert header["metadata"]["step"] == 12


def test_resume_repeats_uninterrupted_run(synthetic_data, tmp_path):
    """A run stopped after its first step (time limit) and resumed ends bit-identical to one 12-step run."""
    train("vae", MICRO, FAST, synthetic_data, tmp_path / "whole")
    train("vae", MICRO, dataclasses.replace(FAST, max_minutes=1e-9), synthetic_data, tmp_path / "split")
    first = load_file(str(tmp_path / "split" / "vae.state.safetensors"))
    assert not torch.equal(first["model.to_logit.weight"],
                           load_file(str(tmp_path / "whole" / "vae.state.safetensors"))["model.to_logit.weight"])
    train("vae", MICRO, FAST, synthetic_data, tmp_path / "split")
    whole = load_file(str(tmp_path / "whole" / "vae.state.safetensors"))
    split = load_file(str(tmp_path / "split" / "vae.state.safetensors"))
    assert whole.keys() == split.keys()
    for k in whole:
        assert torch.equal(whole[k], split[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "vae.log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated records after the resume


def test_decoder_only_fine_tuning_keeps_the_encoder_and_grows_the_decoder_from_the_identity(synthetic_data, tmp_path):
    """Pilot D2: a trained VAE's decoder fine-tuned alone, with two decoder layers added. The grown
    VAE decodes exactly as its start before any step; after training, every encoder weight (so every
    token the cache, the MARs and the index hold) is bit-identical and the decoder has moved."""
    from mar3d.train import DECODER_PARTS, VAETask

    train("vae", MICRO, FAST, synthetic_data, tmp_path / "start")
    start = load_model(tmp_path / "start", "vae").eval()
    grown_cfg = dataclasses.replace(MICRO, dec_layers=MICRO.dec_layers + 2)
    tune = dataclasses.replace(FAST, vae_dir=str(tmp_path / "start"), decoder_only=True, lr=3e-3)
    grown = VAETask(grown_cfg, tune, str(synthetic_data)).build_model().eval()
    surface = torch.from_numpy(VAETask(MICRO, FAST, str(synthetic_data)).train.surface[:2].numpy()).float()
    points = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        before = start.query(start.decode(start.encode(surface)), points)
        assert torch.equal(grown.query(grown.decode(grown.encode(surface)), points), before)

    train("vae", grown_cfg, tune, synthetic_data, tmp_path / "tuned")
    tuned = load_model(tmp_path / "tuned", "vae").eval()
    assert tuned.cfg.dec_layers == MICRO.dec_layers + 2
    after = tuned.state_dict()
    decoder = {name for name in after if name.split(".")[0] in DECODER_PARTS}
    for name, weight in start.state_dict().items():
        if name not in decoder:
            assert torch.equal(after[name], weight), f"encoder weight {name} changed"
    assert any(not torch.equal(after[name], weight) for name, weight in start.state_dict().items() if name in decoder)
    assert any(k.startswith(f"decoder.{MICRO.dec_layers}.") and not torch.equal(v, grown.state_dict()[k])
               for k, v in after.items())
    with torch.no_grad():
        assert torch.equal(tuned.encode(surface), start.encode(surface))


@pytest.mark.slow
def test_torchrun_two_ranks_stay_identical(synthetic_data, tmp_path):
    sets = [f"{f.name}={getattr(MICRO, f.name)}" for f in dataclasses.fields(MICRO)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "mar3d.train", "vae", "--data", str(synthetic_data), "--out", str(tmp_path),
           "--steps", "6", "--batch-size", "4", "--queries", "128", "--warmup", "2", "--threads", "1",
           "--eval-every", "6", "--save-every", "6", "--set", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "vae.log.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 6, "ranks_identical": True}
    assert load_model(tmp_path, "vae").cfg == MICRO


def test_yaw_augmentation_keeps_labels_consistent(synthetic_data):
    """Turning points, normals and queries together keeps every inside label right."""
    from mar3d.data import ShapeBank, split_files, yaw_matrices

    bank = ShapeBank(split_files(synthetic_data, 0.0)[0][:4], num_points=256)
    rot = yaw_matrices(torch.tensor([torch.pi / 2]))[0]
    torch.testing.assert_close(rot @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -1.0]))
    plain = bank.sample(torch.arange(4), 512, torch.Generator().manual_seed(0))
    turned = bank.sample(torch.arange(4), 512, torch.Generator().manual_seed(0), yaw=True)
    assert torch.equal(plain.uniform_labels, turned.uniform_labels)
    assert not torch.allclose(plain.uniform, turned.uniform)
    # a rotation about +Y keeps heights and distances from the Y axis, and normals unit length
    torch.testing.assert_close(plain.uniform[..., 1], turned.uniform[..., 1])
    torch.testing.assert_close(plain.near[..., [0, 2]].norm(dim=-1), turned.near[..., [0, 2]].norm(dim=-1))
    torch.testing.assert_close(turned.surface[..., 3:].norm(dim=-1), plain.surface[..., 3:].norm(dim=-1))


def test_split_groups_variants_and_views():
    from mar3d.data import is_held_out

    names = [f"real__mesh{i}@{k:02d}" for i in range(40) for k in range(5)]
    for i in range(40):
        sides = {is_held_out(f"real__mesh{i}@{k:02d}", 30.0) for k in range(5)}
        sides |= {is_held_out(f"real__mesh{i}@00/{v}", 30.0) for v in range(3)}
        assert len(sides) == 1  # all variants and views of one mesh on one side
    held = sum(is_held_out(n, 30.0) for n in names) / len(names)
    assert 0.1 < held < 0.5


def test_validation_split_is_apart_from_test_and_training():
    from mar3d.data import is_held_out, is_validation

    names = [f"chair_{i:05d}" for i in range(4000)]
    test = {n for n in names if is_held_out(n, 4.0)}
    val = {n for n in names if is_validation(n, 4.0, 4.0)}
    train = {n for n in names if not is_held_out(n, 8.0)}
    assert not (test & val) and not (test & train) and not (val & train)
    assert test | val | train == set(names)
    assert 0.03 < len(val) / len(names) < 0.05 and 0.03 < len(test) / len(names) < 0.05
    assert is_validation("real__spot@03/2", 4.0, 4.0) == is_validation("real__spot@11", 4.0, 4.0)


def test_mar_task_takes_each_entrys_reference_from_the_index_picks_beside_the_cache(tmp_path, tiny_cascade):
    """stage mar_references (pilot MR) leaves the index's pick for some training entries beside the
    cache, as raw latents: the task trains on them, normalised as its tokens are; the others keep
    the nearest training render of another shape."""
    import numpy as np
    from safetensors.torch import save_file

    from mar3d.cache import build_cache
    from mar3d.train import REFERENCES_FILE, MARHRTask, MARTask
    from tests.conftest import MICRO_MAR, data_image

    root, names = tiny_cascade  # its cache's 32² images are too small for 64² silhouettes: a 64² one
    pics = [data_image("instantmesh_chair_wood.jpg"), data_image("triposr_flamingo.png")]
    items = [(f"{n}/0", np.load(root / "prepared" / f"{n}.npz")["surface"], p) for n, p in zip(names, pics)]
    build_cache(load_model(root / "cascade", "vae"), items, tmp_path / "cache", image_size=64)
    cfg = TrainConfig(steps=1, batch_size=2, val_percent=0.0)
    model_cfg = dataclasses.replace(MICRO_MAR, reference=True)
    before = MARTask(model_cfg, cfg, str(tmp_path / "cache"))
    assert before.reference_idx.tolist() == [1, 0]  # two shapes: each the other's reference
    torch.testing.assert_close(before.references, before.tokens[[1, 0]])
    g = torch.Generator().manual_seed(0)
    hr_shape = MARHRTask(model_cfg, cfg, str(tmp_path / "cache")).tokens.shape[1:]
    picked = {"rows": torch.tensor([1]), "lr": torch.randn(1, *before.lr.shape[1:], generator=g),
              "hr": torch.randn(1, *hr_shape, generator=g)}
    save_file(picked, str(tmp_path / "cache" / REFERENCES_FILE))
    for task_class, key in ((MARTask, "lr"), (MARHRTask, "hr")):
        task = task_class(model_cfg, cfg, str(tmp_path / "cache"))
        c = task.model_cfg
        torch.testing.assert_close(task.references[1], (picked[key][0] - c.latent_shift) / c.latent_scale)
        torch.testing.assert_close(task.references[0], task.tokens[1])
        torch.testing.assert_close(task.batch(torch.tensor([1, 0]), "cpu")[-1], task.references[[1, 0]])


def test_fine_tuning_starts_from_the_trained_mar(tmp_path, tiny_cascade):
    """`init_from` (stage mar_tune, pilot MR): the run starts from the trained MAR, not a fresh one;
    at learning rate 0 it hands back the same weights."""
    from tests.conftest import CASCADE_MAR_LR

    root, _ = tiny_cascade
    cfg = TrainConfig(steps=3, batch_size=2, lr=0.0, min_lr=0.0, warmup=1, val_percent=0.0, log_every=1,
                      eval_every=3, save_every=3, init_from=str(root / "cascade"))
    train("mar_lr", CASCADE_MAR_LR, cfg, root / "cache", tmp_path)
    before, after = load_model(root / "cascade", "mar_lr").state_dict(), load_model(tmp_path, "mar_lr").state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key].float(), before[key].float(), msg=key)
