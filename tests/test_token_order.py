"""Anchored token order (mar3d.token_order) and its use in the latent cache."""

import numpy as np
import pytest
import torch
from PIL import Image

from mar3d.cache import build_cache, load_cache
from mar3d.token_order import anchor_permutation, anchored, fit_anchors
from mar3d.vae import PyramidVAE
from tests.conftest import MICRO_VAE


def clustered_queries(rng, shapes: int, centres: np.ndarray, jitter: float = 0.03) -> np.ndarray:
    """(shapes, M, 3): one point near each centre per shape, in a random order per shape."""
    M = len(centres)
    points = centres[None] + jitter * rng.normal(size=(shapes, M, 3))
    return np.stack([p[rng.permutation(M)] for p in points])


def test_permutation_puts_each_shapes_point_nearest_its_anchor_at_that_index():
    rng = np.random.default_rng(0)
    anchors = rng.uniform(-1, 1, size=(16, 3))
    queries = clustered_queries(rng, 5, anchors, jitter=0.01)
    perm = anchor_permutation(queries, anchors)
    assert perm.shape == (5, 16)
    assert all(sorted(p) == list(range(16)) for p in perm)  # a permutation per shape
    ordered = np.take_along_axis(queries, perm[..., None], 1)
    assert np.abs(ordered - anchors[None]).max() < 0.05


def test_anchored_order_brings_each_index_together_and_moves_tokens_with_their_points():
    rng = np.random.default_rng(1)
    centres = rng.uniform(-0.9, 0.9, size=(12, 3))
    queries = clustered_queries(rng, 300, centres).astype(np.float32)
    tokens = torch.from_numpy(np.concatenate([queries, queries ** 2], axis=-1))  # (S, M, 6), tied to the points
    fit = np.arange(300) < 250
    ordered, anchors = anchored(tokens, queries, fit)
    assert anchors.shape == (12, 3)
    assert torch.equal(ordered[..., 3:], ordered[..., :3] ** 2)  # rows moved whole
    for s in (0, 299):  # each shape's token set is unchanged, only reordered
        assert sorted(map(tuple, ordered[s].tolist())) == sorted(map(tuple, tokens[s].tolist()))
    spread_before = queries.var(axis=0).sum(-1).mean()
    spread_after = ordered[..., :3].numpy().var(axis=0).sum(-1).mean()
    assert spread_after < 0.05 * spread_before, (spread_before, spread_after)


def test_fit_anchors_needs_enough_points():
    with pytest.raises(ValueError, match="anchors"):
        fit_anchors(np.zeros((0, 8, 3)))


def test_vae_decoder_is_blind_to_token_order():
    """What makes reordering MAR's targets safe: the VAE decodes a set."""
    torch.manual_seed(0)
    vae = PyramidVAE(MICRO_VAE).eval()
    latents = torch.randn(1, MICRO_VAE.hr_tokens, MICRO_VAE.latent_dim)
    points = torch.rand(1, 200, 3) * 2 - 1
    shuffled = latents[:, torch.randperm(MICRO_VAE.hr_tokens)]
    with torch.no_grad():
        a, b = vae.query(vae.decode(latents), points), vae.query(vae.decode(shuffled), points)
    assert torch.allclose(a, b, atol=1e-5)
    assert a.std() > 1e-3  # not a constant field


def cache_items(rng, names: list[str], surfaces: dict):
    image = Image.fromarray(rng.integers(0, 255, size=(24, 24, 4), dtype=np.uint8))
    return [(n, surfaces[n], image) for n in names]


def sphere_surface(rng, n: int, centre) -> np.ndarray:
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return np.concatenate([0.5 * normals + centre, normals], axis=1).astype(np.float32)


def test_cache_token_order(tmp_path):
    """anchored: a reordering of the FPS tokens, with anchors from training entries only."""
    torch.manual_seed(0)
    vae = PyramidVAE(MICRO_VAE).eval()
    rng = np.random.default_rng(2)
    names = [f"s{i}/0" for i in range(6)]
    surfaces = {n: sphere_surface(rng, MICRO_VAE.num_points, rng.uniform(-0.3, 0.3, 3)) for n in names}
    held_out = lambda name: name in ("s4/0", "s5/0")  # noqa: E731

    build_cache(vae, cache_items(rng, names, surfaces), tmp_path / "fps", image_size=16, order="fps")
    build_cache(vae, cache_items(rng, names, surfaces), tmp_path / "a", image_size=16, held_out=held_out)
    moved = dict(surfaces, **{n: sphere_surface(rng, MICRO_VAE.num_points, (0.4, 0.4, 0.4)) for n in ("s4/0", "s5/0")})
    build_cache(vae, cache_items(rng, names, moved), tmp_path / "b", image_size=16, held_out=held_out)
    fps, meta = load_cache(tmp_path / "fps")
    a, meta_a = load_cache(tmp_path / "a")
    b, _ = load_cache(tmp_path / "b")
    assert meta["token_order"] == "fps" and meta_a["token_order"] == "anchored"
    assert meta["latent_shift"] == pytest.approx(meta_a["latent_shift"])  # same numbers, other order
    for key in ("lr", "hr"):
        for s in range(6):
            rows = lambda t: sorted(map(tuple, t[key][s].tolist()))  # noqa: E731
            assert rows(a) == rows(fps)
        assert not torch.equal(a[key], fps[key])
        # held-out shapes do not shape the anchors: the training entries come out the same
        assert torch.equal(a[key][:4], b[key][:4])
    with pytest.raises(ValueError, match="token order"):
        build_cache(vae, cache_items(rng, names, surfaces), tmp_path / "c", image_size=16, order="morton")
