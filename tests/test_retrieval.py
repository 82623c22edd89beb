"""Reference retrieval by silhouette (mar3d.retrieval) and the MAR that takes a reference."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mar3d.checkpoint import save_model
from mar3d.mar import MAR
from mar3d.pipeline import MAR3DPipeline
from mar3d import retrieval
from mar3d.retrieval import (MASK_SIZE, REFERENCE_FILE, EncodedLatents, ReferenceIndex, build_index, fit_probe,
                             fit_rerank_weights, from_octahedral, nearest, octahedral, pool, probe_latents,
                             rerank_cues, silhouette_iou, silhouettes)
from tests.conftest import MICRO_MAR


def drawn(kind: str, shift: int = 0, size: int = 128, colour=(90, 60, 30)) -> torch.Tensor:
    """(H, W, 3) uint8: one dark shape on white."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    box = {"square": (32, 32, 96, 96), "disc": (24, 24, 104, 104), "bar": (56, 8, 72, 120)}[kind]
    box = (box[0] + shift, box[1], box[2] + shift, box[3])
    (d.ellipse if kind == "disc" else d.rectangle)(box, fill=colour)
    return torch.from_numpy(np.array(im))


def test_silhouettes_measure_the_object_in_either_layout():
    im = torch.full((1, 128, 128, 3), 255, dtype=torch.uint8)
    im[0, 32:96, 48:80] = torch.tensor([200, 10, 10], dtype=torch.uint8)  # 64 × 32 px: 1/8 of the image
    sil = silhouettes(im)
    assert sil.shape == (1, 64 * 64)
    assert sil.sum().item() / sil.shape[1] == pytest.approx(1 / 8)
    torch.testing.assert_close(silhouettes(im.permute(0, 3, 1, 2).float() / 255), sil)
    im[0, 0, 0] = 250  # near-white counts as background
    torch.testing.assert_close(silhouettes(im), sil)
    with pytest.raises(ValueError, match="pool"):
        silhouettes(torch.zeros(1, 100, 100, 3, dtype=torch.uint8))


def test_nearest_finds_the_outline_and_skips_the_querys_own_shape():
    keys = silhouettes(torch.stack([drawn("square"), drawn("disc"), drawn("bar")]))
    query = silhouettes(torch.stack([drawn("disc", shift=6, colour=(20, 120, 200)), drawn("bar", shift=-6)]))
    assert nearest(query, keys).tolist() == [1, 2]
    # the disc key belongs to query 0's own shape: the next outline (the square) is its reference
    assert nearest(query, keys, torch.tensor([7, 8]), torch.tensor([0, 7, 2])).tolist() == [0, 2]


def test_reference_index_round_trip_and_lookup(tmp_path):
    images = torch.stack([drawn("square"), drawn("disc"), drawn("bar")])
    generator = torch.Generator().manual_seed(0)
    lr, hr = torch.randn(3, 8, 8, generator=generator), torch.randn(3, 32, 8, generator=generator)
    index = build_index(images, lr, hr)
    index.save(tmp_path / REFERENCE_FILE)
    loaded = ReferenceIndex.load(tmp_path / REFERENCE_FILE)
    assert torch.equal(loaded.dark, index.dark) and torch.equal(loaded.coarse, index.coarse)
    pixels = torch.stack([drawn("bar", shift=5), drawn("square", shift=-3)]).permute(0, 3, 1, 2).float() / 255
    got_lr, got_hr, idx = loaded.lookup(pixels)
    assert idx.tolist() == [2, 0]
    # int8 storage: within half a step (max |x| / 254 per channel) of the latents, plus the two
    # float16 roundings on the way (before quantising and after; ≤ 1e-3 each for |x| < 4)
    for got, full in ((got_lr, lr), (got_hr, hr)):
        step = full.abs().flatten(0, 1).amax(0) / 127
        assert ((got - full[[2, 0]]).abs() <= step / 2 + 2e-3).all()
    with pytest.raises(ValueError, match="as many masks"):
        ReferenceIndex(index.dark, lr[:2], hr)


def test_the_two_pass_lookup_finds_what_the_exact_search_finds(monkeypatch):
    """Passes at 16² and 32² keep shortlists, compared again at 64²: the same picks (and IoU) as
    comparing every entry at 64², here with shortlists of 64 and 8 among 400 random outlines (the
    16² pass in pieces of 96)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:MASK_SIZE, :MASK_SIZE]

    def blob():  # a union of two random ellipses
        m = np.zeros((MASK_SIZE, MASK_SIZE), bool)
        for _ in range(2):
            cy, cx, ry, rx = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(4, 20), rng.uniform(4, 20)
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        return m

    dark = torch.from_numpy(np.stack([blob() for _ in range(400)]))
    index = ReferenceIndex(dark, torch.randn(400, 4, 2), torch.randn(400, 8, 2))
    assert torch.equal(index.dark, dark) and len(index) == 400
    queries = pool(torch.from_numpy(np.stack([blob() for _ in range(40)])))
    exact = silhouette_iou(queries, pool(dark))
    torch.testing.assert_close(index.exact_iou(queries, chunk=64), exact)
    # the coarse passes' uint8 pixel counts are the masks' exact 16² and 32² averages
    torch.testing.assert_close(index.first.float() / 16, pool(dark, 16), rtol=0, atol=1e-6)
    torch.testing.assert_close(index.coarse.float() / 4, pool(dark, 32), rtol=0, atol=1e-6)
    monkeypatch.setattr(retrieval, "FIRST", 64)
    monkeypatch.setattr(retrieval, "SHORTLIST", 8)
    monkeypatch.setattr(retrieval, "CHUNK", 96)  # the 16² pass over 400 entries in 5 pieces
    for batch in (1, 10**9):  # the 32² pass over every entry for all 40 queries at once, or a query at a time
        monkeypatch.setattr(retrieval, "BATCH_QUERIES", batch)
        top, iou = index.shortlist_iou(queries, 3)
        assert torch.equal(top, exact.topk(3, dim=1).indices)
        torch.testing.assert_close(iou, exact.topk(3, dim=1).values)


def test_nearest_other_skips_the_querys_own_group_as_the_exact_search_does(monkeypatch):
    """A training entry's reference from the index: the best outline of another shape, through the
    lookup's passes (here 300 random outlines in 75 groups of 4 views, shortlists of 64 and 16)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:MASK_SIZE, :MASK_SIZE]

    def blob(cy, cx, ry, rx):
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    # each group: one random ellipse seen 4 times a little stretched, so a query's own views are its nearest
    params = rng.uniform([20, 20, 6, 6], [44, 44, 20, 20], size=(75, 4))
    dark = torch.from_numpy(np.stack([blob(*(p * [1, 1, 1 + 0.04 * v, 1])) for p in params for v in range(4)]))
    groups = torch.arange(75).repeat_interleave(4)
    index = ReferenceIndex(dark, torch.randn(300, 4, 2), torch.randn(300, 8, 2))
    queries = pool(dark[::4])  # view 0 of each group: an entry of the index itself
    exact = silhouette_iou(queries, pool(dark))
    exact[groups[None] == torch.arange(75)[:, None]] = -1
    monkeypatch.setattr(retrieval, "FIRST", 64)
    monkeypatch.setattr(retrieval, "SHORTLIST", 16)
    pick = index.nearest_other(queries, torch.arange(75), groups, k=12)
    assert (groups[pick] != torch.arange(75)).all()
    assert torch.equal(pick, exact.argmax(1))
    with pytest.raises(ValueError, match="own group"):
        index.nearest_other(queries, torch.arange(75), groups, k=4)


def train_micro(cfg, tokens, reference, steps=150):
    torch.manual_seed(0)
    mar = MAR(cfg)
    opt = torch.optim.AdamW(mar.parameters(), lr=3e-3)
    images = torch.rand(len(tokens), 3, 32, 32)
    for _ in range(steps):
        opt.zero_grad()
        mar(tokens, images, reference=reference).backward()
        opt.step()
    return mar.eval(), images


def test_probe_and_rerank_weights_recover_what_made_the_data():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(300, 4, 6, generator=g)
    A, b = torch.randn(6, 3, generator=g), torch.randn(3, generator=g)
    probe = fit_probe(features, features @ A + b, ridge=1e-6)
    assert probe.shape == (7, 3)
    torch.testing.assert_close(probe_latents(probe, features[:5]), features[:5] @ A + b, atol=1e-3, rtol=1e-3)
    # targets made from the cues plus a per-query offset (which cannot change an order)
    cues = torch.randn(50, 6, 2, generator=g)
    targets = cues @ torch.tensor([0.8, 0.3]) + torch.randn(50, 1, generator=g)
    torch.testing.assert_close(fit_rerank_weights(cues, targets), torch.tensor([0.8, 0.3]), atol=1e-4, rtol=1e-4)


def test_reranking_index_picks_the_candidate_whose_latents_the_probe_predicts(tmp_path):
    """Two entries with about the same outline: the nearest by IoU (a square) and the one whose LR
    latents the probe reads off the image's features (a square shifted by 2 px). With the index's
    re-ranker and the features the second wins; without features, or with rerank weights that
    ignore the probe, the first; the re-ranker survives a save and a load."""
    images = torch.stack([drawn("square"), drawn("square", shift=2), drawn("bar")])
    lr, hr = torch.randn(3, 8, 4), torch.randn(3, 32, 4)
    features = torch.randn(1, 8, 5)
    probe = torch.cat([torch.zeros(5, 4), torch.zeros(1, 4)])  # predicts the bias row only ...
    lr[1] = 0.0  # ... which is entry 1's latents exactly
    pixels = drawn("square").permute(2, 0, 1)[None].float() / 255
    plain = build_index(images, lr, hr)
    index = ReferenceIndex(plain.dark, plain.lr, plain.hr, probe, torch.tensor([1.0, 1.0]), candidates=2)
    top, cues = rerank_cues(torch.tensor([[1.0, 0.95, 0.1]]), probe_latents(probe, features), index.lr, 2)
    assert top.tolist() == [[0, 1]] and cues[0, 1, 1] == 0 and cues[0, 0, 1] < -0.5
    assert plain.lookup(pixels, features)[2].tolist() == [0]
    assert index.lookup(pixels)[2].tolist() == [0]
    assert index.lookup(pixels, features)[2].tolist() == [1]
    index.save(tmp_path / REFERENCE_FILE)
    loaded = ReferenceIndex.load(tmp_path / REFERENCE_FILE)
    assert loaded.candidates == 2 and torch.equal(loaded.weights, index.weights)
    assert loaded.lookup(pixels, features)[2].tolist() == [1]
    ignore_probe = ReferenceIndex(plain.dark, plain.lr, plain.hr, probe, torch.tensor([1.0, 0.0]), candidates=2)
    assert ignore_probe.lookup(pixels, features)[2].tolist() == [0]
    with pytest.raises(ValueError, match="image features"):
        index.lookup(pixels, torch.randn(1, 8, 7))
    with pytest.raises(ValueError, match="probe and its weights"):
        ReferenceIndex(plain.dark, plain.lr, plain.hr, probe)


def test_mar_learns_to_follow_its_reference():
    """Tokens are their reference plus a little noise, and the image says nothing about them:
    after a short training the loss with each entry's own reference is well below the loss with
    another entry's, for the reference-conditioned MAR with and without the residual base."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(16, 8, 8, generator=g)
    reference = tokens + 0.1 * torch.randn(16, 8, 8, generator=g)
    shuffled = reference.roll(1, dims=0)
    for residual in (False, True):
        cfg = dataclasses.replace(MICRO_MAR, reference=True, residual=residual, cond_drop=0.0)
        mar, images = train_micro(cfg, tokens, reference)
        with torch.no_grad():
            torch.manual_seed(0)
            own = mar(tokens, images, reference=reference).item()
            torch.manual_seed(0)
            other = mar(tokens, images, reference=shuffled).item()
        print(f"residual={residual}: loss own reference {own:.3f}, shuffled {other:.3f}")
        assert own < 0.5 * other
    # the residual MAR samples close to its reference (its base), far closer than the tokens' spread
    out = mar.sample(images, steps=4, cfg=1.0, diffusion_steps=10, reference=reference,
                     generator=torch.Generator().manual_seed(0))
    assert (out - reference).pow(2).mean() < 0.3 * tokens.var()
    # residual_scale scales what is added to the base: 0 gives the reference; in one step (no
    # token sees another's draw) 0.5 gives half of each residual
    def one_step(scale):
        return mar.sample(images, steps=1, cfg=1.0, diffusion_steps=10, reference=reference,
                          generator=torch.Generator().manual_seed(0), residual_scale=scale)
    assert torch.equal(one_step(0.0), reference)
    assert torch.allclose(one_step(0.5) - reference, 0.5 * (one_step(1.0) - reference), atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        mar.sample(images, steps=2, diffusion_steps=2)


def test_pipeline_needs_the_reference_index_of_its_mars(tmp_path):
    from mar3d.vae import PRESETS as VAE_PRESETS
    from mar3d.vae import PyramidVAE

    vae_cfg = dataclasses.replace(VAE_PRESETS["tiny"], latent_dim=8)
    save_model(PyramidVAE(vae_cfg), tmp_path, "vae")
    save_model(MAR(dataclasses.replace(MICRO_MAR, reference=True)), tmp_path, "mar_lr")
    save_model(MAR(dataclasses.replace(MICRO_MAR, seq_len=32, lr_seq_len=8, reference=True)), tmp_path, "mar_hr")
    with pytest.raises(FileNotFoundError, match=REFERENCE_FILE):
        MAR3DPipeline.from_pretrained(tmp_path)
    images = torch.stack([drawn("square", size=32 * 2), drawn("disc", size=64)])
    build_index(images, torch.randn(2, 8, 8), torch.randn(2, 32, 8)).save(tmp_path / REFERENCE_FILE)
    pipe = MAR3DPipeline.from_pretrained(tmp_path)
    assert len(pipe.references) == 2
    # an index that re-ranks reads the MAR-LR's image features; Settings(rerank=False) keeps the IoU pick
    from mar3d.pipeline import Settings

    # (the probe reads one feature per LR token: a readout encoder's LR queries, as the shipped MARs')
    readout = dataclasses.replace(MICRO_MAR.image_encoder, kind="readout", readout_lr=8, readout_hr=32, output="lr",
                                  image_size=64, patch_size=16)
    pipe.mar_lr = MAR(dataclasses.replace(MICRO_MAR, reference=True, image_encoder=readout)).eval()
    lr = torch.randn(2, 8, 8)
    lr[1] = 0.0  # the probe's prediction (its bias row, zero): entry 1 is "nearer in 3D"
    width = pipe.mar_lr.image_encoder.dim
    index = build_index(images, lr, torch.randn(2, 32, 8))
    pipe.references = ReferenceIndex(index.dark, index.lr, index.hr, torch.zeros(width + 1, 8),
                                     torch.tensor([1.0, 1.0]), candidates=2)
    pixels = drawn("square", size=64).permute(2, 0, 1)[None].float() / 255  # the square's outline: entry 0
    got = pipe.lookup_reference(pixels, Settings())[0]
    torch.testing.assert_close(got, pipe.references.lr[1:2].float())
    got = pipe.lookup_reference(pixels, Settings(rerank=False))[0]
    torch.testing.assert_close(got, pipe.references.lr[0:1].float())


def test_octahedral_normals_round_trip_within_a_degree_and_a_half():
    normals = torch.nn.functional.normalize(torch.randn(5000, 3), dim=-1)
    normals[:6] = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    back = from_octahedral(octahedral(normals))
    degrees = torch.rad2deg(torch.acos((back * normals).sum(-1).clamp(-1, 1)))
    assert degrees.max() < 1.5 and degrees.mean() < 0.5
    assert octahedral(normals).dtype == torch.int8


def test_surface_index_encodes_each_views_turned_shape_like_the_cache(tmp_path, synthetic_data):
    """An index that stores surfaces (pilot V4's compact form): entry i's latents are the VAE's
    tokens of its shape turned into its view's frame, in anchored order, as build_cache makes
    them; stored as int16 / octahedral int8 they decode to nearly the same occupancy."""
    from mar3d.render import rotate_to_azimuth
    from mar3d.token_order import anchored, fit_anchors
    from mar3d.vae import PyramidVAE
    from tests.conftest import MICRO_VAE

    torch.manual_seed(0)
    vae = PyramidVAE(MICRO_VAE).eval()
    P, M = MICRO_VAE.num_points, MICRO_VAE.hr_tokens
    files = sorted(synthetic_data.glob("*.npz"))[:3]
    surfaces = torch.from_numpy(np.stack([np.load(f)["surface"][:P] for f in files])).float()
    ids, azimuths = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0.0, 90.0, 200.0, 30.0, 300.0])
    turned = np.stack([rotate_to_azimuth(surfaces[i].numpy(), float(a)) for i, a in zip(ids, azimuths)])
    anchors = fit_anchors(turned[:, :M, :3])
    with torch.no_grad():
        expected, again = anchored(vae.encode(torch.from_numpy(turned), "hr"), turned[:, :M, :3], np.ones(5, bool))
    assert np.allclose(again, anchors)
    hr = EncodedLatents(vae, "hr", surfaces, ids, azimuths, anchors)
    lr = EncodedLatents(vae, "lr", surfaces, ids, azimuths, None)
    assert hr.shape == (5, M, MICRO_VAE.latent_dim) and len(lr) == 5
    torch.testing.assert_close(hr[torch.tensor([[3, 1], [0, 4]])], expected[torch.tensor([[3, 1], [0, 4]])])
    with torch.no_grad():
        torch.testing.assert_close(lr[2], vae.encode(torch.from_numpy(turned[2:3]), "lr")[0])
    # the silhouettes pick the entry; the stored surfaces give nearly its latents back
    images = torch.stack([drawn("square"), drawn("disc"), drawn("bar"), drawn("disc", shift=30), drawn("bar", shift=-40)])
    index = ReferenceIndex(images.min(dim=-1).values < 245, lr, hr)
    index.save(tmp_path / REFERENCE_FILE)
    with pytest.raises(ValueError, match="VAE"):
        ReferenceIndex.load(tmp_path / REFERENCE_FILE)
    loaded = ReferenceIndex.load(tmp_path / REFERENCE_FILE, vae=vae)
    got_lr, got_hr, idx = loaded.lookup(drawn("bar", shift=-38).permute(2, 0, 1)[None].float() / 255)
    assert idx.tolist() == [4]
    torch.testing.assert_close(got_hr[0], expected[4], atol=0.05 * expected.abs().max().item(), rtol=0)
    assert (loaded.hr.surfaces.stored - surfaces).abs().max() < 0.02  # normals off by ≤ 1.5°, positions by 1/65534


def test_procedural_shapes_are_made_again_as_data_preparation_made_them(tmp_path):
    """An index may name procedural shapes instead of storing their surfaces (pilot S4): a lookup
    makes the shape again from its name. The surface must be the one the shapes and prepare
    stages write for that name (same points, same FPS order), survive a save and load beside
    stored surfaces, and a changed generator must show in `check`."""
    from mar3d.geometry import PrepareConfig, load_mesh, normalize_mesh, prepare_shape
    from mar3d.prepare import shape_seed
    from mar3d.shapes import _write_ply, make_shape
    from mar3d.shapes import shape_seed as dataset_seed
    from mar3d.vae import PyramidVAE
    from tests.conftest import MICRO_VAE

    # the stages' way: a PLY file of the dataset, loaded, normalised, sampled (its first points)
    _write_ply(make_shape("mug", dataset_seed(0, "mug", 7)), tmp_path / "mug_00007.ply")
    mesh, _, _ = normalize_mesh(load_mesh(tmp_path / "mug_00007.ply"), 1.9, "cylinder")
    cfg = PrepareConfig(num_surface=4096, num_uniform=8, num_near=8, normalize="cylinder")
    staged = prepare_shape(mesh, cfg, shape_seed("mug_00007"))["surface"][:256]
    made = retrieval.procedural_surface("mug_00007", 256)
    np.testing.assert_allclose(made, staged, atol=1e-4)
    with pytest.raises(ValueError, match="procedural"):
        retrieval.procedural_surface("real__spot@03", 256)

    torch.manual_seed(0)
    vae = PyramidVAE(MICRO_VAE).eval()
    P = MICRO_VAE.num_points
    names = ["mug_00007", "table_00003"]
    extents = retrieval.extent(np.stack([retrieval.procedural_surface(n, P) for n in names]))
    stored = torch.from_numpy(retrieval.procedural_surface("chair_00001", P))[None]
    surfaces = retrieval.ShapeSurfaces(stored, names, extents)
    assert len(surfaces) == 3 and surfaces.check([0, 1]) < 1e-5
    ids, azimuths = torch.tensor([0, 1, 2, 2]), torch.tensor([0.0, 40.0, 90.0, 250.0])
    lr, hr = (EncodedLatents(vae, key, surfaces, ids, azimuths) for key in ("lr", "hr"))
    images = torch.stack([drawn("square"), drawn("disc"), drawn("bar"), drawn("bar", shift=-40)])
    ReferenceIndex(images.min(dim=-1).values < 245, lr, hr).save(tmp_path / REFERENCE_FILE)
    loaded = ReferenceIndex.load(tmp_path / REFERENCE_FILE, vae=vae)
    assert loaded.lr.surfaces.names == names and len(loaded.lr.surfaces.stored) == 1
    got_lr, got_hr, idx = loaded.lookup(drawn("bar", shift=-38).permute(2, 0, 1)[None].float() / 255)
    assert idx.tolist() == [3]  # table_00003 at 250°, made again
    with torch.no_grad():
        turned = retrieval.rotate_to_azimuth(retrieval.procedural_surface("table_00003", P), 250.0)
        torch.testing.assert_close(got_hr[0], vae.encode(torch.from_numpy(turned)[None], "hr")[0])
    # a generator that no longer makes the shape it made: the extents disagree
    moved = retrieval.ShapeSurfaces(stored, names, extents * torch.tensor([1.0, 1.1, 1.0]))
    assert moved.check([0, 1]) > 0.05
