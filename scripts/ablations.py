"""The paper's two ablations at small scale (DESIGN §3, §6, §7), on the demo data.

    # 1. here, on CPU: a compact pack of the demo data (a training subset + every held-out shape)
    nice -n 19 python scripts/ablations.py pack --demo /work/demo_work --pack .ablation
    # 2. on a GPU: train every arm, sample held-out tokens, mesh metrics → OUT/results.json
    python scripts/ablations.py run --pack .ablation --out OUT --device cuda
    # 3. the mesh metrics again (if step 2 stopped before them), from OUT's VAEs and tokens
    python scripts/ablations.py metrics --pack .ablation --out OUT --device cpu --workers 2

(a) Pyramid VAE (num_levels=3: cross-attention to levels N, N/4, N/16) vs single-level VAE
    (num_levels=1: level N only). Both the `tiny` preset otherwise, 128 HR tokens each, same
    data, steps, batch and seed. Metrics on the held-out split (mar3d.data.is_held_out,
    val_percent 4): the training engine's occupancy IoU (4,096 points per shape, half near the
    surface, HR tokens) and the median F-score@0.05 / @0.02 and Chamfer of the decoded HR mesh
    against the ground-truth mesh.
(b) LR→HR cascade vs one MAR trained directly at the HR token count, at the same training
    budget of S optimizer steps of batch B: MAR-LR S/2 steps (32 LR tokens, image prefix) +
    MAR-HR S/2 steps (128 HR tokens, prefix image + LR tokens) vs one MAR for S steps (128 HR
    tokens, image prefix only); all `tiny` preset, all on the latent cache of (a)'s pyramid
    VAE. Sampling with the pipeline's defaults (CFG 3, temperature 1, 50 diffusion steps,
    condition augmentation t = 0.5): cascade 8 LR + 16 HR steps, direct 24 steps (the same
    number of MAR passes). Image → 3D from view 0 of each held-out shape, scored against the
    ground truth turned into that view's frame (as scripts/train_demo.py's evaluate stage).

Mesh protocol (both): marching cubes at 128 cells on the (R+1)^3 logit grid (dense on a GPU,
hierarchical on a CPU — the same mesh, README "Mesh extraction"), mar3d.extract.postprocess,
then mar3d.metrics.compare_meshes with 20,000 points per surface (both meshes normalised to a
longest side of 1.9; Chamfer = mean L2 both ways, halved). A failed extraction (no surface)
counts as F = 0 and Chamfer = inf in the medians. Each pair is also compared shape by shape
(wins, mean difference with a bootstrap 95 % interval over the held-out shapes); training-seed
noise is not measured (one seed per arm).

`run` trains the arms of each ablation side by side (one process each on one GPU). With
--vae-steps 0 / --mar-steps 0 it first times a few steps of the arms running together and picks
the step counts that fit --vae-seconds / --mar-seconds; the counts used are in results.json, so
passing them back reproduces a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _ensure_igl() -> None:
    """mar3d.geometry imports libigl at the top for its inside test (data preparation, never used
    here); on a machine without libigl a placeholder module lets the metrics import it."""
    try:
        import igl  # noqa: F401
    except ImportError:
        import types

        sys.modules["igl"] = types.ModuleType("igl")
        print("[ablations] libigl is not installed: a placeholder stands in (mar3d.geometry.inside unusable)")


_ensure_igl()

from mar3d.cache import build_cache  # noqa: E402
from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.cli import add_dataclass_flags, dataclass_from_args  # noqa: E402
from mar3d.data import is_held_out  # noqa: E402
from mar3d.mar import PRESETS as MAR_PRESETS  # noqa: E402
from mar3d.mar import MARConfig  # noqa: E402
from mar3d.preprocess import preprocess_image  # noqa: E402
from mar3d.train import TASKS, MARTask, TrainConfig, train  # noqa: E402
from mar3d.vae import PRESETS as VAE_PRESETS  # noqa: E402
from mar3d.vae import VAEConfig  # noqa: E402

VAE_ARMS = ("pyramid", "single")
MAR_ARMS = ("cascade", "direct")
ALL_ARMS = VAE_ARMS + MAR_ARMS


@dataclass
class AblationConfig:
    seed: int = 0
    val_percent: float = 4.0      # held-out split (the demo recipe's)
    device: str = "cuda"
    # (a) VAEs
    vae_steps: int = 0            # 0: as many as fit vae_seconds (timed first, same for both arms)
    vae_seconds: float = 120.0
    vae_batch: int = 64
    vae_lr: float = 1e-3
    # (b) MARs: direct S steps; cascade S/2 (MAR-LR) + S/2 (MAR-HR); same batch
    mar_steps: int = 0            # S; 0: as many as fit mar_seconds
    mar_seconds: float = 170.0
    mar_batch: int = 64
    mar_lr: float = 5e-4
    probe_steps: int = 40         # steps timed to pick vae_steps / mar_steps
    threads: int = 4              # torch CPU threads per training process
    parallel: bool = True         # arms side by side, one process each
    # sampling (the pipeline's defaults)
    lr_steps: int = 8
    hr_steps: int = 16
    direct_steps: int = 24        # = lr_steps + hr_steps MAR passes
    cfg: float = 3.0
    temperature: float = 1.0
    diffusion_steps: int = 50
    cond_aug_t: float = 0.5
    sample_batch: int = 64
    # metrics
    resolution: int = 128
    n_points: int = 20_000
    eval_limit: int = 0           # held-out shapes scored; 0 = all
    workers: int = 0              # metric processes; 0 = in this process
    metrics_seconds: float = 0.0  # stop scoring new shapes after this long; 0 = no limit


# --------------------------------------------------------------------------- the pack
PACK_FILE = "pack.npz"


def build_pack(work: Path, pack_dir: Path, n_train: int = 800, views: int = 1, pool: int = 1536,
               surface_points: int = 1024, val_percent: float = 4.0) -> dict:
    """Compact copy of a train_demo work directory: `n_train` training shapes (evenly spaced in
    name order) with `views` renders each, every held-out shape with render 0 and its ground-truth
    mesh (in the prepared frame). Surfaces / query pools as float16, labels bit-packed."""
    from mar3d.geometry import load_mesh

    files = sorted(f for f in (work / "prepared").glob("*.npz") if (work / "renders" / f.stem / "cameras.json").exists())
    held = [f for f in files if is_held_out(f.stem, val_percent)]
    train_files = [f for f in files if not is_held_out(f.stem, val_percent)]
    if n_train < len(train_files):
        train_files = [train_files[i] for i in np.linspace(0, len(train_files) - 1, n_train).round().astype(int)]
    chosen = train_files + held
    arrays = {k: [] for k in ("surface", "uniform", "uniform_labels", "near", "near_labels")}
    img_shape, img_view, cameras, pngs, gt_v, gt_f = [], [], [], [], [], []
    for i, f in enumerate(chosen):
        d = np.load(f)
        arrays["surface"].append(d["surface"][:surface_points].astype(np.float16))
        for kind, key in (("uniform", "uniform_points"), ("near", "near_points")):
            arrays[kind].append(d[key][:pool].astype(np.float16))
            arrays[f"{kind}_labels"].append(np.packbits(d[key.replace("points", "labels")][:pool]))
        cams = json.loads((work / "renders" / f.stem / "cameras.json").read_text())
        held_out = i >= len(train_files)
        for k in range(1 if held_out else min(views, len(cams))):
            img_shape.append(i)
            img_view.append(k)
            cameras.append(json.dumps(cams[k]))
            pngs.append(np.frombuffer((work / "renders" / f.stem / f"{k}.png").read_bytes(), np.uint8))
        if held_out:
            mesh = load_mesh(work / "shapes" / str(d["source"]))
            gt_v.append(((mesh.vertices - d["center"]) * d["scale"]).astype(np.float32))
            gt_f.append(mesh.faces.astype(np.int32))
    offsets = lambda parts: np.cumsum([0] + [len(p) for p in parts])  # noqa: E731
    pack = {
        "names": np.array([f.stem for f in chosen]), "held_out": np.array([i >= len(train_files) for i in range(len(chosen))]),
        **{k: np.stack(v) for k, v in arrays.items()},
        "img_shape": np.array(img_shape), "img_view": np.array(img_view), "cameras": np.array(cameras),
        "img_bytes": np.concatenate(pngs), "img_offsets": offsets(pngs),
        "gt_vertices": np.concatenate(gt_v), "gt_vertex_offsets": offsets(gt_v),
        "gt_faces": np.concatenate(gt_f), "gt_face_offsets": offsets(gt_f),
        "pool": np.array(pool), "val_percent": np.array(val_percent),
    }
    pack_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(pack_dir / PACK_FILE, **pack)
    summary = {"train_shapes": len(train_files), "held_out_shapes": len(held), "images": len(pngs),
               "surface_points": surface_points, "pool": pool, "views": views,
               "megabytes": round((pack_dir / PACK_FILE).stat().st_size / 2**20, 1)}
    (pack_dir / "pack.json").write_text(json.dumps(summary, indent=1))
    return summary


class Pack:
    """The pack, read back; ground-truth meshes of held-out shapes by shape index."""

    def __init__(self, pack_dir: Path):
        d = np.load(Path(pack_dir) / PACK_FILE)
        self.arrays = {k: d[k] for k in d.files}
        self.names = [str(n) for n in self.arrays["names"]]
        self.held_out = self.arrays["held_out"]
        self._gt_index = {int(s): j for j, s in enumerate(np.flatnonzero(self.held_out))}

    def image(self, entry: int) -> bytes:
        o = self.arrays["img_offsets"]
        return self.arrays["img_bytes"][o[entry]: o[entry + 1]].tobytes()

    def entries(self, shape: int) -> list[int]:
        return [int(e) for e in np.flatnonzero(self.arrays["img_shape"] == shape)]

    def camera(self, entry: int) -> dict:
        return json.loads(str(self.arrays["cameras"][entry]))

    def surface(self, shape: int) -> np.ndarray:
        return self.arrays["surface"][shape].astype(np.float32)

    def gt_mesh(self, shape: int) -> tuple[np.ndarray, np.ndarray]:
        j, a = self._gt_index[shape], self.arrays
        v, f = a["gt_vertex_offsets"], a["gt_face_offsets"]
        return a["gt_vertices"][v[j]: v[j + 1]], a["gt_faces"][f[j]: f[j + 1]]

    def write_prepared(self, out: Path) -> None:
        """One npz per shape in the schema of `python -m mar3d.prepare` (what ShapeBank reads)."""
        out.mkdir(parents=True, exist_ok=True)
        a, pool = self.arrays, int(self.arrays["pool"])
        for i, name in enumerate(self.names):
            np.savez(out / f"{name}.npz", surface=a["surface"][i].astype(np.float32),
                     uniform_points=a["uniform"][i].astype(np.float32),
                     uniform_labels=np.unpackbits(a["uniform_labels"][i])[:pool].astype(bool),
                     near_points=a["near"][i].astype(np.float32),
                     near_labels=np.unpackbits(a["near_labels"][i])[:pool].astype(bool))


# --------------------------------------------------------------------------- the direct MAR
class MARDirectTask(MARTask):
    """One MAR straight at the HR token count with the image prefix only (the cascade's ablation)."""

    name, stage = "mar_direct", "hr"

    def __init__(self, model_cfg: MARConfig, cfg: TrainConfig, data_dir: str):
        super().__init__(model_cfg, cfg, data_dir)
        self.model_cfg = dataclasses.replace(self.model_cfg, lr_seq_len=0)

    def batch(self, idx: torch.Tensor, device) -> tuple:
        tokens, images, _, features, reference = super().batch(idx, device)
        return tokens, images, None, features, reference


TASKS.setdefault("mar_direct", MARDirectTask)


# --------------------------------------------------------------------------- training arms
@dataclass
class Job:
    arm: str
    task: str
    model_cfg: object
    train_cfg: TrainConfig
    data: Path
    out: Path


def _run_job(job: Job) -> dict:
    t0 = time.time()
    last = train(job.task, job.model_cfg, job.train_cfg, str(job.data), str(job.out), resume=False)
    return {"arm": job.arm, "task": job.task, "steps": job.train_cfg.steps, "batch": job.train_cfg.batch_size,
            "seconds": round(time.time() - t0, 1), "last": last}


def run_jobs(jobs: list[Job], parallel: bool) -> list[dict]:
    """Train the jobs, side by side in spawned processes (one GPU shared) or one after another."""
    if not parallel or len(jobs) == 1:
        return [_run_job(j) for j in jobs]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        return pool.map(_run_job, jobs)


def probe_seconds_per_step(jobs: list[Job], steps: int, parallel: bool, root: Path) -> dict[str, float]:
    """Seconds per step of each job while all of them run together (from steps 10..`steps`)."""
    probes = [dataclasses.replace(j, out=root / f"probe_{j.arm}_{j.task}",
                                  train_cfg=dataclasses.replace(j.train_cfg, steps=steps, log_every=5,
                                                                eval_every=10**9, save_every=10**9))
              for j in jobs]
    run_jobs(probes, parallel)
    out = {}
    for p in probes:
        log = [json.loads(line) for line in (p.out / f"{p.task}.log.jsonl").read_text().splitlines()]
        t = {r["step"]: r["seconds"] for r in log if "seconds" in r}
        out[f"{p.arm}/{p.task}"] = (t[steps] - t[10]) / (steps - 10)
        shutil.rmtree(p.out, ignore_errors=True)
    return out


def fit_steps(seconds: float, per_step: float, multiple: int = 100) -> int:
    """Steps that fit `seconds` at `per_step` (15 % margin), rounded down to `multiple`."""
    return max(multiple, int(0.85 * seconds / per_step) // multiple * multiple)


def vae_configs(base: VAEConfig) -> dict[str, VAEConfig]:
    """The two arms of (a): identical but for the number of pyramid levels."""
    return {"pyramid": dataclasses.replace(base, num_levels=3), "single": dataclasses.replace(base, num_levels=1)}


def train_vaes(cfg: AblationConfig, base: VAEConfig, data: Path, work: Path, log) -> dict:
    def jobs(steps):
        tc = TrainConfig(steps=steps, batch_size=cfg.vae_batch, lr=cfg.vae_lr, min_lr=cfg.vae_lr / 10,
                         augment_yaw=True, val_percent=cfg.val_percent, seed=cfg.seed, device=cfg.device,
                         threads=cfg.threads, log_every=max(1, min(100, steps)), eval_every=steps, save_every=steps)
        return [Job(arm, "vae", mc, tc, data, work / f"vae_{arm}") for arm, mc in vae_configs(base).items()]

    info = {}
    steps = cfg.vae_steps
    if steps <= 0:
        info["probe_seconds_per_step"] = probe_seconds_per_step(jobs(cfg.probe_steps), cfg.probe_steps, cfg.parallel, work)
        steps = fit_steps(cfg.vae_seconds, max(info["probe_seconds_per_step"].values()))
        log(f"(a) probe {info['probe_seconds_per_step']} → {steps} steps per arm")
    t0 = time.time()
    info["arms"] = {r["arm"]: r for r in run_jobs(jobs(steps), cfg.parallel)}
    info["steps"], info["wall_seconds"] = steps, round(time.time() - t0, 1)
    return info


def build_mar_cache(cfg: AblationConfig, pack: Pack, vae_dir: Path, out: Path, image_size: int) -> dict:
    """MAR training data as train_demo's cache stage made it when these ablations ran (FPS token
    order): every (shape, view) of the pack, the shape turned into the view's frame, beside its
    render; held-out entries only feed the val loss."""
    from mar3d.render import Camera, rotate_to_view

    def items():
        for e in range(len(pack.arrays["img_shape"])):
            shape, view = int(pack.arrays["img_shape"][e]), int(pack.arrays["img_view"][e])
            turned = rotate_to_view(pack.surface(shape), Camera.from_dict(pack.camera(e))).astype(np.float32)
            yield f"{pack.names[shape]}/{view}", turned, pack.image(e)

    vae = load_model(vae_dir, "vae", cfg.device)  # build_cache encodes on the VAE's device
    return build_cache(vae, items(), out, image_size=image_size, batch=256, order="fps")


def train_mars(cfg: AblationConfig, base: MARConfig, cache: Path, work: Path, log) -> dict:
    def jobs(total):
        def tc(steps):
            return TrainConfig(steps=steps, batch_size=cfg.mar_batch, lr=cfg.mar_lr, min_lr=cfg.mar_lr / 10,
                               val_percent=cfg.val_percent, seed=cfg.seed, device=cfg.device, threads=cfg.threads,
                               log_every=max(1, min(100, steps)), eval_every=steps, save_every=steps)
        half = total // 2
        return [Job("direct", "mar_direct", base, tc(total), cache, work / "direct"),
                Job("cascade", "mar_lr", base, tc(half), cache, work / "cascade"),
                Job("cascade", "mar_hr", base, tc(total - half), cache, work / "cascade")]

    info = {}
    steps = cfg.mar_steps
    if steps <= 0:
        probe = probe_seconds_per_step(jobs(2 * cfg.probe_steps), cfg.probe_steps, cfg.parallel, work)
        info["probe_seconds_per_step"] = probe
        steps = 2 * (fit_steps(cfg.mar_seconds, probe["direct/mar_direct"]) // 2)
        log(f"(b) probe {probe} → direct {steps} steps, cascade {steps // 2} + {steps - steps // 2}")
    t0 = time.time()
    runs = run_jobs(jobs(steps), cfg.parallel)
    info["runs"] = {r["task"]: r for r in runs}
    info["budget"] = {"direct": steps, "cascade_lr": steps // 2, "cascade_hr": steps - steps // 2,
                      "batch": cfg.mar_batch}
    info["wall_seconds"] = round(time.time() - t0, 1)
    return info


# --------------------------------------------------------------------------- sampling
def held_out_shapes(pack: Pack, limit: int) -> list[int]:
    shapes = [int(s) for s in np.flatnonzero(pack.held_out)]
    return shapes[:limit] if limit > 0 else shapes


def condition_pixels(pack: Pack, shapes: list[int], size: int) -> torch.Tensor:
    """View 0 of each shape, preprocessed as the pipeline does: (S, 3, size, size) in [0, 1]."""
    pics = [np.array(preprocess_image(pack.image(pack.entries(s)[0]), size=size).image) for s in shapes]
    return torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def sample_tokens(cfg: AblationConfig, work: Path, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """VAE latents (S, 128, C) of the cascade (LR then HR) and of the direct MAR, batch by batch."""
    device = torch.device(cfg.device)
    mar_lr, mar_hr = (load_model(work / "cascade", n, device).eval() for n in ("mar_lr", "mar_hr"))
    direct = load_model(work / "direct", "mar_direct", device).eval()
    kw = dict(cfg=cfg.cfg, temperature=cfg.temperature, diffusion_steps=cfg.diffusion_steps)
    out = {"cascade_lr": [], "cascade": [], "direct": []}
    gen_cascade = torch.Generator(device).manual_seed(cfg.seed)
    gen_direct = torch.Generator(device).manual_seed(cfg.seed)
    for s in range(0, len(pixels), cfg.sample_batch):
        px = pixels[s: s + cfg.sample_batch].to(device)
        lr = mar_lr.denormalize(mar_lr.sample(px, steps=cfg.lr_steps, generator=gen_cascade, **kw))
        hr = mar_hr.sample(px, mar_hr.normalize(lr), steps=cfg.hr_steps, cond_aug_t=cfg.cond_aug_t,
                           generator=gen_cascade, **kw)
        out["cascade_lr"].append(lr.cpu())
        out["cascade"].append(mar_hr.denormalize(hr).cpu())
        out["direct"].append(direct.denormalize(direct.sample(px, steps=cfg.direct_steps, generator=gen_direct,
                                                              **kw)).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# --------------------------------------------------------------------------- metrics
def _score(job: tuple) -> tuple:
    """(key, grid, gt vertices, gt faces, camera dict or None, n_points) → (key, metrics or None)."""
    import trimesh

    from mar3d.extract import ExtractionError, grid_to_mesh, postprocess
    from mar3d.metrics import compare_meshes
    from mar3d.render import Camera, rotate_mesh_to_view

    key, grid, gt_v, gt_f, camera, n_points = job
    gt = trimesh.Trimesh(gt_v.astype(np.float64), gt_f, process=False)
    if camera is not None:
        gt = rotate_mesh_to_view(gt, Camera.from_dict(camera))
    try:
        return key, compare_meshes(postprocess(grid_to_mesh(grid.astype(np.float32))), gt, n_points=n_points)
    except (ExtractionError, ValueError):
        return key, None


class GridDecoder:
    """Occupancy logit grids of one VAE at `resolution`: on a GPU every point of the (R+1)^3 grid at
    once from a point set made once (the same points as mar3d.extract.dense_grid); on a CPU
    mar3d.extract's own dense (R ≤ 64) or hierarchical decoding."""

    def __init__(self, resolution: int, device: torch.device, chunk: int = 1 << 19, fast: bool | None = None):
        from mar3d.extract import DEFAULT_BOUNDS

        self.resolution, self.device, self.chunk = resolution, device, chunk
        self.points = None
        if device.type != "cpu" if fast is None else fast:
            idx = np.arange(resolution + 1, dtype=np.float64)
            axis = torch.from_numpy((-DEFAULT_BOUNDS + idx * (2.0 * DEFAULT_BOUNDS / resolution)).astype(np.float32))
            self.points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3).to(device)

    @torch.no_grad()
    def __call__(self, vae, latents: torch.Tensor) -> np.ndarray:
        from mar3d.extract import ExtractionError, dense_grid, hierarchical_grid

        if self.points is None:
            decode = vae.occupancy_fn(latents)
            if self.resolution <= 64:
                return dense_grid(decode, self.resolution)[0]
            return hierarchical_grid(decode, self.resolution, 64)[0]
        features = vae.decode(latents.to(self.device))
        logits = torch.cat([vae.query(features, self.points[s: s + self.chunk][None])[0].float()
                            for s in range(0, len(self.points), self.chunk)])
        if not torch.isfinite(logits).all():
            raise ExtractionError("decoder returned non-finite logits")
        n1 = self.resolution + 1
        return logits.view(n1, n1, n1).cpu().numpy()


@torch.no_grad()
def mesh_metrics(cfg: AblationConfig, pack: Pack, vae_dirs: dict[str, Path], tokens: dict, shapes: list[int],
                 log) -> dict[str, list]:
    """Per held-out shape and arm, compare_meshes of the extracted mesh (None: extraction failed).
    Shapes are scored in order, all four arms each, so a time limit cuts every arm at the same shape."""
    device = torch.device(cfg.device)
    vaes = {arm: load_model(d, "vae", device).eval() for arm, d in vae_dirs.items()}
    grid_of = GridDecoder(cfg.resolution, device)
    rows = {arm: [] for arm in ALL_ARMS}
    pool = ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) if cfg.workers > 0 else None
    pending, t0 = set(), time.time()

    def collect(done):
        for fut in done:
            (arm, i), metrics = fut.result()
            rows[arm][i] = metrics

    for i, shape in enumerate(shapes):
        if cfg.metrics_seconds and time.time() - t0 > cfg.metrics_seconds:
            log(f"metrics: time limit after {i} of {len(shapes)} shapes")
            break
        for arm in ALL_ARMS:
            rows[arm].append(None)
        gt_v, gt_f = pack.gt_mesh(shape)
        camera = pack.camera(pack.entries(shape)[0])
        surface = torch.from_numpy(pack.surface(shape))[None].to(device)
        jobs = []
        for arm in VAE_ARMS:  # (a): the shape's own HR tokens, against the ground truth
            jobs.append(((arm, i), vaes[arm].encode(surface, "hr"), None))
        for arm in MAR_ARMS:  # (b): generated tokens, against the ground truth turned into view 0's frame
            jobs.append(((arm, i), tokens[arm][i: i + 1].to(device), camera))
        for key, latents, cam in jobs:
            vae = vaes["pyramid"] if key[0] in MAR_ARMS else vaes[key[0]]
            try:
                grid = grid_of(vae, latents)
            except Exception as e:  # noqa: BLE001 — non-finite logits etc.: a failed extraction
                log(f"metrics: {key} decode failed ({e})")
                continue
            job = (key, grid, gt_v, gt_f, cam, cfg.n_points)
            if pool is None:
                collect([_Done(_score(job))])
            else:
                pending.add(pool.submit(_score, job))
                if len(pending) >= 4 * cfg.workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    collect(done)
    if pool is not None:
        collect(wait(pending)[0])
        pool.shutdown()
    return rows


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def summarize(rows: dict[str, list], names: list[str]) -> dict:
    def median(arm, key, missing):
        return statistics.median(m[key] if m else missing for m in rows[arm])

    out = {"shapes": len(rows["pyramid"])}
    for arm in ALL_ARMS:
        out[arm] = {"fscore@0.05": median(arm, "fscore@0.05", 0.0), "fscore@0.02": median(arm, "fscore@0.02", 0.0),
                    "chamfer": median(arm, "chamfer", math.inf),
                    "failed": sum(m is None for m in rows[arm])}
    for a, b in (("pyramid", "single"), ("cascade", "direct")):
        out[f"{a}_vs_{b}"] = {k: paired(rows[a], rows[b], k) for k in ("fscore@0.05", "fscore@0.02", "chamfer")}
    out["rows"] = [{"shape": names[i], **{arm: rows[arm][i] and {k: round(v, 5) for k, v in rows[arm][i].items()
                                                                 if k in ("fscore@0.05", "fscore@0.02", "chamfer")}
                                          for arm in ALL_ARMS}} for i in range(out["shapes"])]
    return out


def paired(a: list, b: list, key: str, resamples: int = 2000) -> dict:
    """Shape-by-shape comparison of arm a with arm b on `key` (shapes where both produced a mesh for
    Chamfer; failures as F = 0 for F-scores): wins of a, mean difference a − b, bootstrap 95 % CI."""
    if key == "chamfer":
        pairs = [(x[key], y[key]) for x, y in zip(a, b) if x and y]
    else:
        pairs = [(x[key] if x else 0.0, y[key] if y else 0.0) for x, y in zip(a, b)]
    if not pairs:
        return {"n": 0}
    d = np.array([x - y for x, y in pairs])
    boot = np.random.default_rng(0).choice(d, (resamples, len(d))).mean(1)
    better = d < 0 if key == "chamfer" else d > 0
    return {"n": len(d), "a_better": int(better.sum()), "ties": int((d == 0).sum()), "mean_diff": float(d.mean()),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}


# --------------------------------------------------------------------------- the whole run
def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def machine() -> dict:
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": mp.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(cfg: AblationConfig, pack_dir: Path, out: Path, work: Path, vae_base: VAEConfig | None = None,
        mar_base: MARConfig | None = None, metrics: bool = True) -> dict:
    """Both ablations end to end; writes out/results.json (after each phase), the VAEs of (a) to
    out/vae_<arm>/ and the sampled tokens of (b) to out/tokens.safetensors."""
    from safetensors.torch import save_file

    vae_base = vae_base or VAE_PRESETS["tiny"]
    mar_base = mar_base or MAR_PRESETS["tiny"]
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[ablations {time.time() - t_start:6.1f}s] {msg}", flush=True)

    pack = Pack(pack_dir)
    results = {"config": dataclasses.asdict(cfg), "vae_base": dataclasses.asdict(vae_base),
               "mar_base": dataclasses.asdict(mar_base), "machine": machine(),
               "data": {"train_shapes": int((~pack.held_out).sum()), "held_out_shapes": int(pack.held_out.sum()),
                        "images": len(pack.arrays["img_shape"]), "surface_points": pack.arrays["surface"].shape[1],
                        "pool": int(pack.arrays["pool"])}}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1))

    pack.write_prepared(work / "prepared")
    log(f"pack: {results['data']}")

    results["a_training"] = train_vaes(cfg, vae_base, work / "prepared", work, log)
    for arm in VAE_ARMS:
        (out / f"vae_{arm}").mkdir(exist_ok=True)
        for suffix in (".json", ".safetensors"):
            shutil.copy(work / f"vae_{arm}" / f"vae{suffix}", out / f"vae_{arm}" / f"vae{suffix}")
    results["logs"] = {f"vae_{arm}": read_log(work / f"vae_{arm}" / "vae.log.jsonl") for arm in VAE_ARMS}
    results["a_iou"] = {arm: {k: v for k, v in r["last"].items() if "iou" in k}
                        for arm, r in results["a_training"]["arms"].items()}
    save()
    log(f"(a) trained: {results['a_iou']}")

    t0 = time.time()
    results["b_cache"] = build_mar_cache(cfg, pack, work / "vae_pyramid", work / "cache",
                                         mar_base.image_encoder.image_size)
    results["b_cache"]["seconds"] = round(time.time() - t0, 1)
    log(f"(b) cache: {results['b_cache']}")
    results["b_training"] = train_mars(cfg, mar_base, work / "cache", work, log)
    for folder, task in (("cascade", "mar_lr"), ("cascade", "mar_hr"), ("direct", "mar_direct")):
        results["logs"][task] = read_log(work / folder / f"{task}.log.jsonl")
    save()

    t0 = time.time()
    shapes = held_out_shapes(pack, cfg.eval_limit)
    pixels = condition_pixels(pack, shapes, mar_base.image_encoder.image_size)
    tokens = sample_tokens(cfg, work, pixels)
    save_file({k: v.contiguous() for k, v in tokens.items()}, str(out / "tokens.safetensors"),
              metadata={"shapes": json.dumps([pack.names[s] for s in shapes])})
    results["b_sampling_seconds"] = round(time.time() - t0, 1)
    save()
    log(f"(b) sampled {len(shapes)} shapes in {results['b_sampling_seconds']} s")

    if metrics:
        score(cfg, pack, out, results, log)
    results["total_seconds"] = round(time.time() - t_start, 1)
    save()
    return results


def score(cfg: AblationConfig, pack: Pack, out: Path, results: dict, log=print) -> dict:
    """Mesh metrics of both ablations from out/vae_<arm>/ and out/tokens.safetensors → results['metrics']."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out / "tokens.safetensors"), "pt") as f:
        names = json.loads(f.metadata()["shapes"])
    tokens = load_file(str(out / "tokens.safetensors"))
    index = {n: i for i, n in enumerate(pack.names)}
    shapes = [index[n] for n in names]
    if cfg.eval_limit > 0:
        shapes = shapes[: cfg.eval_limit]
    t0 = time.time()
    rows = mesh_metrics(cfg, pack, {arm: out / f"vae_{arm}" for arm in VAE_ARMS}, tokens, shapes, log)
    n = len(rows["pyramid"])
    summary = summarize(rows, [pack.names[s] for s in shapes[:n]])
    summary["seconds"] = round(time.time() - t0, 1)
    summary["protocol"] = {"resolution": cfg.resolution, "n_points": cfg.n_points, "device": cfg.device}
    results["metrics"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("metrics: " + json.dumps({arm: summary[arm] for arm in ALL_ARMS}))
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("pack", "run", "metrics"))
    p.add_argument("--pack", default=".ablation", help="pack directory (written by `pack`, read by the others)")
    p.add_argument("--demo", default="data/demo", help="`pack`: the train_demo.py work directory to read")
    p.add_argument("--work", default=None, help="`run`: where bulky intermediates go (default: OUT/work)")
    p.add_argument("--out", default="runs/ablations", help="results.json, the VAEs of (a), the tokens of (b)")
    p.add_argument("--n-train", type=int, default=800, help="`pack`: training shapes kept")
    p.add_argument("--views", type=int, default=1, help="`pack`: renders kept per training shape")
    p.add_argument("--pool", type=int, default=1536, help="`pack`: occupancy points kept per pool")
    add_dataclass_flags(p, AblationConfig)
    args = p.parse_args(argv)
    cfg = dataclass_from_args(AblationConfig, args)
    if args.command == "pack":
        print(json.dumps(build_pack(Path(args.demo), Path(args.pack), args.n_train, args.views, args.pool,
                                    val_percent=cfg.val_percent)))
    elif args.command == "run":
        run(cfg, Path(args.pack), Path(args.out), Path(args.work or Path(args.out) / "work"))
    else:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        score(cfg, Pack(Path(args.pack)), out, results)


if __name__ == "__main__":
    main()
