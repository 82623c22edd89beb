"""Training engine, one for every network of the cascade.

    python -m mar3d.train vae --preset tiny --data PREPARED_DIR --out DIR [--steps N] [--set key=value ...]
    torchrun --nproc_per_node 2 -m mar3d.train vae ...      # DDP: gloo on CPU, nccl on CUDA

A *task* knows its model and data (`build_model`, `loss`, `evaluate`); the engine owns
everything else: AdamW, warm-up + cosine learning rate, EMA, gradient clipping, bf16
autocast, logging, checkpoints and resuming. Every random draw of step s on rank r comes
from a seed derived from (seed, s, r), so a resumed run repeats an uninterrupted one exactly.

Output directory (one directory can hold the whole cascade: vae, mar_lr, mar_hr):
    <name>.json + <name>.safetensors   EMA weights + model config (what inference loads)
    <name>.state.safetensors           raw weights, EMA, optimizer moments; step in its metadata
    <name>.log.jsonl                   one json object per logged step / evaluation
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .cache import load_cache
from .checkpoint import _atomic, load_model, save_model
from .cli import add_dataclass_flags, dataclass_from_args, parse_bool
from .data import ShapeBank, is_held_out, split_files, yaw_matrices
from .mar import PRESETS as MAR_PRESETS
from .mar import MAR, MARConfig
from .single_view import ImageOccupancy, OccConfig, ReconConfig, SingleViewRecon
from .vae import PRESETS as VAE_PRESETS
from .vae import PyramidVAE, VAEConfig


@dataclass
class TrainConfig:
    steps: int = 4000            # optimizer steps in all
    batch_size: int = 32         # global batch, split evenly over DDP ranks
    lr: float = 1e-3             # peak learning rate (AdamW)
    min_lr: float = 1e-4         # end of the cosine decay
    warmup: int = 100            # linear warm-up steps
    weight_decay: float = 0.01   # on matrices only, not on biases / norms / embeddings of size 1
    clip: float = 1.0            # gradient-norm clip
    ema: float = 0.999           # EMA decay (ramped up early: min(ema, (1+s)/(10+s)))
    amp: bool = True             # bf16 autocast where the hardware has it (bf16_is_fast): DESIGN §9
                                 # measured 18 % faster on an AVX-512 Xeon, same losses
    seed: int = 0
    device: str = "cpu"
    threads: int = 0             # torch threads per rank; 0 = cores (or $OMP_NUM_THREADS) / ranks
    queries: int = 1024          # occupancy queries per shape and step (VAE)
    augment_yaw: bool = False    # VAE: turn each shape by a random angle about +Y (cylinder-normalised data)
    val_percent: float = 5.0     # held-out share of the prepared shapes (fixed hash split)
    fscore_shapes: int = 8       # VAE: held-out shapes meshed at each evaluation (0 = IoU only)
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 500
    max_minutes: float = 0.0     # stop (and save) after this wall time; 0 = no limit
    vae_dir: str = ""            # recon / vae_decoder: the frozen VAE whose decoder scores the predicted tokens;
                                 # vae: the VAE to start from (fine-tuning)
    init_encoder: str = ""       # MAR: directory of a pretrained `recon`; MAR takes its image encoder, frozen
    init_from: str = ""          # MAR: directory of a trained MAR of this task to start from (fine-tuning: pilot MR)
    decoder_only: bool = False   # vae fine-tuning (vae_dir): train the decoder alone, so that the encoder's tokens
                                 # (the cache, the MARs trained on it, the index's lookups) stay valid (pilot D2)


# --------------------------------------------------------------------------- schedules
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`:
    1. linear warm-up   lr · (s+1)/warmup                           for s < warmup
    2. cosine decay     min_lr + ½(lr − min_lr)(1 + cos(π·p)),      p = (s − warmup)/(steps − warmup)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay ramped up from 0.1 so early averages are not dominated by the initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: on CUDA, and on CPUs with native bf16
    (AVX-512 BF16 / AMX). On an AVX2-only CPU (an AMD EPYC here) a bf16 matmul is emulated and
    was measured 130× slower than fp32 (1.3 vs 124 GFLOP/s, 4096×512 @ 512×512, 2 threads)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 64 + rank


# --------------------------------------------------------------------------- tasks
class VAETask:
    """Pyramid VAE on prepared shapes; even steps train the HR token set, odd steps the LR set."""

    name = "vae"
    presets = VAE_PRESETS

    def __init__(self, model_cfg: VAEConfig, cfg: TrainConfig, data_dir: str):
        self.model_cfg, self.cfg = model_cfg, cfg
        train_files, val_files = split_files(data_dir, cfg.val_percent)
        self.train = ShapeBank(train_files, model_cfg.num_points)
        val_files = val_files or train_files[:8]
        self.val = ShapeBank(val_files, model_cfg.num_points)
        self.train_probe = ShapeBank(train_files[:: max(1, len(train_files) // 32)][:32], model_cfg.num_points)
        # a few held-out shapes with all their stored surface samples: the F-score curve
        self.mesh_probe = [np.load(f)["surface"][:, :3] for f in val_files[: cfg.fscore_shapes]]

    def __len__(self) -> int:
        return len(self.train)

    def build_model(self) -> PyramidVAE:
        model = PyramidVAE(self.model_cfg)
        if self.cfg.decoder_only and not self.cfg.vae_dir:
            raise ValueError("decoder_only fine-tunes a trained VAE's decoder: give vae_dir")
        if not self.cfg.vae_dir:
            return model
        # fine-tune: start from this VAE's weights (its config may differ in training knobs, or in its queries)
        start = load_model(self.cfg.vae_dir, "vae")
        missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        grown = {k for k in missing if k.startswith("decoder.") and int(k.split(".")[1]) >= start.cfg.dec_layers}
        if unexpected or set(missing) - {"hr_queries", "lr_queries"} - grown:
            raise ValueError(f"{self.cfg.vae_dir}: not a VAE to fine-tune from (missing {missing}, unexpected {unexpected})")
        for block in model.decoder[start.cfg.dec_layers:]:  # decoder layers added (pilot D2) start as the identity
            for out in (block.attn.proj, block.mlp[-1]):
                torch.nn.init.zeros_(out.weight)
                torch.nn.init.zeros_(out.bias)
        if set(missing) - grown:  # FPS queries → learned ones: query i starts at anchor i of the training shapes' query points
            from .token_order import fit_anchors

            queries = self.train.surface[:, : self.model_cfg.hr_tokens, :3].numpy()
            model.place_queries(fit_anchors(queries), fit_anchors(queries[:, : self.model_cfg.lr_tokens]))
        if self.cfg.decoder_only:  # no gradient reaches the encoder, and AdamW leaves it untouched
            model.requires_grad_(False)
            for part in DECODER_PARTS:
                getattr(model, part).requires_grad_(True)
        return model

    def loss(self, model, step: int, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        shapes = torch.randint(len(self.train), (batch_size,), generator=generator)
        b = self.train.sample(shapes, self.cfg.queries, generator, yaw=self.cfg.augment_yaw).to(device)
        tokens = "hr" if step % 2 == 0 else "lr"
        points = torch.cat([b.uniform, b.near], dim=1)
        logits, kl = model(b.surface, points, tokens)
        n = b.uniform.shape[1]
        bce_u = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :n].float(), b.uniform_labels.float())
        bce_n = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, n:].float(), b.near_labels.float())
        loss = bce_u + self.model_cfg.near_weight * bce_n + self.model_cfg.kl_weight * kl
        return loss, {f"bce_uniform_{tokens}": bce_u.item(), f"bce_near_{tokens}": bce_n.item(), "kl": float(kl)}

    @torch.no_grad()
    def evaluate(self, model: PyramidVAE, device) -> dict:
        """Mean IoU of the occupancy (logit > 0) on 4,096 points per shape (half near-surface)."""
        out = {}
        for split, bank in (("val", self.val), ("train", self.train_probe)):
            for tokens in ("hr", "lr"):
                ious = []
                for start in range(0, len(bank), 16):
                    g = torch.Generator().manual_seed(start)
                    shapes = torch.arange(start, min(start + 16, len(bank)))
                    b = bank.sample(shapes, 4096, g).to(device)
                    logits, _ = model(b.surface, torch.cat([b.uniform, b.near], 1), tokens)
                    ious.append(occupancy_iou(logits > 0, torch.cat([b.uniform_labels, b.near_labels], 1)))
                out[f"{split}_iou_{tokens}"] = round(torch.cat(ious).mean().item(), 4)
        if self.mesh_probe:
            out["val_fscore@0.05_hr"] = round(self.fscore(model, device), 4)
        return out

    def fscore(self, model: PyramidVAE, device) -> float:
        """Median F@0.05 of HR-token meshes (64³) against each shape's stored surface samples
        (4,096 points, so a cheap proxy of the mar3d.evaluate number, biased low by the sparse
        reference); an empty mesh scores 0."""
        from scipy.spatial import cKDTree

        from .extract import ExtractionError, extract_mesh
        from .geometry import sample_surface

        scores = []
        for i, ref in enumerate(self.mesh_probe):
            try:
                latents = model.encode(self.val.surface[i: i + 1].to(device), "hr")
                mesh, _ = extract_mesh(model.occupancy_fn(latents), resolution=64)
            except ExtractionError:
                scores.append(0.0)
                continue
            pred = sample_surface(mesh, 20_000, np.random.default_rng(0))[:, :3]
            precision = (cKDTree(ref).query(pred)[0] < 0.05).mean()
            recall = (cKDTree(pred).query(ref)[0] < 0.05).mean()
            scores.append(2 * precision * recall / max(precision + recall, 1e-9))
        return float(np.median(scores))


def occupancy_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-shape IoU of two boolean occupancy sets (B, Q) → (B,)."""
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class MARTask:
    """MAR-LR or MAR-HR on a latent cache (mar3d.cache): images → normalised VAE tokens."""

    name, stage = "mar_lr", "lr"
    presets = MAR_PRESETS

    def __init__(self, model_cfg: MARConfig, cfg: TrainConfig, data_dir: str):
        self.cfg = cfg
        data, meta = load_cache(data_dir)
        # sizes and normalisation come from the data: a MAR is tied to the VAE that made its tokens
        self.model_cfg = dataclasses.replace(
            model_cfg, seq_len=data[self.stage].shape[1], token_dim=data[self.stage].shape[2],
            lr_seq_len=data["lr"].shape[1] if self.stage == "hr" else 0,
            latent_shift=meta["latent_shift"], latent_scale=meta["latent_scale"])
        held_out = torch.tensor([is_held_out(n, cfg.val_percent) for n in meta["names"]])
        norm = lambda x: (x - meta["latent_shift"]) / meta["latent_scale"]  # noqa: E731
        self.images, self.tokens, self.lr = data["images"], norm(data[self.stage]), norm(data["lr"])
        self.train_idx = torch.nonzero(~held_out).flatten()
        self.val_idx = torch.nonzero(held_out).flatten()
        if len(self.val_idx) == 0:
            self.val_idx = self.train_idx[:8]
        self.probe_idx = self.train_idx[:: max(1, len(self.train_idx) // 32)][:32]
        self.recon = None
        if cfg.init_encoder:  # the pretrained single-view encoder, frozen: its LR or HR query features
            self.recon = load_model(cfg.init_encoder, "recon")
            self.model_cfg = dataclasses.replace(self.model_cfg, image_encoder=self.recon.encoder_config(self.stage))
        self.features = None  # a frozen encoder's output for every entry, computed once in build_model
        self.reference_idx = self.references = None
        if self.model_cfg.reference:  # each entry's reference: the nearest training render of another shape
            self.reference_idx = reference_indices(self.images, meta["names"], self.train_idx)
            self.references = self.tokens[self.reference_idx]
            path = Path(data_dir) / REFERENCES_FILE
            if path.exists():  # the shipped index's picks for the entries it names (pilot MR)
                picked = load_file(str(path))
                self.references[picked["rows"].long()] = norm(picked[self.stage].float())

    def __len__(self) -> int:
        return len(self.train_idx)

    def build_model(self) -> MAR:
        if self.cfg.init_from:  # fine-tuning: the trained MAR, its frozen encoder's features computed once
            model = load_model(self.cfg.init_from, self.name).float().train()
            c = model.cfg
            if not (math.isclose(c.latent_shift, self.model_cfg.latent_shift, abs_tol=1e-6)
                    and math.isclose(c.latent_scale, self.model_cfg.latent_scale, rel_tol=1e-6)):
                raise ValueError(f"{self.cfg.init_from}: that {self.name} was trained on another token normalisation")
            if c.image_encoder.frozen:
                self.features = self.encode_all(model.image_encoder)
            return model
        model = MAR(self.model_cfg)
        if self.recon is not None:
            model.image_encoder.load_state_dict(self.recon.encoder.state_dict())
            self.features = self.encode_all(model.image_encoder)
        if model.base_head is not None:  # residual MAR: the reconstructor's token head is the base
            if self.recon is None:
                raise ValueError("a residual MAR needs init_encoder (the reconstructor whose token head is its base)")
            rc, mc = self.recon.cfg, self.model_cfg
            if not (math.isclose(rc.latent_shift, mc.latent_shift, abs_tol=1e-6)
                    and math.isclose(rc.latent_scale, mc.latent_scale, rel_tol=1e-6)):
                raise ValueError("the reconstructor was trained on another token normalisation than this cache's")
            model.base_head.load_state_dict(self.recon.to_tokens.state_dict())
        return model

    @torch.no_grad()
    def encode_all(self, encoder, batch: int = 64) -> torch.Tensor:
        """Features (S, T, D) of every cached image (bf16, on the CPU): a frozen encoder runs once."""
        encoder.eval()
        out = [encoder(self.images[s: s + batch].permute(0, 3, 1, 2).float().div(255)).to(torch.bfloat16)
               for s in range(0, len(self.images), batch)]
        return torch.cat(out)

    def batch(self, idx: torch.Tensor, device) -> tuple:
        """MAR's arguments for entries `idx`: tokens, images (or None), LR tokens, features, reference."""
        lr = self.lr[idx].to(device) if self.stage == "hr" else None
        ref = self.references[idx].to(device) if self.references is not None else None
        if self.features is not None:
            return self.tokens[idx].to(device), None, lr, self.features[idx].to(device), ref
        images = self.images[idx].permute(0, 3, 1, 2).float().div(255).to(device)  # (B, 3, H, W)
        return self.tokens[idx].to(device), images, lr, None, ref

    def loss(self, model, step: int, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        idx = self.train_idx[torch.randint(len(self.train_idx), (batch_size,), generator=generator)]
        return model(*self.batch(idx, device)), {}

    @torch.no_grad()
    def evaluate(self, model: MAR, device) -> dict:
        """Conditional diffusion loss (fixed noise) on held-out and on training entries."""
        out = {}
        for split, idx in (("val", self.val_idx), ("train", self.probe_idx)):
            torch.manual_seed(0)
            losses = [model(*self.batch(idx[s: s + 16], device)).item() for s in range(0, len(idx), 16)]
            out[f"{split}_loss"] = round(sum(losses) / len(losses), 5)
        return out


# Beside a cache: each training entry's reference as the shipped index picks it (a view of another
# shape among all the index's entries), LR and HR latents as the index encodes them (pilot MR). The
# MARs then learn residuals from references as close as those they get at inference; without the
# file, an entry's reference is the nearest training render of the cache (`reference_indices`).
REFERENCES_FILE = "references.safetensors"


def reference_indices(images: torch.Tensor, names: list[str], train_idx: torch.Tensor) -> torch.Tensor:
    """For each cache entry (images (N, H, W, 3) uint8, names "shape/view"), the index of the
    training entry of another shape with the nearest silhouette (mar3d.retrieval)."""
    from .retrieval import nearest, silhouettes

    shapes = {n: i for i, n in enumerate(sorted({n.split("/")[0] for n in names}))}
    group = torch.tensor([shapes[n.split("/")[0]] for n in names])
    masks = silhouettes(images)
    return train_idx[nearest(masks, masks[train_idx], group, group[train_idx])]


class MARHRTask(MARTask):
    name, stage = "mar_hr", "hr"


class ReconTask:
    """Single-view reconstruction (mar3d.single_view): the image encoder's pretraining.

    data_dir is a training work directory (scripts/train_demo.py's layout): cache/ holds the images
    and anchored tokens, prepared/ the occupancy samples, renders/ each view's camera (its azimuth
    turns the samples into the view's frame, as the cached tokens are)."""

    name = "recon"
    presets = {"tiny": ReconConfig()}

    def __init__(self, model_cfg: ReconConfig, cfg: TrainConfig, data_dir: str):
        from .render import Camera

        self.cfg = cfg
        root = self.data_root = Path(data_dir)
        data, meta = load_cache(root / "cache")
        if not cfg.vae_dir:
            raise ValueError("the recon task needs vae_dir: the VAE whose tokens the cache holds")
        self.vae = load_model(cfg.vae_dir, "vae").requires_grad_(False)
        self.model_cfg = self.configure(model_cfg, data, meta)
        norm = lambda x: (x - meta["latent_shift"]) / meta["latent_scale"]  # noqa: E731
        self.images, self.lr, self.hr = data["images"], norm(data["lr"]), norm(data["hr"])
        shapes = sorted({n.split("/")[0] for n in meta["names"]})
        self.bank = ShapeBank([root / "prepared" / f"{n}.npz" for n in shapes], self.vae.cfg.num_points)
        row = {n: i for i, n in enumerate(shapes)}
        self.shape_of = torch.tensor([row[n.split("/")[0]] for n in meta["names"]])
        cameras = {n: json.loads((root / "renders" / n / "cameras.json").read_text()) for n in shapes}
        azimuth = [Camera.from_dict(cameras[n.split("/")[0]][int(n.split("/")[1])]).azimuth_deg for n in meta["names"]]
        self.view_yaw = -torch.tensor(azimuth, dtype=torch.float32) * math.pi / 180  # into the view's frame
        held_out = torch.tensor([is_held_out(n, cfg.val_percent) for n in meta["names"]])
        self.train_idx = torch.nonzero(~held_out).flatten()
        self.val_idx = torch.nonzero(held_out).flatten()[:256]
        if len(self.val_idx) == 0:
            self.val_idx = self.train_idx[:8]

    def configure(self, model_cfg: ReconConfig, data: dict, meta: dict) -> ReconConfig:
        """The model config with what the cache fixes: token shapes and the latent normalisation."""
        return dataclasses.replace(
            model_cfg, token_dim=data["hr"].shape[2], latent_shift=meta["latent_shift"], latent_scale=meta["latent_scale"],
            encoder=dataclasses.replace(model_cfg.encoder, readout_lr=data["lr"].shape[1], readout_hr=data["hr"].shape[1]))

    def __len__(self) -> int:
        return len(self.train_idx)

    def build_model(self) -> SingleViewRecon:
        return SingleViewRecon(self.model_cfg)

    def occupancy(self, idx: torch.Tensor, queries: int, generator: torch.Generator):
        """Occupancy samples of the entries' shapes, turned into each entry's view frame."""
        b = self.bank.sample(self.shape_of[idx], queries, generator)
        rot = yaw_matrices(self.view_yaw[idx])  # (B, 3, 3)
        points = torch.einsum("bij,bnj->bni", rot, torch.cat([b.uniform, b.near], 1))
        return points, b.uniform_labels, b.near_labels

    def losses(self, model, idx: torch.Tensor, generator: torch.Generator, device) -> dict:
        images = self.images[idx].permute(0, 3, 1, 2).float().div(255).to(device)
        pred_lr, pred_hr = model(images)
        out = {"mse_lr": (pred_lr.float() - self.lr[idx].to(device)).pow(2).mean(),
               "mse_hr": (pred_hr.float() - self.hr[idx].to(device)).pow(2).mean()}
        if self.model_cfg.bce_weight > 0:
            out["bce"] = self.decode_bce(self.vae.to(device), pred_hr, idx, generator, device)
        return out

    def decode_bce(self, vae: PyramidVAE, tokens: torch.Tensor, idx: torch.Tensor, generator: torch.Generator, device):
        """Occupancy BCE (uniform + near_weight · near) of `vae` decoding normalised `tokens` (B, M, C)
        against the shapes of entries `idx`, in each entry's view frame."""
        points, uniform_labels, near_labels = (t.to(device) for t in self.occupancy(idx, self.cfg.queries, generator))
        latents = tokens.to(device) * self.model_cfg.latent_scale + self.model_cfg.latent_shift
        logits = vae.query(vae.decode(latents), points).float()  # (B, Q)
        n = uniform_labels.shape[1]
        f = torch.nn.functional.binary_cross_entropy_with_logits
        return f(logits[:, :n], uniform_labels.float()) + vae.cfg.near_weight * f(logits[:, n:], near_labels.float())

    def total(self, parts: dict) -> torch.Tensor:
        return (parts["mse_lr"] + parts["mse_hr"]) / 2 + self.model_cfg.bce_weight * parts.get("bce", 0.0)

    def loss(self, model, step: int, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        idx = self.train_idx[torch.randint(len(self.train_idx), (batch_size,), generator=generator)]
        parts = self.losses(model, idx, generator, device)
        return self.total(parts), {k: round(v.item(), 5) for k, v in parts.items()}

    @torch.no_grad()
    def evaluate(self, model: SingleViewRecon, device) -> dict:
        """Token MSE and occupancy BCE on (up to 256) held-out entries, fixed queries."""
        sums: dict = {}
        for s in range(0, len(self.val_idx), 32):
            parts = self.losses(model, self.val_idx[s: s + 32], torch.Generator().manual_seed(s), device)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(self.val_idx[s: s + 32])
        return {f"val_{k}": round(v / len(self.val_idx), 5) for k, v in sums.items()}


@dataclass
class DecoderTuneConfig:
    """What the VAE decoder learns to decode when it is fine-tuned for generated latents (VAEDecoderTask).

    Each entry of a batch is decoded from one of three inputs, all in normalised token units:
    its true tokens (clean_share), the frozen reconstructor's prediction of them plus noise of
    std U(0, recon_noise_max) (recon_share; needs init_encoder), or else a·tokens + s·ε with
    a ~ U(shrink_min, 1) and s ~ U(0, noise_max): tokens pulled towards the mean and blurred,
    as a regression or a sampler gets them wrong."""
    clean_share: float = 0.25
    recon_share: float = 0.5
    recon_noise_max: float = 0.3
    shrink_min: float = 0.6
    noise_max: float = 0.8


def corrupt_tokens(tokens: torch.Tensor, predicted: torch.Tensor | None, cfg: DecoderTuneConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """The decoder's training input for each entry of normalised `tokens` (B, M, C): see DecoderTuneConfig."""
    b = tokens.shape[0]
    u = torch.rand(b, generator=generator)
    clean = u < cfg.clean_share
    pick_recon = ~clean & (u < cfg.clean_share + cfg.recon_share) & (predicted is not None)
    pick_synth = ~clean & ~pick_recon
    a = cfg.shrink_min + (1 - cfg.shrink_min) * torch.rand(b, generator=generator)
    s = torch.rand(b, generator=generator)
    noise = torch.randn(tokens.shape, generator=generator)
    synth = a[:, None, None] * tokens + (s * cfg.noise_max)[:, None, None] * noise
    out = torch.where(pick_synth[:, None, None], synth, tokens)
    if predicted is not None:
        recon = predicted + (s * cfg.recon_noise_max)[:, None, None] * noise
        out = torch.where(pick_recon[:, None, None], recon, out)
    return out


DECODER_PARTS = ("from_latent", "decoder", "query_embed", "query_attn", "out_norm", "to_logit")


class VAEDecoderTask(ReconTask):
    """The VAE decoder fine-tuned to decode latents that are a little wrong (this project's choice).

    The shipped deterministic VAE decodes its own tokens well (F@0.05 0.95) but tokens a little
    off (noise of std 0.3-0.5, or pulled 30 % towards the mean) into fragments and slabs, and the
    MARs' and the reconstructor's tokens are such tokens. So the decoder is trained on corrupted
    tokens (corrupt_tokens) against the true shape's occupancy, in the view's frame as the cache
    holds them. The encoder stays frozen, so every cached token and the MARs trained on them stay
    valid; the saved `vae_decoder` is the whole VAE, a drop-in `vae`. Even steps decode HR, odd LR."""

    name = "vae_decoder"
    presets = {"tiny": DecoderTuneConfig()}

    def __init__(self, model_cfg: DecoderTuneConfig, cfg: TrainConfig, data_dir: str):
        super().__init__(ReconConfig(), cfg, data_dir)
        self.tune = model_cfg
        self.predicted = None
        if cfg.init_encoder:
            recon = load_model(cfg.init_encoder, "recon").eval()
            if not (math.isclose(recon.cfg.latent_shift, self.model_cfg.latent_shift, abs_tol=1e-6)
                    and math.isclose(recon.cfg.latent_scale, self.model_cfg.latent_scale, rel_tol=1e-6)):
                raise ValueError("the reconstructor was trained on another token normalisation than this cache's")
            self.predicted = self.predict_all(recon)
        elif model_cfg.recon_share > 0:
            raise ValueError("recon_share > 0 needs init_encoder: the reconstructor whose predictions are decoded")

    @torch.no_grad()
    def predict_all(self, recon: SingleViewRecon, batch: int = 64) -> dict:
        """The reconstructor's LR and HR tokens of every cached image (normalised), computed once."""
        lr, hr = zip(*(recon(self.images[s: s + batch].permute(0, 3, 1, 2).float().div(255))
                       for s in range(0, len(self.images), batch)))
        return {"lr": torch.cat(lr), "hr": torch.cat(hr)}

    def build_model(self) -> PyramidVAE:
        model = copy.deepcopy(self.vae).requires_grad_(False)
        for part in DECODER_PARTS:
            getattr(model, part).requires_grad_(True)
        return model

    def inputs(self, idx: torch.Tensor, which: str, generator: torch.Generator) -> torch.Tensor:
        tokens = (self.hr if which == "hr" else self.lr)[idx]
        predicted = None if self.predicted is None else self.predicted[which][idx]
        return corrupt_tokens(tokens, predicted, self.tune, generator)

    def loss(self, model, step: int, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        idx = self.train_idx[torch.randint(len(self.train_idx), (batch_size,), generator=generator)]
        which = "hr" if step % 2 == 0 else "lr"
        bce = self.decode_bce(model, self.inputs(idx, which, generator), idx, generator, device)
        return bce, {f"bce_{which}": round(bce.item(), 5)}

    @torch.no_grad()
    def evaluate(self, model: PyramidVAE, device) -> dict:
        """Held-out occupancy BCE of HR decoding from the true tokens, from tokens shrunk to 0.8 with
        noise 0.4, and (with init_encoder) from the reconstructor's prediction."""
        kinds = {"clean": lambda idx, g: self.hr[idx],
                 "corrupt": lambda idx, g: 0.8 * self.hr[idx] + 0.4 * torch.randn(self.hr[idx].shape, generator=g)}
        if self.predicted is not None:
            kinds["recon"] = lambda idx, g: self.predicted["hr"][idx]
        out = {}
        for kind, make in kinds.items():
            total = 0.0
            for s in range(0, len(self.val_idx), 32):
                idx, g = self.val_idx[s: s + 32], torch.Generator().manual_seed(s)
                total += self.decode_bce(model, make(idx, g), idx, g, device).item() * len(idx)
            out[f"val_bce_{kind}"] = round(total / len(self.val_idx), 5)
        return out


class OccTask(ReconTask):
    """Image → occupancy directly (mar3d.single_view.ImageOccupancy), on the recon task's data:
    the same images, the same occupancy samples in each view's frame, the same held-out BCE (so
    val_bce compares with the reconstructor's, whose tokens pass through the frozen VAE decoder).

    pixel_aligned: each view's crop camera (mar3d.projection) comes from its render's mask and camera;
    training looks features up at it, jittered, and fits the camera head to it; held-out BCE is
    reported at the predicted camera (what a user gets) and at the true one (bce_true_camera)."""

    name = "occ"
    presets = {"tiny": OccConfig()}

    def configure(self, model_cfg: OccConfig, data: dict, meta: dict) -> OccConfig:
        cfg = dataclasses.replace(model_cfg, near_weight=self.vae.cfg.near_weight)
        if not cfg.pixel_aligned:
            return cfg
        from PIL import Image

        from .projection import crop_camera
        from .render import Camera

        root, size = Path(self.data_root), data["images"].shape[1]
        cams = {}
        rows = []
        for name in meta["names"]:
            shape, view = name.split("/")
            if shape not in cams:
                cams[shape] = json.loads((root / "renders" / shape / "cameras.json").read_text())
            alpha = np.asarray(Image.open(root / "renders" / shape / f"{view}.png"))[..., 3]
            rows.append(crop_camera(Camera.from_dict(cams[shape][int(view)]), alpha, size=size))
        self.crop_cameras = torch.from_numpy(np.stack(rows))
        return dataclasses.replace(cfg, camera_mean=self.crop_cameras.mean(0).tolist(),
                                   camera_std=self.crop_cameras.std(0).clamp(min=1e-3).tolist())

    def build_model(self) -> ImageOccupancy:
        return ImageOccupancy(self.model_cfg)

    def losses(self, model, idx: torch.Tensor, generator: torch.Generator, device) -> dict:
        images = self.images[idx].permute(0, 3, 1, 2).float().div(255).to(device)
        points, uniform_labels, near_labels = (t.to(device) for t in self.occupancy(idx, self.cfg.queries, generator))
        n = uniform_labels.shape[1]
        f = torch.nn.functional.binary_cross_entropy_with_logits

        def bce(logits):
            logits = logits.float()
            return f(logits[:, :n], uniform_labels.float()) + self.model_cfg.near_weight * f(logits[:, n:], near_labels.float())

        out = {}
        if not self.model_cfg.pixel_aligned:
            logits, _ = model(images, points)
        else:
            true = self.crop_cameras[idx].to(device)
            if model.training:
                noise = torch.randn(true.shape, generator=generator).to(device)
                logits, predicted = model(images, points, true + noise * torch.tensor(self.model_cfg.camera_jitter, device=device))
            else:  # held out (no DDP): encode once, query at the predicted and at the true camera
                feats = model.features(images)
                logits, predicted = model.query(feats, points), feats["camera"]
                out["bce_true_camera"] = bce(model.query(feats, points, true))
            std = torch.tensor(self.model_cfg.camera_std, device=device)
            out["camera"] = ((predicted.float() - true) / std).pow(2).mean()
            out["elevation_err"] = (predicted[:, 0].float() - true[:, 0]).abs().mean()
        out["bce"] = bce(logits)
        out["iou"] = occupancy_iou(logits.detach() > 0, torch.cat([uniform_labels, near_labels], 1)).mean()
        return out

    def total(self, parts: dict) -> torch.Tensor:
        return parts["bce"] + self.model_cfg.camera_weight * parts.get("camera", 0.0)


TASKS = {"vae": VAETask, "mar_lr": MARTask, "mar_hr": MARHRTask, "recon": ReconTask,
         "vae_decoder": VAEDecoderTask, "occ": OccTask}


# --------------------------------------------------------------------------- engine
def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world, device). DDP when launched by torchrun (WORLD_SIZE > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1  # OMP_NUM_THREADS=1 is obeyed
    torch.set_num_threads(cfg.threads or max(1, cores // world))
    return rank, world, device


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def save_state(path: Path, model, ema, opt, step: int) -> None:
    """Everything needed to resume, in one safetensors file (step in its metadata)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        tensors |= {f"opt.{i}.{k}": v for k, v in state.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": str(step)}
    _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_state(path: Path, model, ema, opt) -> int:
    """Restore a train state written by save_state; returns the step to continue from."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    tensors = load_file(str(path))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    ema.load_state_dict(part("ema."))
    opt_state = opt.state_dict()
    opt_state["state"] = {}
    for key, v in part("opt.").items():
        i, name = key.split(".", 1)
        opt_state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(opt_state)
    return step


def ranks_identical(model: torch.nn.Module) -> bool:
    """True when every DDP rank holds bit-identical parameters."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def train(task_name: str, model_cfg, cfg: TrainConfig, data_dir: str, out_dir: str, resume: bool = True) -> dict:
    """Train `task_name` into `out_dir`; returns the last logged record."""
    rank, world, device = setup_distributed(cfg)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    task = TASKS[task_name](model_cfg, cfg, data_dir)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = task.build_model().to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, cfg)
    start = 0
    state_path = out / f"{task.name}.state.safetensors"
    if resume and state_path.exists():
        start = load_state(state_path, model, ema, opt)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} ranks")

    log = Logger(out / f"{task.name}.log.jsonl", enabled=rank == 0, truncate_after=start)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{task_name}] {n_params / 1e6:.2f} M parameters, {len(task)} training entries, "
              f"{world} rank(s), start at step {start}/{cfg.steps}", flush=True)
    amp = cfg.amp and bf16_is_fast(device)
    t0, last = time.time(), {}
    step = start
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.seed, step, rank))  # noise inside the model (e.g. KL sampling)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, rank))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, info = task.loss(net, step, cfg.batch_size // world, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        update_ema(ema, model, ema_decay_at(step, cfg.ema))
        step += 1

        out_of_time = cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes
        if world > 1:  # every rank must agree to stop on the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item())
        finished = step == cfg.steps or out_of_time
        if step % cfg.log_every == 0 or finished:
            last = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "grad_norm": round(grad_norm.item(), 4),
                    "seconds": round(time.time() - t0, 1), **info}
            log.write(last)
        if rank == 0 and (step % cfg.eval_every == 0 or finished):
            last = {"step": step, **task.evaluate(ema, device)}
            log.write(last)
        if rank == 0 and (step % cfg.save_every == 0 or finished):
            save_state(state_path, model, ema, opt, step)
            save_model(ema, out, task.name, metadata={"step": step, "train": dataclasses.asdict(cfg)})
        if out_of_time:
            break
    if world > 1:
        same = ranks_identical(model)
        if rank == 0:
            log.write({"step": step, "ranks_identical": same})
        dist.barrier()
        dist.destroy_process_group()
    return last


class Logger:
    """Appends json lines to the log (rank 0 only) and echoes them; drops lines past a resume point."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= truncate_after]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------- CLI
def parse_overrides(pairs: list[str], config_cls) -> dict:
    """['width=64', 'kl_weight=1e-4'] → typed dict for `config_cls` (dataclass)."""
    types = {f.name: f.type for f in dataclasses.fields(config_cls)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"unknown model setting '{key}'; known: {', '.join(types)}")
        kind = types[key]
        out[key] = parse_bool(value) if kind is bool else kind(value)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="prepared directory (python -m mar3d.prepare)")
    p.add_argument("--out", required=True, help="output directory (resumed when it holds a train state)")
    p.add_argument("--preset", default="tiny", help="model size preset")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a train state")
    add_dataclass_flags(p, TrainConfig)
    args = p.parse_args(argv)

    task_cls = TASKS[args.task]
    if args.preset not in task_cls.presets:
        raise SystemExit(f"unknown preset '{args.preset}'; known: {', '.join(task_cls.presets)}")
    base = task_cls.presets[args.preset]
    model_cfg = dataclasses.replace(base, **parse_overrides(args.set, type(base)))
    cfg = dataclass_from_args(TrainConfig, args)
    train(args.task, model_cfg, cfg, args.data, args.out, resume=not args.no_resume)


if __name__ == "__main__":
    main(sys.argv[1:])
