"""Train the demo cascade end to end: shapes → prepare → render → VAE → latent cache → MAR-LR → MAR-HR.

    python scripts/train_demo.py --work data/demo --out checkpoints            # all stages, resumable
    python scripts/train_demo.py --work data/demo --out checkpoints --only vae # one stage
    python scripts/train_demo.py ... --set device=cuda vae_steps=20000         # a larger run on a GPU

Every stage writes its outputs under --work and skips what is already there, and the training
stages resume from their last train state, so an interrupted run continues where it stopped.
Each stage's wall time is appended to <work>/stages.jsonl (for the model card). CI never runs this.

MAR-LR and MAR-HR both train on the latent cache (MAR-HR is conditioned on the cached LR tokens,
not on MAR-LR samples), so with `parallel_mar` they run at the same time, one CPU thread each:
on small models two single-thread processes get more done than one two-thread process.
They learn residuals from each entry's nearest render of another training shape in the cache;
then stage mar_references gives each training entry the reference the shipped index would give
it (another shape's view, among all its entries) and stage mar_tune fine-tunes both MARs on
those (pilot MR in checkpoints/README.md). With that file beside the cache, any later MAR
training takes its references from it.
The evaluation stages write meshes under <work>/eval/ and score them with mar3d.evaluate:
    python -m mar3d.evaluate <work>/eval/vae <work>/eval/gt_shape      # VAE reconstruction
    python -m mar3d.evaluate <work>/eval/image <work>/eval/gt_view     # image → 3D
Stage unseen builds the real meshes no stage trains on (`unseen_meshes`, left out by the shapes
stage, and those the hash split holds out) into <work>/unseen and scores the VAE on them there.
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mar3d.cache import CACHE_FILE, build_cache  # noqa: E402
from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.cli import parse_bool  # noqa: E402
from mar3d.extract import extract_mesh  # noqa: E402
from mar3d.geometry import PrepareConfig  # noqa: E402
from mar3d.image_encoder import ImageEncoderConfig  # noqa: E402
from mar3d.mar import PRESETS as MAR_PRESETS  # noqa: E402
from mar3d.prepare import prepare_dir, shape_seed  # noqa: E402
from mar3d.preprocess import preprocess_image  # noqa: E402
from mar3d.render import Camera, render_views, rotate_to_view  # noqa: E402
from mar3d.retrieval import SurfaceRecipe  # noqa: E402
from mar3d.shapes import build_dataset  # noqa: E402
from mar3d.single_view import OccConfig, ReconConfig  # noqa: E402
from mar3d.train import TrainConfig, train  # noqa: E402
from mar3d.vae import PRESETS as VAE_PRESETS  # noqa: E402

SHARED_MESHES = Path(__file__).resolve().parents[2] / "shared" / "data" / "meshes"
# cylinder normalisation: shapes stay inside the box when turned into a camera's frame
PREPARE = PrepareConfig(num_surface=4096, num_uniform=16384, num_near=16384, normalize="cylinder")
DATASET_SEED = 0  # the shapes stage's
# how those two stages make a procedural shape's surface points, for an index that makes them again
SURFACE_RECIPE = SurfaceRecipe(DATASET_SEED, PREPARE.extent, PREPARE.normalize, PREPARE.num_surface)


@dataclass
class Recipe:
    shapes: int = 3000           # procedural training + held-out shapes
    real_variants: int = 20      # randomly turned / scaled copies of each shared mesh
    val_percent: float = 4.0     # held-out test share, by a hash of the shape name (≈ 130 shapes)
    validation_percent: float = 4.0  # the next hash bucket: pilots are scored on it; no training step sees it
    views: int = 4               # condition renders per shape
    render_size: int = 128
    workers: int = 2
    # The shipped checkpoint's recipe (pilot P4 in checkpoints/README.md): the VAE, the single-view
    # reconstructor R7 whose encoder the MARs take frozen, then residual MARs on the retrieved
    # reference shape. With data preparation about 3 h of a 2-core CPU, trained in pieces.
    vae_steps: int = 5500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # then the VAE's decoder alone trained on, the encoder frozen so every token stays as it was,
    # decoding latents with noise of std U(0, vae_tune_noise)·std(latents) so that tokens a little
    # wrong (generated ones) decode a little wrong, and with `vae_tune_layers` more decoder
    # self-attention layers that start as the identity. Off: pilot D2 (model card) made the VAE's own
    # reconstructions better and left the cascade level (D2d: 5,500 steps, noise 0.25, test 0.710 / 0.665)
    vae_tune_steps: int = 0
    vae_tune_noise: float = 0.25
    vae_tune_layers: int = 0
    vae_tune_lr: float = 3e-4
    mar_lr_steps: int = 800
    mar_hr_steps: int = 600
    mar_batch: int = 32
    mar_lr: float = 5e-4
    # the frozen image encoder: single-view reconstruction pretraining (mar3d.single_view); 0 steps = none
    recon_steps: int = 3000
    recon_batch: int = 32
    recon_lr: float = 1e-3
    recon_queries: int = 256     # occupancy samples per shape and step of the BCE through the frozen VAE decoder
    recon_bce_weight: float = 1.0
    recon_stem: str = "conv"     # the reconstructor ViT's patch embedding: "patch" (linear) or "conv" (conv stack)
    recon_patch: int = 16        # its patch size: 16 → an 8×8 token grid on 128² images, 8 → 16×16
    recon_layers: int = 8        # its ViT depth (cheap: 65 tokens) ...
    recon_readout_layers: int = 1  # ... and the readout head's (dear: one query per LR + HR token)
    # pilot O1: image → occupancy directly (mar3d.single_view.ImageOccupancy); 0 steps = none
    occ_steps: int = 0
    occ_patch: int = 16
    occ_layers: int = 8
    occ_dec_layers: int = 2
    occ_queries: int = 512
    occ_pixel: bool = False      # pilot O3: pixel-aligned features at a predicted camera (mar3d.projection)
    mar_aux_weight: float = 0.0  # MAR: aux regression of the masked tokens from z
    mar_mask_ratio_min: float = 0.7  # MAR training mask ratio: N(1, std) truncated to [min, 1] ([ref]: 0.7, 0.25)
    mar_mask_ratio_std: float = 0.25
    mar_cond_mode: str = "aligned"  # MAR: "prefix" or "aligned" (needs the readout encoder: recon_steps > 0)
    mar_residual: bool = True    # MAR: model residuals from a base (the reference, else the reconstructor's tokens)
    mar_reference: bool = True   # MAR: also take the nearest-silhouette training shape's tokens (mar3d.retrieval)
    # MAR: each training entry's reference as the shipped index picks it (another shape among all its
    # entries: stage mar_references), not the nearest of the cache's renders (pilot MR)
    mar_index_references: bool = True
    # then MAR-LR / MAR-HR fine-tuned this many steps on those references, from the trained ones
    # (pilot MR: the stop-22 MARs, 800 / 600 steps on the cache's references, tuned 1,000 / 700)
    mar_tune_lr_steps: int = 1000
    mar_tune_hr_steps: int = 700
    mar_tune_lr: float = 2e-4
    reference_views: int = 4     # views of each training shape the shipped index keeps (stop 24: 1; pilot V4: all 4)
    reference_store: str = "surfaces"  # the index holds each shape's "surfaces" once (V4), or int8 "latents" per entry
    # views of each training shape rendered for the index alone, beyond the cache's (their masks and
    # azimuths; needs "surfaces"): pilot V16, 4 + 12 = 16 views, 48,672 entries
    reference_extra_views: int = 12
    # procedural shapes per family made for the index alone, numbered after the training shapes
    # (their test and validation buckets left out; each with 16 views): pilot S4, 600 (4 times the
    # training shapes); pilot S8, 1,200; pilot S12 (stop 32), 1,800 (since stop 33, pilot S13T, the
    # shipped MARs are tuned on its references). The index names procedural shapes and a lookup
    # makes them again (ShapeSurfaces)
    reference_extra_shapes: int = 1800
    # families no stage trains on, made for the index alone (`reference_extra_shapes` each, numbered
    # from 0, their test and validation buckets left out); the shapes stage spreads `shapes` over the
    # other families. Pilot S13 (stop 33): "plush", stocky organic quadrupeds
    index_only_families: str = "plush"
    # the index's own views (`reference_extra_views`, the index-only shapes') rendered shaded as the
    # cache's (stop 33), or flat for their masks alone (mar3d.render.render_flat: the same coverage,
    # one colour, no shading; the masks agree on 99.97 % of pixels at half the time): pilot S14, shipped
    index_shaded: bool = False
    # the index re-ranks this many top-IoU entries (0: no re-ranker). Pilot RL (stop 24) fitted one
    # for 1 view per shape; at 16 views it is level with the IoU's own pick (pilot V16): none since stop 27
    rerank_candidates: int = 0
    rerank_queries: int = 600    # training shapes whose candidates fit the re-ranker's two weights
    parallel_mar: bool = True    # MAR-LR and MAR-HR at once, one thread each (CPU)
    eval_shapes: int = 200       # held-out shapes scored by the evaluation stages (all there are, ≈ 130)
    # shared meshes no stage trains on or indexes, none of their variants or views (the issue's
    # "real shapes never seen"); chosen at stop 31 before any of them was scored apart. Stage
    # "unseen" builds them into <work>/unseen with the real meshes the hash split holds out (Spot)
    unseen_meshes: str = "cat_lowres,rocker_arm,utah_teapot"
    device: str = "cpu"


def timed_stage(work: Path, name: str):
    """Start timing a stage; the returned `done(**info)` appends its wall time to stages.jsonl."""
    start = time.time()

    def done(**info):
        record = {"stage": name, "seconds": round(time.time() - start, 1), **info}
        with (work / "stages.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    return done


def unseen_meshes(r: Recipe) -> set[str]:
    return {m for m in r.unseen_meshes.split(",") if m}


def real_mesh_of(shape: str) -> str | None:
    """"real__spot@03" → "spot"; None for a procedural shape."""
    return shape.split("@")[0].removeprefix("real__") if shape.startswith("real__") else None


def index_only_families(r: Recipe) -> list[str]:
    return [f for f in r.index_only_families.split(",") if f]


def training_families(r: Recipe) -> list[str]:
    """The procedural families the shapes stage builds: all of mar3d.shapes.FAMILIES but the index-only ones."""
    from mar3d.shapes import FAMILIES

    index_only = set(index_only_families(r))
    unknown = index_only - set(FAMILIES)
    if unknown:
        raise ValueError(f"index_only_families names no family: {', '.join(sorted(unknown))} (FAMILIES: {', '.join(FAMILIES)})")
    return [f for f in FAMILIES if f not in index_only]


def stage_shapes(r: Recipe, work: Path) -> None:
    done = timed_stage(work, "shapes")
    real = SHARED_MESHES if SHARED_MESHES.is_dir() else None
    seen = None if real is None else {p.stem for p in real.iterdir()} - unseen_meshes(r)
    report = build_dataset(work / "shapes", r.shapes, seed=DATASET_SEED, real_dir=real, real_variants=r.real_variants,
                           workers=r.workers, real_meshes=seen, families=training_families(r))
    leaked = sorted({real_mesh_of(p.stem) for p in (work / "shapes").glob("real__*")} & unseen_meshes(r))
    if leaked:  # a folder built before they were left out: every later stage would train on them
        raise SystemExit(f"{work / 'shapes'} holds variants of {', '.join(leaked)}, which recipe.unseen_meshes "
                         "leaves out of training: delete them (shapes/, prepared/, renders/) and run again")
    done(failed=len(report.get("failed", [])))


def stage_prepare(r: Recipe, work: Path) -> None:
    done = timed_stage(work, "prepare")
    report = prepare_dir(work / "shapes", work / "prepared", PREPARE, workers=r.workers)
    done(prepared=len(report["prepared"]), failed=len(report["failed"]))


def stage_render(r: Recipe, work: Path) -> None:
    done = timed_stage(work, "render")
    done(rendered=render_dir(r, work))


def render_dir(r: Recipe, work: Path) -> int:
    """`views` RGBA renders per prepared shape of `work`, of the same normalised mesh, with their
    cameras → <work>/renders/<shape>/; resumable; returns how many shapes it rendered."""
    from mar3d.geometry import load_mesh

    out = work / "renders"
    count = 0
    for npz in sorted((work / "prepared").glob("*.npz")):
        folder = out / npz.stem
        if (folder / "cameras.json").exists():
            continue
        data = np.load(npz)
        mesh = load_mesh(work / "shapes" / str(data["source"]))
        mesh.vertices = (mesh.vertices - data["center"]) * data["scale"]  # exactly the prepared frame
        rng = np.random.default_rng(shape_seed(npz.stem) + 1)  # views differ from the prepare draws
        folder.mkdir(parents=True, exist_ok=True)
        cameras = []
        for k, (rgba, camera) in enumerate(render_views(mesh, r.views, rng, size=r.render_size)):
            Image.fromarray(rgba).save(folder / f"{k}.png")
            cameras.append(camera.to_dict())
        (folder / "cameras.json").write_text(json.dumps(cameras))
        count += 1
    return count


def left_out(r: Recipe) -> float:
    """The hash share no training step sees: the test split and the validation split."""
    return r.val_percent + r.validation_percent


def image_task_config(r: Recipe, steps: int, queries: int, out: Path, threads: int) -> TrainConfig:
    """The recon and occ tasks' training settings: the recon batch and learning rate, the VAE in `out`."""
    return TrainConfig(steps=steps, batch_size=r.recon_batch, lr=r.recon_lr, min_lr=r.recon_lr / 10,
                       val_percent=left_out(r), device=r.device, eval_every=500, save_every=250,
                       threads=threads, vae_dir=str(out), queries=queries)


def stage_train(r: Recipe, work: Path, out: Path, task: str, threads: int = 0) -> None:
    done = timed_stage(work, task)
    if task == "vae":
        cfg = TrainConfig(steps=r.vae_steps, batch_size=r.vae_batch, lr=r.vae_lr, min_lr=r.vae_lr / 10,
                          augment_yaw=True, val_percent=left_out(r), device=r.device, eval_every=500, save_every=250,
                          threads=threads)
        last = train("vae", VAE_PRESETS["tiny"], cfg, work / "prepared", out)
    elif task == "recon":
        if not r.recon_steps:
            return done(skipped=True)
        cfg = image_task_config(r, r.recon_steps, r.recon_queries, out, threads)
        encoder = ImageEncoderConfig(kind="readout", stem=r.recon_stem, patch_size=r.recon_patch,
                                     layers=r.recon_layers, readout_layers=r.recon_readout_layers)
        last = train("recon", ReconConfig(bce_weight=r.recon_bce_weight, encoder=encoder), cfg, work, out)
    elif task == "occ":
        if not r.occ_steps:
            return done(skipped=True)
        cfg = image_task_config(r, r.occ_steps, r.occ_queries, out, threads)
        encoder = ImageEncoderConfig(kind="tiny", stem="conv", patch_size=r.occ_patch, layers=r.occ_layers)
        last = train("occ", OccConfig(dec_layers=r.occ_dec_layers, encoder=encoder, pixel_aligned=r.occ_pixel), cfg, work, out)
    else:
        steps = r.mar_lr_steps if task == "mar_lr" else r.mar_hr_steps
        cfg = TrainConfig(steps=steps, batch_size=r.mar_batch, lr=r.mar_lr, min_lr=r.mar_lr / 10,
                          val_percent=left_out(r), device=r.device, eval_every=500, save_every=250,
                          threads=threads, init_encoder=str(out) if r.recon_steps else "")
        preset = dataclasses.replace(MAR_PRESETS["tiny"], aux_weight=r.mar_aux_weight, cond_mode=r.mar_cond_mode,
                                     residual=r.mar_residual, reference=r.mar_reference,
                                     mask_ratio_min=r.mar_mask_ratio_min, mask_ratio_std=r.mar_mask_ratio_std)
        last = train(task, preset, cfg, work / "cache", out)
    done(**last)


def stage_mar_tune(r: Recipe, work: Path, out: Path, task: str, threads: int = 0) -> None:
    """MAR-LR or MAR-HR fine-tuned on the index's references (stage mar_references), from the
    trained one in `out` (pilot MR): trained under <work>/tune (resumable), then written back to
    `out` with float16 parameters, as shipped. Skipped once `out` holds the tuned model."""
    from mar3d.checkpoint import read_header, save_model

    done = timed_stage(work, f"{task}_tune")
    steps = r.mar_tune_lr_steps if task == "mar_lr" else r.mar_tune_hr_steps
    if not (steps and r.mar_reference and r.mar_index_references):
        return done(skipped=True)
    if read_header(out, task)["metadata"].get("tune_steps") == steps:
        return done(skipped=True)
    cfg = TrainConfig(steps=steps, batch_size=r.mar_batch, lr=r.mar_tune_lr, min_lr=r.mar_tune_lr / 10, warmup=50,
                      val_percent=left_out(r), device=r.device, eval_every=500, save_every=250, threads=threads,
                      init_from=str(out))
    preset = dataclasses.replace(MAR_PRESETS["tiny"], reference=True)  # the trained model's config is what counts
    last = train(task, preset, cfg, work / "cache", work / "tune")
    tuned = load_model(work / "tune", task)
    save_model(tuned, out, task, metadata={**read_header(work / "tune", task)["metadata"], "tune_steps": steps},
               half=True)
    done(**last)


def stage_vae_tune(r: Recipe, work: Path, out: Path, threads: int = 0) -> None:
    """The trained VAE's decoder trained on alone (pilot D2): under <work>/vae_tune (resumable), then
    written over `out`'s VAE. The encoder is frozen, so the cache, the index and the MARs, which all
    hold or read its tokens, need nothing redone. Skipped once `out` holds the tuned VAE."""
    from mar3d.checkpoint import read_header, save_model

    done = timed_stage(work, "vae_tune")
    if not r.vae_tune_steps:
        return done(skipped=True)
    if read_header(out, "vae")["metadata"].get("tune_steps") == r.vae_tune_steps:
        return done(skipped=True)
    cfg = TrainConfig(steps=r.vae_tune_steps, batch_size=r.vae_batch, lr=r.vae_tune_lr, min_lr=r.vae_tune_lr / 10,
                      augment_yaw=True, val_percent=left_out(r), device=r.device, eval_every=500, save_every=250,
                      threads=threads, vae_dir=str(out), decoder_only=True)
    base = load_model(out, "vae").cfg  # the trained VAE's own config, whatever it was trained with
    tuned = dataclasses.replace(base, dec_layers=base.dec_layers + r.vae_tune_layers, latent_noise=r.vae_tune_noise)
    last = train("vae", tuned, cfg, work / "prepared", work / "vae_tune")
    save_model(load_model(work / "vae_tune", "vae"), out, "vae",
               metadata={**read_header(work / "vae_tune", "vae")["metadata"], "tune_steps": r.vae_tune_steps})
    done(**last)


def stage_cache(r: Recipe, work: Path, out: Path) -> None:
    """VAE tokens of every (shape, view), the shape turned into the view's frame, beside its render,
    in anchored token order (mar3d.token_order)."""
    from mar3d.data import is_held_out

    done = timed_stage(work, "cache")
    if (work / "cache" / CACHE_FILE).exists():
        return done(skipped=True)
    vae = load_model(out, "vae", r.device)

    def items():
        for npz in sorted((work / "prepared").glob("*.npz")):
            surface = np.load(npz)["surface"]
            cameras = json.loads((work / "renders" / npz.stem / "cameras.json").read_text())
            for k, cam in enumerate(cameras):
                turned = rotate_to_view(surface, Camera.from_dict(cam)).astype(np.float32)
                yield f"{npz.stem}/{k}", turned, work / "renders" / npz.stem / f"{k}.png"

    def held_out(name: str) -> bool:  # the anchors of the token order come from training shapes only
        return is_held_out(name, left_out(r))  # "<shape>/<view>" splits by its shape

    image_size = MAR_PRESETS["tiny"].image_encoder.image_size
    order = "anchored" if vae.cfg.queries == "fps" else "fps"  # learned queries: already a fixed order
    done(**build_cache(vae, items(), work / "cache", image_size=image_size, order=order, held_out=held_out))


def in_reference_index(r: Recipe, name: str) -> bool:
    """Whether cache entry "<shape>/<view>" is in the shipped index: a training shape's view below `reference_views`."""
    from mar3d.data import is_held_out

    return not is_held_out(name, left_out(r)) and int(name.split("/")[1]) < r.reference_views


def stage_reference(r: Recipe, work: Path, out: Path) -> None:
    """The reference index a MAR with `mar_reference` retrieves from at inference (and ships with):
    the training entries of the cache, the entries MARTask draws references from, less views
    `reference_views` and above; stored as int8 latents per entry or, with `reference_store`
    "surfaces" (the default since stop 26), as each shape's surface once (`surface_index`)."""
    from mar3d.cache import load_cache
    from mar3d.retrieval import REFERENCE_FILE, build_index

    done = timed_stage(work, "reference")
    if not r.mar_reference or (out / REFERENCE_FILE).exists():
        return done(skipped=True)
    data, meta = load_cache(work / "cache")
    keep = torch.tensor([in_reference_index(r, n) for n in meta["names"]])
    if r.reference_store == "surfaces":
        return done(**surface_index(r, work, out, data, meta, keep))
    if r.reference_extra_views:
        raise ValueError("reference_extra_views needs reference_store 'surfaces' (an entry's latents come from its surface)")
    if r.reference_store != "latents":
        raise ValueError(f"reference_store must be 'latents' or 'surfaces', not {r.reference_store!r}")
    build_index(data["images"][keep], data["lr"][keep], data["hr"][keep]).save(out / REFERENCE_FILE)
    done(entries=int(keep.sum()))


def surface_index(r: Recipe, work: Path, out: Path, data: dict, meta: dict, keep: torch.Tensor) -> dict:
    """The index of pilot V4 stored compactly (mar3d.retrieval.EncodedLatents): the kept entries'
    binary 64² silhouettes (the lookup's own), each training shape once (its FPS surface points, or
    for a procedural shape its name: pilot S4), and each entry's azimuth; then `reference_extra_views`
    more views of each training shape and `reference_extra_shapes` index-only procedural shapes
    per family (masks, azimuths and names only). The anchors of the token order are fitted again exactly as the cache
    fitted them (same query points, same entries); the tokens that the saved index encodes are
    compared with the cache's, on 64 entries."""
    from mar3d.data import is_held_out
    from mar3d.render import rotate_to_azimuth
    from mar3d.retrieval import (MASK_SIZE, PROCEDURAL_NAME, REFERENCE_FILE, EncodedLatents, ReferenceIndex,
                                 ShapeSurfaces, extent, silhouette_iou, silhouettes)
    from mar3d.token_order import fit_anchors

    vae = load_model(out, "vae", r.device).eval()
    names = meta["names"]
    shape_of = {n: n.split("/")[0] for n in names}
    azimuth, surface = {}, {}
    for shape in dict.fromkeys(shape_of.values()):
        cameras = json.loads((work / "renders" / shape / "cameras.json").read_text())
        azimuth |= {f"{shape}/{k}": cam["azimuth_deg"] for k, cam in enumerate(cameras)}
        surface[shape] = np.load(work / "prepared" / f"{shape}.npz")["surface"]
    M = vae.cfg.hr_tokens
    queries = np.stack([rotate_to_azimuth(surface[shape_of[n]][:M], azimuth[n])[:, :3].astype(np.float32)
                        for n in names])
    fit = np.array([not is_held_out(n, left_out(r)) for n in names])
    anchors = {key: fit_anchors(queries[fit, :vae.cfg.num_tokens(key)]) for key in ("lr", "hr")}
    kept = [n for n, k in zip(names, keep.tolist()) if k]
    # shape → its row: shapes only the data have (the real meshes' variants) keep their points in
    # the index, procedural ones are named and made again at lookup (mar3d.retrieval.ShapeSurfaces)
    order = list(dict.fromkeys(shape_of[n] for n in kept))
    procedural = [s for s in order if PROCEDURAL_NAME.match(s)]
    order = [s for s in order if not PROCEDURAL_NAME.match(s)] + procedural
    shapes = {s: i for i, s in enumerate(order)}
    P = vae.cfg.num_points
    stored = torch.from_numpy(np.stack([surface[s][:P] for s in order[: len(order) - len(procedural)]])).float()
    extents = extent(np.stack([surface[s][:P] for s in procedural]))
    ids = torch.tensor([shapes[shape_of[n]] for n in kept])
    azimuths = torch.tensor([azimuth[n] for n in kept])
    dark = (silhouettes(data["images"][keep]) > 0.5).view(-1, MASK_SIZE, MASK_SIZE)
    if r.reference_extra_views:  # more views of each shape, masks only: appended after the cache's entries
        import multiprocessing as mp

        image_size = MAR_PRESETS["tiny"].image_encoder.image_size  # the cache's condition images
        with mp.get_context("spawn").Pool(r.workers) as pool:
            extra = pool.map(extra_index_views, [(work, s, r.reference_extra_views, r.render_size, image_size,
                                                  r.index_shaded)
                                                 for s in shapes],
                             chunksize=16)
        dark = torch.cat([dark, *(m for m, _ in extra)])
        ids = torch.cat([ids, torch.tensor(list(shapes.values())).repeat_interleave(r.reference_extra_views)])
        azimuths = torch.cat([azimuths, *(a for _, a in extra)])
    if r.reference_extra_shapes:  # index-only procedural shapes, views and points made (and kept) under <work>
        import multiprocessing as mp

        trained = training_families(r)
        first = r.shapes // len(trained)  # the shapes stage numbers each family's shapes from 0
        more = [f"{f}_{k:05d}" for k in range(first, first + r.reference_extra_shapes) for f in trained]
        more += [f"{f}_{k:05d}" for k in range(r.reference_extra_shapes) for f in index_only_families(r)]
        more = [n for n in more if not is_held_out(n, left_out(r))]
        image_size = MAR_PRESETS["tiny"].image_encoder.image_size
        views = r.reference_views + r.reference_extra_views  # as many as each training shape has
        with mp.get_context("spawn").Pool(r.workers) as pool:
            made = pool.map(index_shape, [(work, n, views, r.render_size, image_size, P, r.index_shaded) for n in more],
                            chunksize=16)
        more, made = [n for n, m in zip(more, made) if m is not None], [m for m in made if m is not None]
        dark = torch.cat([dark, *(torch.from_numpy(m["masks"]) for m in made)])
        ids = torch.cat([ids, torch.arange(len(order), len(order) + len(more)).repeat_interleave(views)])
        azimuths = torch.cat([azimuths, *(torch.from_numpy(m["azimuths"]) for m in made)])
        procedural += more
        extents = torch.cat([extents, extent(np.stack([m["surface"] for m in made]))])
    surfaces = ShapeSurfaces(stored, procedural, extents, SURFACE_RECIPE)
    latents = [EncodedLatents(vae, key, surfaces, ids, azimuths, anchors[key]) for key in ("lr", "hr")]
    ReferenceIndex(dark, *latents).save(out / REFERENCE_FILE)
    saved = ReferenceIndex.load(out / REFERENCE_FILE, vae=vae)
    rows = keep.nonzero()[:, 0][:: max(1, int(keep.sum()) // 64)][:64]
    at = torch.searchsorted(keep.nonzero()[:, 0], rows)
    side = torch.linspace(-0.95, 0.95, 24)
    grid = torch.stack(torch.meshgrid(side, side, side, indexing="ij"), -1).reshape(-1, 3)
    check = {}
    for key, fp32 in (("lr", latents[0]), ("hr", latents[1])):
        cached = data[key][rows].float()
        check[f"{key}_fp32_max_error"] = float((fp32[at] - cached).abs().max())
        with torch.no_grad():
            occ = lambda x: torch.stack([vae.occupancy_fn(z[None])(grid).reshape(-1) > 0 for z in x])  # noqa: E731
            ious = silhouette_iou(occ(getattr(saved, key)[at]).float(), occ(cached).float()).diagonal()
        check[f"{key}_stored_iou24_min"] = round(float(ious.min()), 4)
    rows = list(range(0, len(procedural), max(1, len(procedural) // 32)))
    check["procedural_extent_max_error"] = saved.lr.surfaces.check(rows)  # made again against the stage's points
    return dict(entries=len(dark), cache_entries=int(keep.sum()), shapes=len(surfaces),
                stored_shapes=len(stored), procedural_shapes=len(procedural), **check)


def index_views(mesh, shape: str, n: int, size: int, image_size: int, shaded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (n, 64, 64) bool, azimuths (n,)) of n random views of a normalised shape, made as the
    cache makes its condition images (render, shaded or flat, then preprocess), for the reference
    index only."""
    from mar3d.retrieval import MASK_SIZE, silhouettes

    rng = np.random.default_rng(shape_seed(shape) + 2)  # other draws than the cache's views (+ 1)
    images, azimuths = [], []
    for rgba, camera in render_views(mesh, n, rng, size=size, shaded=shaded):
        images.append(np.asarray(preprocess_image(Image.fromarray(rgba), "auto", 0.85, size=image_size).image))
        azimuths.append(camera.azimuth_deg)
    masks = silhouettes(torch.from_numpy(np.stack(images))) > 0.5
    return masks.view(n, MASK_SIZE, MASK_SIZE), torch.tensor(azimuths)


def extra_index_views(job) -> tuple[torch.Tensor, torch.Tensor]:
    """`index_views` of a prepared shape: n more views beside the cache's."""
    from mar3d.geometry import load_mesh

    work, shape, n, size, image_size, shaded = job
    data = np.load(work / "prepared" / f"{shape}.npz")
    mesh = load_mesh(work / "shapes" / str(data["source"]))
    mesh.vertices = (mesh.vertices - data["center"]) * data["scale"]
    return index_views(mesh, shape, n, size, image_size, shaded)


def index_shape(job) -> dict | None:
    """An index-only procedural shape: its `index_views` (masks, azimuths) and its first P FPS
    surface points, made as data preparation would, kept in <work>/index_shapes/<name>.npz so that
    the stage resumes (and the same draws as pilot S4's scratch build). None for a shape the
    generator rejects, as the shapes stage skips it (mar3d.shapes.finish)."""
    from mar3d.retrieval import MASK_SIZE, procedural_mesh, procedural_surface

    work, name, n, size, image_size, P, shaded = job
    path = work / "index_shapes" / f"{name}.npz"
    data = np.load(path) if path.exists() else None
    if data is None or len(data["azimuths"]) != n or bool(data.get("shaded", True)) != shaded:
        torch.set_num_threads(1)
        try:
            mesh = procedural_mesh(name, SURFACE_RECIPE)
        except ValueError as error:
            print(f"index shape {name} skipped: {error}", flush=True)
            return None
        masks, azimuths = index_views(mesh, name, n, size, image_size, shaded)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{name}.tmp.npz")
        np.savez(tmp, surface=procedural_surface(name, P, SURFACE_RECIPE, mesh=mesh),
                 masks=np.packbits(masks.flatten(1).numpy(), axis=1), azimuths=azimuths.numpy().astype(np.float32),
                 shaded=shaded)
        tmp.rename(path)
        data = np.load(path)
    masks = np.unpackbits(data["masks"], axis=1, count=MASK_SIZE * MASK_SIZE).astype(bool)
    return {"masks": masks.reshape(-1, MASK_SIZE, MASK_SIZE), "azimuths": data["azimuths"],
            "surface": data["surface"][:P]}


class KeptSurfaces:
    """An index's `ShapeSurfaces` whose procedural shapes are read from the files the stages kept
    (prepared/ for training shapes, index_shapes/ for index-only ones) instead of made again."""

    def __init__(self, surfaces, work: Path):
        self.surfaces, self.work = surfaces, work

    def __len__(self) -> int:
        return len(self.surfaces)

    def __getitem__(self, i) -> torch.Tensor:
        i, stored = int(i), len(self.surfaces.stored)
        if i < stored:
            return self.surfaces.stored[i]
        name = self.surfaces.names[i - stored]
        path = self.work / "index_shapes" / f"{name}.npz"
        path = path if path.exists() else self.work / "prepared" / f"{name}.npz"
        return torch.from_numpy(np.load(path)["surface"][: self.surfaces.num_points].astype(np.float32))


def index_references(job) -> dict:
    """`stage_mar_references` for cache rows `rows` (one worker): the index's pick of another shape
    for each, and the picks' LR and HR latents."""
    from mar3d.cache import load_cache
    from mar3d.retrieval import REFERENCE_FILE, ReferenceIndex, silhouettes

    r, work, out, rows = job
    torch.set_num_threads(1)
    index = ReferenceIndex.load(out / REFERENCE_FILE, vae=load_model(out, "vae").eval())
    index.lr.surfaces = index.hr.surfaces = KeptSurfaces(index.lr.surfaces, work)
    data, meta = load_cache(work / "cache")
    keep = torch.tensor([in_reference_index(r, n) for n in meta["names"]])
    entry = torch.cumsum(keep.long(), 0) - 1  # a kept cache row's entry: the index begins with them
    shape = index.lr.shape_ids
    batch = 128  # queries at once: the index's 32² pass turns its counts into floats once for them all
    picks = torch.cat([index.nearest_other(silhouettes(data["images"][rows[s: s + batch]]),
                                           shape[entry[rows[s: s + batch]]], shape)
                       for s in range(0, len(rows), batch)])
    with torch.no_grad():
        return {"rows": torch.tensor(rows), "entries": picks, "lr": index.lr[picks], "hr": index.hr[picks]}


def stage_mar_references(r: Recipe, work: Path, out: Path) -> None:
    """Each training entry's reference as the shipped index picks it: the entry of highest IoU
    among all the index's views of other shapes (pilot MR), its LR and HR latents kept beside the
    cache (mar3d.train.REFERENCES_FILE), where the MAR tasks read them."""
    import multiprocessing as mp

    from safetensors.torch import save_file

    from mar3d.cache import load_cache
    from mar3d.train import REFERENCES_FILE

    done = timed_stage(work, "mar_references")
    path = work / "cache" / REFERENCES_FILE
    if not (r.mar_reference and r.mar_index_references) or path.exists():
        return done(skipped=True)
    if r.reference_store != "surfaces":
        raise ValueError("mar_index_references needs the index of surfaces (reference_store 'surfaces')")
    names = load_cache(work / "cache")[1]["names"]
    rows = [i for i, n in enumerate(names) if in_reference_index(r, n)]
    with mp.get_context("spawn").Pool(r.workers) as pool:
        parts = pool.map(index_references, [(r, work, out, rows[k:: r.workers]) for k in range(r.workers)])
    picked = {key: torch.cat([part[key] for part in parts]).contiguous() for key in parts[0]}
    save_file(picked, str(path))
    done(entries=len(rows), distinct_picks=len(set(picked["entries"].tolist())))


def stage_rerank(r: Recipe, work: Path, out: Path) -> None:
    """The reference index's re-ranker (mar3d.retrieval, pilot RL in the model card). Half the
    training shapes (every view) fit the linear probe from the MAR-LR's frozen image features to LR
    latents; view 0 of `rerank_queries` of the other half gives each query's top candidates (its own
    shape left out, as for a training entry's reference) and, as the target the two cue weights are
    fitted to, each candidate's 24³ occupancy IoU with the query's own shape (LR latents decoded)."""
    from mar3d.cache import load_cache
    from mar3d.data import is_held_out
    from mar3d.retrieval import (REFERENCE_FILE, EncodedLatents, ReferenceIndex, fit_probe, fit_rerank_weights,
                                 probe_latents, rerank_cues, silhouettes)

    done = timed_stage(work, "rerank")
    index = ReferenceIndex.load(out / REFERENCE_FILE, vae=load_model(out, "vae", r.device)) if r.mar_reference else None
    if index is None or not r.rerank_candidates or index.reranks:
        return done(skipped=True)
    data, meta = load_cache(work / "cache")
    names = meta["names"]
    shape = [n.split("/")[0] for n in names]
    train = [not is_held_out(n, left_out(r)) for n in names]
    indexed = [i for i, n in enumerate(names) if in_reference_index(r, n)]
    shapes = sorted({s for s, t in zip(shape, train) if t})
    probe_shapes = set(shapes[::2])
    encoder = load_model(out, "mar_lr", r.device).image_encoder.eval()
    vae = load_model(out, "vae", r.device).eval()

    @torch.no_grad()
    def features(rows: list[int]) -> torch.Tensor:
        return torch.cat([encoder(data["images"][rows[s: s + 64]].permute(0, 3, 1, 2).float().div(255).to(r.device)).cpu()
                          for s in range(0, len(rows), 64)])

    fit_rows = [i for i in range(len(names)) if train[i] and shape[i] in probe_shapes]
    probe = fit_probe(features(fit_rows), data["lr"][fit_rows])
    rng = np.random.default_rng(0)
    others = [i for i in indexed if shape[i] not in probe_shapes]
    queries = sorted(rng.choice(others, min(r.rerank_queries, len(others)), replace=False).tolist())
    iou = index.exact_iou(silhouettes(data["images"][queries]))
    shape_id = {s: k for k, s in enumerate(shapes)}
    # each entry's shape: an index of surfaces names its surface row (training shapes in name order,
    # as `shapes`), one of latents holds the cache's indexed entries in order
    entry_shape = index.lr.shape_ids if isinstance(index.lr, EncodedLatents) else \
        torch.tensor([shape_id[shape[i]] for i in indexed])
    own = torch.tensor([shape_id[shape[i]] for i in queries])[:, None] == entry_shape[None]
    iou[own] = -1.0  # never the query's own shape
    top, cues = rerank_cues(iou, probe_latents(probe, features(queries)), index.lr, r.rerank_candidates)
    side = torch.linspace(-0.95, 0.95, 24)
    grid = torch.stack(torch.meshgrid(side, side, side, indexing="ij"), -1).reshape(-1, 3).to(r.device)

    @torch.no_grad()
    def occupied(latents: torch.Tensor) -> torch.Tensor:  # (B, L, C) → (B, 24³) bool
        return torch.stack([vae.occupancy_fn(x[None].float().to(r.device))(grid).reshape(-1).cpu() > 0 for x in latents])

    truth, cands = occupied(data["lr"][queries]), occupied(index.lr[top.flatten()]).view(*top.shape, -1)
    targets = (cands & truth[:, None]).sum(-1) / (cands | truth[:, None]).sum(-1).clamp(min=1)
    weights = fit_rerank_weights(cues, targets)
    ReferenceIndex(index.dark, index.lr, index.hr, probe, weights, r.rerank_candidates).save(out / REFERENCE_FILE)
    pick = lambda score: float(targets.gather(1, score.argmax(1, keepdim=True)).mean())  # noqa: E731
    done(probe_shapes=len(probe_shapes), queries=len(queries), weights=weights.tolist(),
         iou3d_top1=round(pick(cues[..., 0]), 4), iou3d_reranked=round(pick(cues @ weights), 4),
         iou3d_oracle=round(float(targets.max(1).values.mean()), 4))


def held_out_shapes(r: Recipe, work: Path) -> list[Path]:
    from mar3d.data import is_held_out

    return [f for f in sorted((work / "prepared").glob("*.npz")) if is_held_out(f.stem, r.val_percent)][: r.eval_shapes]


def ground_truth(work: Path, npz: Path):
    """The held-out shape in its prepared frame and turned into the frame of its view 0."""
    from mar3d.geometry import load_mesh
    from mar3d.render import rotate_mesh_to_view

    data = np.load(npz)
    mesh = load_mesh(work / "shapes" / str(data["source"]))
    mesh.vertices = (mesh.vertices - data["center"]) * data["scale"]
    camera = Camera.from_dict(json.loads((work / "renders" / npz.stem / "cameras.json").read_text())[0])
    return mesh, rotate_mesh_to_view(mesh, camera)


def stage_eval_vae(r: Recipe, work: Path, out: Path) -> None:
    """VAE reconstruction of each held-out shape from its HR tokens → <work>/eval/vae, scored
    against <work>/eval/gt_shape with mar3d.evaluate. Resumable: existing meshes are kept."""
    done = timed_stage(work, "eval_vae")
    ev = work / "eval"
    vae_reconstructions(r, load_model(out, "vae", r.device), work, held_out_shapes(r, work), ev)
    done(**score(ev / "vae", ev / "gt_shape"))


def vae_reconstructions(r: Recipe, vae, work: Path, shapes: list[Path], ev: Path) -> None:
    """Each prepared shape's VAE reconstruction from its HR tokens → <ev>/vae, decoded as the pipeline
    decodes, with its ground truth as prepared (<ev>/gt_shape) and turned into view 0's frame
    (<ev>/gt_view). Resumable (a reconstruction made before stop 34 was decoded without the blur)."""
    from mar3d.extract import ExtractionError

    settings = eval_settings()  # decoded as the pipeline decodes: its resolution and query blur
    for d in ("vae", "gt_shape", "gt_view"):
        (ev / d).mkdir(parents=True, exist_ok=True)
    for npz in shapes:
        name = f"{npz.stem}.ply"
        if not (ev / "gt_view" / name).exists():
            shape, view = ground_truth(work, npz)
            shape.export(ev / "gt_shape" / name)
            view.export(ev / "gt_view" / name)
        if (ev / "vae" / name).exists():
            continue
        latents = vae.encode(torch.from_numpy(np.load(npz)["surface"][None]).float().to(r.device), "hr")
        try:
            mesh, _ = extract_mesh(vae.occupancy_fn(latents, blur=settings.query_blur), resolution=settings.resolution)
            mesh.export(ev / "vae" / name)
        except ExtractionError:
            pass  # no mesh: mar3d.evaluate counts it as a failure


def stage_unseen(r: Recipe, work: Path, out: Path) -> None:
    """The real meshes no stage trained on: `unseen_meshes` and those the hash split leaves out
    (Spot), their variants built apart in <work>/unseen (shapes/, prepared/, renders/: the same
    variants, frames and views a training folder would hold), and the VAE's reconstructions scored
    there per mesh (<work>/unseen/eval). Image → 3D on them: `scripts/pilot_eval.py --work
    <work>/unseen --split all`."""
    from mar3d.data import is_held_out
    from mar3d.geometry import MESH_EXTENSIONS

    done = timed_stage(work, "unseen")
    if not SHARED_MESHES.is_dir():  # a run without them trained on no real mesh at all
        print(f"stage unseen: no shared meshes in {SHARED_MESHES}; skipped", flush=True)
        return done(skipped=True)
    stems = {p.stem for p in SHARED_MESHES.iterdir() if p.suffix.lower() in MESH_EXTENSIONS}
    meshes = sorted(unseen_meshes(r) & stems | {m for m in stems if is_held_out(f"real__{m}", left_out(r))})
    u = work / "unseen"
    build_dataset(u / "shapes", 0, seed=DATASET_SEED, real_dir=SHARED_MESHES, real_variants=r.real_variants,
                  workers=r.workers, real_meshes=set(meshes))
    prepare_dir(u / "shapes", u / "prepared", PREPARE, workers=r.workers)
    render_dir(r, u)
    vae_reconstructions(r, load_model(out, "vae", r.device), u, sorted((u / "prepared").glob("*.npz")), u / "eval")
    summary = score(u / "eval" / "vae", u / "eval" / "gt_shape")
    rows = json.loads((u / "eval" / "vae.json").read_text())["rows"]
    per_mesh = {m: round(float(np.median([row.get("fscore@0.05", 0.0) for row in rows
                                          if real_mesh_of(row["shape"]) == m])), 4) for m in meshes}
    done(meshes=meshes, **summary, vae_fscore_by_mesh=per_mesh)


def stage_eval_image(r: Recipe, work: Path, out: Path) -> None:
    """Image → 3D from view 0 of each held-out shape (the pipeline at its defaults, seed 0) →
    <work>/eval/image, scored against the shape turned into that view (<work>/eval/gt_view)."""
    from mar3d.extract import ExtractionError
    from mar3d.pipeline import MAR3DPipeline

    done = timed_stage(work, "eval_image")
    pipe = MAR3DPipeline.from_pretrained(out, device=r.device)
    ev = work / "eval"
    (ev / "image").mkdir(parents=True, exist_ok=True)
    seconds = []
    for npz in held_out_shapes(r, work):
        target = ev / "image" / f"{npz.stem}.ply"
        if target.exists():
            continue
        try:
            result = pipe(work / "renders" / npz.stem / "0.png", eval_settings())
            result.mesh.export(target)
            seconds.append(sum(result.seconds.values()))
        except ExtractionError:
            pass
    done(**score(ev / "image", ev / "gt_view"), mean_seconds=round(float(np.mean(seconds)), 2) if seconds else None)


def score(pred: Path, gt: Path) -> dict:
    from mar3d.evaluate import evaluate_dirs

    result = evaluate_dirs(pred, gt)  # the CLI's defaults: 100k points, seed 0, normalised
    (pred.parent / f"{pred.name}.json").write_text(json.dumps(result, indent=1))
    return {"shapes": result["count"], "failed": result["failed"],
            **{k: round(v, 4) for k, v in result["summary"].items()}}


def eval_settings():
    """Evaluation settings: the pipeline's defaults (what a user gets), seed 0, no LR preview, and no
    colouring (it leaves the geometry as it is; scripts/colour_eval.py scores it)."""
    from mar3d.pipeline import Settings

    return Settings(seed=0, lr_mesh=False, colour=False)


STAGES = ("shapes", "prepare", "render", "vae", "vae_tune", "eval_vae", "unseen", "cache", "reference", "recon", "occ", "mar_lr",
          "mar_hr", "mar_references", "mar_tune", "rerank", "eval_image")


def train_mar_parallel(r: Recipe, work: Path, out: Path, stage=None) -> None:
    """MAR-LR and MAR-HR in two processes at once, one thread each: trained (`stage_train`) or, as
    `stage`, fine-tuned (`stage_mar_tune`)."""
    import multiprocessing as mp

    stage = stage or stage_train
    procs = [mp.get_context("spawn").Process(target=stage, args=(r, work, out, task, 1))
             for task in ("mar_lr", "mar_hr")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"MAR {stage.__name__} failed (exit codes {[proc.exitcode for proc in procs]})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="data/demo", help="where data and intermediate files go")
    p.add_argument("--out", default="checkpoints", help="checkpoint directory (vae, mar_lr, mar_hr)")
    p.add_argument("--only", choices=STAGES + ("mar",), help="run one stage ('mar': MAR-LR and MAR-HR side by side)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Recipe overrides")
    args = p.parse_args(argv)
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    recipe = Recipe(**{k: parse_bool(v) if types[k] is bool else types[k](v) for k, v in (s.split("=", 1) for s in args.set)})
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
    if args.only == "mar":
        stage_reference(recipe, work, out)
        train_mar_parallel(recipe, work, out)
        stage_mar_references(recipe, work, out)
        return train_mar_parallel(recipe, work, out, stage_mar_tune)
    for stage in STAGES if args.only is None else (args.only,):
        if stage == "shapes":
            stage_shapes(recipe, work)
        elif stage == "prepare":
            stage_prepare(recipe, work)
        elif stage == "render":
            stage_render(recipe, work)
        elif stage == "cache":
            stage_cache(recipe, work, out)
        elif stage == "reference":
            stage_reference(recipe, work, out)
        elif stage == "mar_references":
            stage_mar_references(recipe, work, out)
        elif stage == "mar_tune":
            train_mar_parallel(recipe, work, out, stage_mar_tune)
        elif stage == "rerank":
            stage_rerank(recipe, work, out)
        elif stage == "vae_tune":
            stage_vae_tune(recipe, work, out)
        elif stage == "eval_vae":
            stage_eval_vae(recipe, work, out)
        elif stage == "unseen":
            stage_unseen(recipe, work, out)
        elif stage == "eval_image":
            stage_eval_image(recipe, work, out)
        elif stage == "mar_lr" and recipe.parallel_mar and args.only is None:
            train_mar_parallel(recipe, work, out)
        elif stage == "mar_hr" and recipe.parallel_mar and args.only is None:
            continue  # trained beside MAR-LR
        else:
            stage_train(recipe, work, out, stage)


if __name__ == "__main__":
    main()
