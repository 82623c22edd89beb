"""Single-view reconstruction pretraining (mar3d.single_view) and MAR on its frozen encoder."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mar3d.cache import build_cache, load_cache
from mar3d.checkpoint import load_model
from mar3d.image_encoder import ImageEncoderConfig
from mar3d.render import Camera, rotate_to_view
from mar3d.single_view import ImageOccupancy, OccConfig, ReconConfig, SingleViewRecon
from mar3d.train import OccTask, ReconTask, TrainConfig, train
from tests.conftest import MICRO_MAR_HR, MICRO_VAE, write_synthetic_shape

MICRO_RECON = ReconConfig(encoder=ImageEncoderConfig(kind="readout", image_size=32, patch_size=8, width=32,
                                                     layers=1, heads=2, readout_layers=1))

MICRO_OCC = OccConfig(dec_layers=1, encoder=ImageEncoderConfig(kind="tiny", stem="conv", image_size=32, patch_size=8,
                                                               width=32, layers=1, heads=2))


def _image(kind: str) -> np.ndarray:
    """A flat picture that tells the shapes apart: a red disc for spheres, a blue square for boxes."""
    img = np.full((32, 32, 4), 0, np.uint8)
    yy, xx = np.mgrid[:32, :32]
    inside = (yy - 16) ** 2 + (xx - 16) ** 2 < 100 if kind == "sphere" else (abs(yy - 16) < 9) & (abs(xx - 16) < 9)
    img[inside] = (220, 40, 40, 255) if kind == "sphere" else (40, 40, 220, 255)
    return img


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A training work directory in train_demo's layout: prepared/, renders/<shape>/cameras.json,
    cache/ (2 views per shape, turned into each view's frame) and a micro VAE in vae/."""
    root = tmp_path_factory.mktemp("recon")
    rng = np.random.default_rng(3)
    (root / "prepared").mkdir()
    kinds = {}
    for i in range(6):
        path = root / "prepared" / f"s{i}.npz"
        write_synthetic_shape(path, rng, n_surface=256, n_pool=4096)
        normal = np.load(path)["surface"][0, 3:]
        kinds[f"s{i}"] = "box" if np.sum(np.abs(normal) > 0.999) == 1 else "sphere"
    train("vae", MICRO_VAE, TrainConfig(steps=150, lr=2e-3, batch_size=8, queries=512, val_percent=0.0, threads=2,
                                        log_every=150, eval_every=150, save_every=150, fscore_shapes=0),
          root / "prepared", root / "vae")
    vae = load_model(root / "vae", "vae")
    items = []
    for name, kind in kinds.items():
        cams = [Camera(azimuth_deg=float(a), elevation_deg=20.0, fov_deg=40.0, distance=3.0, size=32)
                for a in rng.uniform(0, 360, 2)]
        (root / "renders" / name).mkdir(parents=True)
        (root / "renders" / name / "cameras.json").write_text(json.dumps([c.to_dict() for c in cams]))
        surface = np.load(root / "prepared" / f"{name}.npz")["surface"]
        for k, cam in enumerate(cams):
            Image.fromarray(_image(kind)).save(root / "renders" / name / f"{k}.png")  # read by OccTask's crop cameras
            items.append((f"{name}/{k}", rotate_to_view(surface, cam).astype(np.float32), _image(kind)))
    build_cache(vae, items, root / "cache", image_size=32)
    return root


def test_occupancy_is_turned_into_each_views_frame(work):
    task = ReconTask(MICRO_RECON, TrainConfig(vae_dir=str(work / "vae"), val_percent=0.0, queries=64), work)
    idx = torch.arange(len(task.shape_of))
    g = torch.Generator().manual_seed(0)
    points, _, _ = task.occupancy(idx, 64, g)
    # the same draw, unturned, turned with the renderer's own rotation: must agree point for point
    b = task.bank.sample(task.shape_of[idx], 64, torch.Generator().manual_seed(0))
    raw = torch.cat([b.uniform, b.near], 1).numpy()
    _, meta = load_cache(work / "cache")
    for i, name in enumerate(meta["names"]):
        shape, view = name.split("/")
        cam = Camera.from_dict(json.loads((work / "renders" / shape / "cameras.json").read_text())[int(view)])
        np.testing.assert_allclose(points[i].numpy(), rotate_to_view(raw[i], cam), atol=1e-5)


def _learning_run(work) -> TrainConfig:
    """300 steps on the fixture's 12 entries: enough for the micro models to learn them."""
    return TrainConfig(steps=300, lr=3e-3, batch_size=8, warmup=20, val_percent=0.0, threads=2, queries=256,
                       vae_dir=str(work / "vae"), log_every=300, eval_every=300, save_every=300)


def test_recon_learns_tokens_and_occupancy(work, tmp_path):
    cfg = _learning_run(work)
    task = ReconTask(MICRO_RECON, cfg, work)
    torch.manual_seed(0)
    before = task.evaluate(task.build_model().eval(), "cpu")
    after = train("recon", MICRO_RECON, cfg, work, tmp_path)
    assert after["val_mse_hr"] < 0.6 * before["val_mse_hr"], (before, after)
    assert after["val_bce"] < before["val_bce"], (before, after)
    recon = load_model(tmp_path, "recon")
    assert isinstance(recon, SingleViewRecon) and recon.cfg.encoder.readout_hr == MICRO_VAE.hr_tokens


@pytest.mark.parametrize("pixel_aligned", [False, True])
def test_image_occupancy_learns_each_views_shape(work, tmp_path, pixel_aligned):
    """Pilots O1 / O3's direct image → occupancy model: its held-out-style BCE falls well below the
    start; it fits the pictured shape's occupancy better than with a picture of the other kind of
    shape (red disc = sphere, blue square = box); it round-trips through its checkpoint. O3 also
    learns the crop camera of each view (here the discs' and squares' boxes) and looks up at it."""
    config = dataclasses.replace(MICRO_OCC, pixel_aligned=pixel_aligned, pixel_channels=16)
    cfg = _learning_run(work)
    task = OccTask(config, cfg, work)
    torch.manual_seed(0)
    before = task.evaluate(task.build_model().eval(), "cpu")
    after = train("occ", config, cfg, work, tmp_path)
    if pixel_aligned:
        assert after["val_camera"] < 0.5 * before["val_camera"] and "val_bce_true_camera" in after, (before, after)
    assert after["val_bce"] < 0.8 * before["val_bce"], (before, after)
    occ = load_model(tmp_path, "occ")
    assert isinstance(occ, ImageOccupancy)
    idx = torch.arange(len(task.shape_of))
    points, uniform, near = task.occupancy(idx, 1024, torch.Generator().manual_seed(1))
    labels = torch.cat([uniform, near], 1).float()
    images = task.images[idx].permute(0, 3, 1, 2).float().div(255)
    red = images[:, 0].mean((1, 2)) > images[:, 2].mean((1, 2))
    other = torch.stack([images[torch.nonzero(red != red[i])[0, 0]] for i in range(len(idx))])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        own, swapped = bce(occ(images, points)[0], labels), bce(occ(other, points)[0], labels)
    assert own < 0.9 * swapped, (own, swapped)
    fn = occ.occupancy_fn(images[:1])
    torch.testing.assert_close(fn(points[0]), occ(images[:1], points[:1])[0][0])


def test_mar_on_the_frozen_encoder(work, tmp_path):
    """MAR-HR starts from the recon's encoder, keeps it frozen, trains on its cached features; the
    saved MAR holds the encoder, and sampling from images uses the same features."""
    rcfg = TrainConfig(steps=40, batch_size=8, val_percent=0.0, threads=2, queries=128, vae_dir=str(work / "vae"),
                       log_every=40, eval_every=40, save_every=40)
    train("recon", MICRO_RECON, rcfg, work, tmp_path / "r")
    recon = load_model(tmp_path / "r", "recon")
    cfg = TrainConfig(steps=30, batch_size=8, val_percent=0.0, threads=2, init_encoder=str(tmp_path / "r"),
                      log_every=30, eval_every=30, save_every=30)
    train("mar_hr", MICRO_MAR_HR, cfg, work / "cache", tmp_path / "m")
    mar = load_model(tmp_path / "m", "mar_hr")
    enc = mar.image_encoder
    assert enc.cfg.kind == "readout" and enc.cfg.frozen and enc.cfg.output == "hr"
    assert not any(p.requires_grad for p in enc.parameters())
    for k, v in recon.encoder.state_dict().items():
        assert torch.equal(v, enc.state_dict()[k]), k  # frozen: unchanged by MAR training
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = enc(images)
        assert feats.shape == (2, MICRO_VAE.hr_tokens, 32)
        torch.testing.assert_close(feats, recon.encoder(images)[:, MICRO_VAE.lr_tokens:])
        lr = torch.randn(2, MICRO_VAE.lr_tokens, MICRO_VAE.latent_dim)
        a = mar.condition(images, lr, aug_t=0.0)
        b = mar.condition(None, lr, aug_t=0.0, image_tokens=feats)
    torch.testing.assert_close(a, b)
    tokens = mar.sample(images, lr, steps=4, diffusion_steps=5, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, MICRO_VAE.hr_tokens, MICRO_VAE.latent_dim) and torch.isfinite(tokens).all()


def test_aligned_conditioning_on_one_token_per_index():
    """cond_mode 'aligned': one readout token per generated index, added to that index; CFG's null
    condition covers it; a mismatched token count is refused."""

    from mar3d.mar import MAR

    enc = ImageEncoderConfig(kind="readout", image_size=32, patch_size=8, width=32, layers=1, heads=2,
                             readout_layers=1, readout_lr=8, readout_hr=32, output="hr", frozen=True)
    cfg = dataclasses.replace(MICRO_MAR_HR, image_encoder=enc, cond_mode="aligned")
    torch.manual_seed(0)
    mar = MAR(cfg)
    assert mar.prefix_len == 1 + 8 and mar.fake_prefix.shape[1] == 1 + 8 + 32
    images, lr = torch.rand(2, 3, 32, 32), torch.randn(2, 8, 8)
    loss = mar(torch.randn(2, 32, 8), images, lr)
    loss.backward()
    assert torch.isfinite(loss) and mar.token_proj.weight.grad is not None
    assert all(p.grad is None for p in mar.image_encoder.parameters())  # frozen
    mar.eval()
    with torch.no_grad():
        cond = mar.condition(images, lr, aug_t=0.0)
        mask = torch.ones(2, 32, dtype=torch.bool)
        z = mar.decode(mar.encode(torch.zeros(2, 32, 8), cond, mask), mask, cond)
        other = cond.clone()
        other[:, mar.prefix_len + 5] += 1.0  # index 5's own image token
        z2 = mar.decode(mar.encode(torch.zeros(2, 32, 8), other, mask), mask, other)
    assert (z2 - z).abs()[:, 5].mean() > (z2 - z).abs()[:, 6:].mean()  # felt most at its own index
    out = mar.sample(images, lr, steps=4, cfg=3.0, diffusion_steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 32, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="one image token per index"):
        MAR(dataclasses.replace(cfg, seq_len=16))


def test_residual_mar_models_tokens_around_the_reconstruction(monkeypatch):
    """residual=True: the diffusion head's targets are tokens − base(aligned image token), and sampling
    adds the base back (a head that samples zeros returns the base prediction itself)."""

    from mar3d.mar import MAR

    enc = ImageEncoderConfig(kind="readout", image_size=32, patch_size=8, width=32, layers=1, heads=2,
                             readout_layers=1, readout_lr=8, readout_hr=32, output="lr", frozen=True)
    from tests.conftest import MICRO_MAR

    cfg = dataclasses.replace(MICRO_MAR, image_encoder=enc, cond_mode="aligned", residual=True)
    torch.manual_seed(0)
    mar = MAR(cfg)
    torch.nn.init.normal_(mar.base_head.weight)
    images, tokens = torch.rand(2, 3, 32, 32), torch.randn(2, 8, 8)
    with torch.no_grad():
        base = mar.base_head(mar.image_encoder(images))
    seen = {}
    real_loss = mar.diffloss.loss
    monkeypatch.setattr(mar.diffloss, "loss", lambda target, z: seen.setdefault("target", target) is None
                        or real_loss(target, z))
    mar(tokens, images)
    residual = (tokens - base).reshape(-1, 8)
    assert all(any(torch.allclose(row, r, atol=1e-5) for r in residual) for row in seen["target"])
    assert not mar.base_head.weight.requires_grad
    monkeypatch.setattr(mar.diffloss, "sample", lambda z, *a, **k: torch.zeros(z.shape[0] // 2, 8))
    out = mar.eval().sample(images, steps=2, cfg=3.0, diffusion_steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, base)
    with pytest.raises(ValueError, match="aligned"):
        MAR(dataclasses.replace(cfg, cond_mode="prefix"))


def test_corrupt_tokens_draws_each_kind_of_input():
    from mar3d.train import DecoderTuneConfig, corrupt_tokens

    tokens, predicted = torch.randn(400, 8, 4), torch.randn(400, 8, 4)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    clean = corrupt_tokens(tokens, predicted, DecoderTuneConfig(clean_share=1.0, recon_share=0.0), g())
    assert torch.equal(clean, tokens)
    recon = corrupt_tokens(tokens, predicted, DecoderTuneConfig(clean_share=0.0, recon_share=1.0, recon_noise_max=0.0), g())
    assert torch.equal(recon, predicted)
    cfg = DecoderTuneConfig(clean_share=0.25, recon_share=0.5, shrink_min=0.5, noise_max=0.0)
    out = corrupt_tokens(tokens, predicted, cfg, g())
    is_clean = (out == tokens).flatten(1).all(1)
    is_recon = ((out - predicted).abs() < cfg.recon_noise_max * 5).flatten(1).all(1) & ~is_clean
    # without noise a synthetic input is the tokens shrunk by one factor a in [0.5, 1)
    ratio = out / tokens
    is_synth = ~is_clean & ~is_recon & (ratio.flatten(1).std(1) < 1e-4) & (ratio.flatten(1).mean(1) >= 0.5)
    assert (is_clean | is_recon | is_synth).all()
    assert 0.15 < is_clean.float().mean() < 0.35 and 0.4 < is_recon.float().mean() < 0.6
    # without a reconstructor its share goes to the synthetic inputs
    none = corrupt_tokens(tokens, None, cfg, g())
    assert (none == tokens).flatten(1).all(1).float().mean() < 0.35


def test_decoder_tuning_keeps_the_encoder_and_learns_to_decode_corrupted_tokens(work, tmp_path):
    from mar3d.train import DecoderTuneConfig, VAEDecoderTask

    rcfg = TrainConfig(steps=40, batch_size=8, val_percent=0.0, threads=2, queries=128, vae_dir=str(work / "vae"),
                       log_every=40, eval_every=40, save_every=40)
    train("recon", MICRO_RECON, rcfg, work, tmp_path / "r")
    tune = DecoderTuneConfig(clean_share=0.2, recon_share=0.4)
    cfg = TrainConfig(steps=120, lr=2e-3, batch_size=8, warmup=10, val_percent=0.0, threads=2, queries=512,
                      vae_dir=str(work / "vae"), init_encoder=str(tmp_path / "r"),
                      log_every=120, eval_every=120, save_every=120)
    before = VAEDecoderTask(tune, cfg, work).evaluate(load_model(work / "vae", "vae"), "cpu")
    after = train("vae_decoder", tune, cfg, work, tmp_path / "d")
    assert after["val_bce_corrupt"] < 0.9 * before["val_bce_corrupt"], (before, after)
    assert after["val_bce_recon"] < before["val_bce_recon"], (before, after)
    old, new = load_model(work / "vae", "vae"), load_model(tmp_path / "d", "vae_decoder")
    assert type(new) is type(old) and new.cfg == old.cfg  # a drop-in VAE
    changed = {k for k, v in new.state_dict().items() if not torch.equal(v, old.state_dict()[k])}
    assert changed and all(k.split(".")[0] in ("from_latent", "decoder", "query_embed", "query_attn", "out_norm",
                                                "to_logit") for k in changed), changed
    surface = torch.from_numpy(np.load(work / "prepared" / "s0.npz")["surface"][None, :, :6]).float()
    torch.testing.assert_close(new.encode(surface), old.encode(surface))  # cached tokens stay valid
