import dataclasses

import pytest
import torch

from mar3d.checkpoint import CheckpointError, load_model, save_model
from mar3d.layers import FourierEmbed
from mar3d.vae import PRESETS, PyramidVAE

from tests.conftest import MICRO_VAE as MICRO


def test_token_sets_and_levels():
    assert MICRO.level_sizes("hr") == [256, 64, 16]
    assert MICRO.level_sizes("lr") == [64, 16, 4]
    vae = PyramidVAE(MICRO)
    surface = torch.randn(3, 300, 6)
    assert vae.encode(surface, "hr").shape == (3, 32, 8)
    assert vae.encode(surface, "lr").shape == (3, 8, 8)
    # the decoder accepts any token count
    for m in (1, 8, 32, 50):
        features = vae.decode(torch.randn(2, m, 8))
        assert vae.query(features, torch.rand(2, 17, 3)).shape == (2, 17)


def test_encoder_reads_only_its_levels():
    """HR tokens depend on the first N points only; LR tokens on the first N/4 only."""
    vae = PyramidVAE(MICRO).eval()
    surface = torch.randn(1, 300, 6)
    changed = surface.clone()
    changed[:, 256:] += 5.0   # beyond the HR levels
    assert torch.equal(vae.encode(surface, "hr"), vae.encode(changed, "hr"))
    changed[:, 64:256] += 5.0  # inside the finest HR level, beyond the LR levels
    assert not torch.allclose(vae.encode(surface, "hr"), vae.encode(changed, "hr"))
    assert torch.equal(vae.encode(surface, "lr"), vae.encode(changed, "lr"))


def test_single_level_ablation_from_same_code():
    single = PyramidVAE(dataclasses.replace(MICRO, num_levels=1))
    pyramid = PyramidVAE(MICRO)
    assert single.encode(torch.randn(2, 256, 6)).shape == (2, 32, 8)
    assert len(single.level_attn) == 1 and len(pyramid.level_attn) == 3


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="need 256 surface points"):
        PyramidVAE(MICRO).encode(torch.randn(1, 100, 6))


def test_kl_only_when_weighted():
    x, q = torch.randn(2, 256, 6), torch.rand(2, 10, 3)
    _, kl = PyramidVAE(MICRO)(x, q)
    assert kl.item() == 0.0
    vae = PyramidVAE(dataclasses.replace(MICRO, kl_weight=1e-3))
    _, kl = vae(x, q)
    assert kl.item() > 0.0
    # sampling differs from the mean, and a generator makes it repeatable
    mean = vae.encode(x)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, mean)


def test_paper_preset_builds_on_meta_device():
    with torch.device("meta"):
        vae = PyramidVAE(PRESETS["paper"])
    n = sum(p.numel() for p in vae.parameters())
    print(f"paper preset VAE: {n / 1e6:.1f} M parameters")
    assert 100e6 < n < 300e6  # width 768, 8 + 16 layers
    assert PRESETS["paper"].level_sizes("hr") == [8192, 2048, 512]


def test_occupancy_fn_matches_batched_query():
    vae = PyramidVAE(MICRO).eval()
    lat = vae.encode(torch.randn(1, 256, 6))
    pts = torch.rand(100, 3) * 2 - 1
    fn = vae.occupancy_fn(lat)
    with torch.no_grad():
        ref = vae.query(vae.decode(lat), pts[None])[0]
    torch.testing.assert_close(fn(pts), ref)


def test_blurred_fourier_features_are_the_jittered_mean():
    """FourierEmbed(blur=σ) is E[γ(p + ε)], ε ~ N(0, σ²I): against a Monte Carlo mean over 200,000
    jitters of three points; the finest octave fades, the coarsest stays; σ = 0 is γ itself."""
    sigma, points = 0.02, torch.tensor([[0.1, -0.4, 0.7], [0.0, 0.3, -0.9], [0.55, 0.05, 0.2]], dtype=torch.float64)
    sharp, blurred = FourierEmbed(6).double(), FourierEmbed(6, blur=sigma).double()
    generator = torch.Generator().manual_seed(0)
    for p in points:
        jittered = p + sigma * torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(blurred(p), sharp(jittered).mean(0), atol=5e-3, rtol=0)
    fine, coarse = 3 + 5, 3  # sin of x's finest octave and of its first, in γ's layout
    assert blurred.gain[5] < 0.2 and blurred.gain[0] > 0.99
    assert (blurred(points)[:, fine].abs() <= 0.2 * sharp(points)[:, fine].abs() + 1e-12).all()
    torch.testing.assert_close(blurred(points)[:, coarse], sharp(points)[:, coarse], atol=3e-3, rtol=0)
    assert torch.equal(FourierEmbed(6, blur=0.0)(points), sharp(points))


def test_blurred_decoding_keeps_the_field_and_damps_its_ripples():
    """occupancy_fn(blur=σ): at σ = 0 the trained decoding, bit for bit; at a small σ logits near
    it; along a line, the blurred logits' second differences (their finest ripples) shrink below 0.8
    of the sharp ones' energy."""
    torch.manual_seed(0)
    vae = PyramidVAE(MICRO).eval()
    z = vae.encode(torch.randn(1, 300, 6))
    line = torch.zeros(400, 3)
    line[:, 1] = torch.linspace(-0.9, 0.9, 400)
    with torch.no_grad():
        sharp = vae.query(vae.decode(z), line[None])[0]
    assert torch.equal(vae.occupancy_fn(z)(line), sharp)
    assert torch.equal(vae.occupancy_fn(z, blur=0.0)(line), sharp)
    near, smooth = vae.occupancy_fn(z, blur=0.005)(line), vae.occupancy_fn(z, blur=0.05)(line)
    assert (near - sharp).abs().max() < 0.1 * sharp.std() + 1e-6
    ripples = lambda logits: (logits.diff(n=2) ** 2).sum()  # noqa: E731
    assert ripples(smooth) < 0.8 * ripples(sharp)


def test_checkpoint_round_trip(tmp_path):
    vae = PyramidVAE(MICRO).eval()
    save_model(vae, tmp_path, "vae", metadata={"note": "test"})
    loaded = load_model(tmp_path, "vae")
    assert loaded.cfg == MICRO
    x = torch.randn(1, 256, 6)
    torch.testing.assert_close(loaded.encode(x), vae.encode(x))


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"vae\.json: missing"):
        load_model(tmp_path, "vae")
    save_model(PyramidVAE(MICRO), tmp_path, "vae")
    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: unreadable or truncated"):
        load_model(tmp_path, "vae")
    save_model(PyramidVAE(dataclasses.replace(MICRO, width=64)), tmp_path, "other")
    (tmp_path / "vae.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_model(tmp_path, "vae")
    (tmp_path / "vae.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid mar3d model config"):
        load_model(tmp_path, "vae")


def test_latent_noise_scales_with_the_latents_and_only_in_training():
    from mar3d.vae import noised_latents

    z = torch.randn(3, 16, 8)
    torch.manual_seed(1)
    a = noised_latents(z, 0.5)
    torch.manual_seed(1)
    b = noised_latents(10 * z, 0.5)
    torch.testing.assert_close(b - 10 * z, 10 * (a - z))  # the encoder cannot outgrow the noise
    assert (a - z).abs().max() > 0
    assert torch.equal(noised_latents(z, 0.0), z)

    shrunk = noised_latents(z, 0.0, 0.6)  # shrinkage alone: each shape pulled towards the channel means
    m = z.mean(dim=(0, 1), keepdim=True)
    ratio = (shrunk - m) / (z - m)
    per_shape = ratio.flatten(1)
    torch.testing.assert_close(per_shape, per_shape[:, :1].expand_as(per_shape))  # one factor a per shape
    assert ((per_shape[:, 0] >= 0.4 - 1e-6) & (per_shape[:, 0] <= 1 + 1e-6)).all()
    assert per_shape[:, 0].std() > 0

    torch.manual_seed(0)
    noisy = PyramidVAE(dataclasses.replace(MICRO, latent_noise=0.5))
    plain = PyramidVAE(MICRO)
    plain.load_state_dict(noisy.state_dict())
    surface, points = torch.randn(2, MICRO.num_points, 6), torch.rand(2, 64, 3) * 2 - 1
    with torch.no_grad():
        noisy.eval()
        torch.testing.assert_close(noisy(surface, points)[0], plain(surface, points)[0])  # inference: no noise
        noisy.train()
        assert not torch.allclose(noisy(surface, points)[0], plain(surface, points)[0])


def fine_tune_task(tmp_path, **changes):
    """A VAETask on four synthetic shapes, to fine-tune a saved MICRO VAE into MICRO with `changes`."""
    import numpy as np

    from mar3d.train import TrainConfig, VAETask
    from tests.conftest import write_synthetic_shape

    rng = np.random.default_rng(0)
    (tmp_path / "prepared").mkdir()
    for i in range(4):
        write_synthetic_shape(tmp_path / "prepared" / f"s{i}.npz", rng, n_surface=256, n_pool=1024)
    torch.manual_seed(5)
    start = PyramidVAE(MICRO)
    save_model(start, tmp_path / "start", "vae")
    cfg = TrainConfig(val_percent=0.0, fscore_shapes=0, vae_dir=str(tmp_path / "start"))
    return start, VAETask(dataclasses.replace(MICRO, **changes), cfg, tmp_path / "prepared")


def test_vae_task_fine_tunes_from_a_given_vae(tmp_path):
    start, task = fine_tune_task(tmp_path, latent_noise=0.3)
    model = task.build_model()
    assert model.cfg.latent_noise == 0.3
    for k, v in start.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_learned_queries_make_each_token_index_a_fixed_slot():
    """FPS queries: reordering the query points reorders the tokens. Learned queries: the tokens are a
    function of the point set alone, so index i means the same slot on every shape."""
    torch.manual_seed(0)
    surface = torch.randn(1, 300, 6)
    swapped = surface.clone()
    swapped[:, [0, 5]] = surface[:, [5, 0]]  # two query points (inside every level) trade places
    fps = PyramidVAE(MICRO).eval()
    a, b = fps.encode(surface, "hr"), fps.encode(swapped, "hr")
    torch.testing.assert_close(b[:, [5, 0]], a[:, [0, 5]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, b)
    learned = PyramidVAE(dataclasses.replace(MICRO, queries="learned")).eval()
    assert learned.hr_queries.shape == (MICRO.hr_tokens, MICRO.width)
    torch.testing.assert_close(learned.encode(surface, "hr"), learned.encode(swapped, "hr"), rtol=1e-4, atol=1e-5)
    assert learned.encode(surface, "lr").shape == (1, MICRO.lr_tokens, MICRO.latent_dim)
    with pytest.raises(ValueError, match="unknown VAE queries"):
        PyramidVAE(dataclasses.replace(MICRO, queries="grid"))


def test_fine_tuning_an_fps_vae_into_learned_queries_starts_at_its_anchors(tmp_path):
    from mar3d.cache import build_cache
    from mar3d.token_order import fit_anchors

    start, task = fine_tune_task(tmp_path, queries="learned")
    model = task.build_model()
    for k, v in start.state_dict().items():  # every shared weight carried over
        assert torch.equal(v, model.state_dict()[k]), k
    anchors = fit_anchors(task.train.surface[:, : MICRO.hr_tokens, :3].numpy())
    expected = start.embed_points(torch.cat([torch.as_tensor(anchors).float(), torch.zeros(len(anchors), 3)], -1))
    torch.testing.assert_close(model.hr_queries.detach(), expected.detach())
    loss, _ = task.loss(model, 0, 2, torch.Generator().manual_seed(0), torch.device("cpu"))
    loss.backward()
    assert model.hr_queries.grad.abs().sum() > 0  # the queries train
    # a cache of a learned-query VAE keeps its order: anchoring its tokens is refused
    with pytest.raises(ValueError, match="learned queries"):
        build_cache(model.eval(), iter([]), tmp_path / "cache", image_size=32, order="anchored")
