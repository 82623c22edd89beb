"""The image-to-3D pipeline: one object used by the CLI, the app and the tests.

    pipe = MAR3DPipeline.from_pretrained("checkpoints")
    result = pipe("photo.png", Settings(seed=1))
    result.mesh.export("shape.glb")

image → preprocess → MAR-LR → (LR mesh, a preview) → MAR-HR → HR tokens → VAE decoder → mesh
      → colour from the picture (mar3d.colour; the LR preview stays grey)
"""

import contextlib
import dataclasses
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import trimesh
from PIL import Image

from .checkpoint import load_model, save_model
from .carve import carve
from .colour import ALPHA_OBJECT, ViewFit, colour_mesh, fit_view
from .extract import ExtractionError, extract_mesh
from .preprocess import BACKGROUND_MODES, PreprocessResult, preprocess_image
from .retrieval import REFERENCE_FILE, ReferenceIndex


@dataclass
class Settings:
    """The user-facing knobs of one generation (the CLI's flags and the app's controls)."""

    seed: int = 0
    background: str = "auto"        # auto | remove | none (mar3d.preprocess)
    foreground_ratio: float = 0.85  # object size in the condition image
    lr_steps: int = 8               # MAR-LR sampling steps (≤ LR tokens)
    hr_steps: int = 16              # MAR-HR sampling steps (≤ HR tokens)
    cfg_lr: float = 3.0             # classifier-free guidance of MAR-LR (1 = none)
    cfg_hr: float = 3.0
    # scale of the diffusion head's sampling noise: 0.3 for the shipped checkpoint, whose MARs model
    # residuals from a retrieved reference shape (validation median F@0.05 0.54 at 0.3, 0.39 at 1.0)
    temperature: float = 0.3
    # a residual MAR adds this share of each sampled residual to its base (0: the reference itself).
    # 0.25 for the shipped checkpoint with its re-ranked references: validation median 0.66 against
    # 0.60 at 0.5 and 0.54 at 1; test 0.53 against 0.50 at 0.5 (pilots A1, RL, model card)
    residual_scale: float = 0.25
    diffusion_steps: int = 50       # respaced steps of the diffusion head (1000 in training)
    cond_aug_t: float = 0.5         # MAR-HR's noise level on its LR-token condition
    resolution: int = 128           # marching-cubes cells per axis
    # decoding: the occupancy queries' Fourier features averaged over a Gaussian jitter of this σ
    # (PyramidVAE.occupancy_fn), which damps the finest octave's ripples (period 0.0625: horizontal
    # stripes). Pilot Q1 (model card), validation: 0.01 level in F@0.05 with the slab share and the
    # normal consistency better; 0.02 and 0.03 smoother still, and lower in F
    query_blur: float = 0.01
    target_faces: int = 0           # 0 = keep all faces
    colour: bool = True             # paint the HR mesh's vertices from the picture (mar3d.colour)
    rerank: bool = True             # re-rank the reference candidates, for an index that can (mar3d.retrieval)
    # trim the HR occupancy to the picture's outline, seen through the camera fitted to the LR
    # preview (mar3d.carve), the mask grown by `carve_dilation` pixels of the condition image
    carve: bool = False
    carve_dilation: int = 1
    lr_mesh: bool = True            # also extract the LR mesh (the preview)

    def check(self) -> None:
        """Raise ValueError naming the first setting no run can use (NaN, 0 steps, a 4096³ grid...)."""
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        for name, lo, hi in (("seed", 0, 2**63 - 1), ("lr_steps", 1, None), ("hr_steps", 1, None),
                             ("diffusion_steps", 1, 1000), ("resolution", 8, 512), ("target_faces", 0, None),
                             ("carve_dilation", 0, 64)):
            v = getattr(self, name)
            if not is_int(v) or v < lo or (hi is not None and v > hi):
                bad(name, f"an integer from {lo}" + (f" to {hi}" if hi is not None else " up"))
        for name in ("colour", "lr_mesh", "rerank", "carve"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if self.background not in BACKGROUND_MODES:
            bad("background", f"one of {BACKGROUND_MODES}")
        for name, lo, hi in (("foreground_ratio", 0.1, 1.0), ("cfg_lr", 0.0, None), ("cfg_hr", 0.0, None),
                             ("temperature", 0.0, None), ("cond_aug_t", 0.0, 1.0),
                             ("residual_scale", 0.0, 1.0), ("query_blur", 0.0, 0.1)):
            v = getattr(self, name)
            if (not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v < lo
                    or (hi is not None and v > hi)):
                bad(name, f"a finite number from {lo}" + (f" to {hi}" if hi is not None else " up"))


@dataclass
class Result:
    mesh: trimesh.Trimesh              # the HR mesh
    lr_mesh: trimesh.Trimesh | None    # the LR preview (None if not asked for or empty)
    image: Image.Image                 # the processed condition image
    background_method: str             # which background removal ran
    seconds: dict                      # per stage
    lr_tokens: torch.Tensor            # (1, L_lr, C) VAE latents
    hr_tokens: torch.Tensor            # (1, L_hr, C) VAE latents
    view: ViewFit | None = None        # the input view's recovered camera (when coloured)


# (stage, step, total). Stages in order: "preprocess", "lr" (MAR-LR steps), "lr_mesh", "hr" (MAR-HR
# steps), "hr_mesh", "colour"; the stages without steps report (stage, 0, 1) when they start.
Progress = Callable[[str, int, int], None]

# The LR preview is a coarse shape (the LR token set), so it is extracted on a coarser grid: at
# 64³ it shows in well under a second where 128³ took ~3.7 s on a 2-core CPU (bench/bench_app.py).
PREVIEW_RESOLUTION = 64


# MAR sampling runs many small steps (a few dozen tokens × a narrow transformer and MLP): on the CPU
# one torch thread does them faster than two, whose synchronisation costs more than they share.
# Measured with bench/bench_app.py on a 2-core AMD EPYC: MAR-HR 4.5 s on 2 threads, 2.0 s on 1.
# Mesh extraction (large batched decoder queries) keeps torch's own thread count.
SAMPLING_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch intra-op threads (None: unchanged), then restore the count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MAR3DPipeline:
    def __init__(self, vae, mar_lr, mar_hr, device: str | torch.device = "cpu", references: ReferenceIndex | None = None):
        self.device = torch.device(device)
        self.sampling_threads = SAMPLING_THREADS if self.device.type == "cpu" else None
        self.vae, self.mar_lr, self.mar_hr = (m.to(self.device).eval() for m in (vae, mar_lr, mar_hr))
        if (mar_lr.cfg.reference or mar_hr.cfg.reference) and references is None:
            raise ValueError("these MARs take a reference shape: pass the ReferenceIndex they were trained with")
        self.references = references

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> "MAR3DPipeline":
        """Load vae / mar_lr / mar_hr (json + safetensors each) from one directory, and the
        reference index (reference.safetensors) when the MARs take one."""
        models = [load_model(directory, name, device) for name in ("vae", "mar_lr", "mar_hr")]
        references = None
        if models[1].cfg.reference or models[2].cfg.reference:
            path = Path(directory) / REFERENCE_FILE
            if not path.exists():
                raise FileNotFoundError(f"{path}: these MARs take a reference shape and need the index they were "
                                        f"trained with (scripts/train_demo.py --only reference)")
            references = ReferenceIndex.load(path, vae=models[0])
        return cls(*models, device=device, references=references)

    def save_pretrained(self, directory: str | Path) -> None:
        for name, model in (("vae", self.vae), ("mar_lr", self.mar_lr), ("mar_hr", self.mar_hr)):
            save_model(model, directory, name)
        if self.references is not None:
            self.references.save(Path(directory) / REFERENCE_FILE)

    @property
    def image_size(self) -> int:
        return self.mar_lr.image_encoder.size

    @torch.no_grad()
    def __call__(self, image, settings: Settings | None = None, on_lr_mesh: Callable | None = None,
                 progress: Progress | None = None, **overrides) -> Result:
        """Generate a mesh from `image` (path, bytes, array or PIL image, or the PreprocessResult of
        `self.preprocess`, which is then used as it is). Keyword overrides patch `settings`."""
        s = dataclasses.replace(settings or Settings(), **overrides)
        s.check()
        report = progress or (lambda stage, step, total: None)
        seconds = {}
        t = time.perf_counter()
        report("preprocess", 0, 1)
        pre = image if isinstance(image, PreprocessResult) else self.preprocess(image, s)
        if pre.image.size != (self.image_size, self.image_size):
            raise ValueError(f"the preprocessed image is {pre.image.size}, this pipeline takes {self.image_size}²")
        pixels = torch.from_numpy(np.array(pre.image)).permute(2, 0, 1)[None].float().div(255).to(self.device)
        generator = torch.Generator(self.device).manual_seed(s.seed)
        seconds["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        references = self.lookup_reference(pixels, s)
        lr_latents = self.sample_lr(pixels, s, generator, progress and (lambda i, n: progress("lr", i, n)),
                                    reference=references[0])
        seconds["mar_lr"] = time.perf_counter() - t

        lr_mesh = None
        if s.lr_mesh or s.carve:  # carving fits the input's camera to the preview
            t = time.perf_counter()
            report("lr_mesh", 0, 1)
            try:
                lr_mesh = self.extract(lr_latents, s, resolution=min(s.resolution, PREVIEW_RESOLUTION))
            except ExtractionError:  # an empty preview is no reason to stop: the HR stage may still succeed
                lr_mesh = None
            seconds["lr_mesh"] = time.perf_counter() - t
            if on_lr_mesh is not None and s.lr_mesh:
                on_lr_mesh(lr_mesh)

        t = time.perf_counter()
        hr_latents = self.sample_hr(pixels, lr_latents, s, generator,
                                    progress and (lambda i, n: progress("hr", i, n)), reference=references[1])
        seconds["mar_hr"] = time.perf_counter() - t

        t = time.perf_counter()
        report("hr_mesh", 0, 1)
        outline = None
        if s.carve and lr_mesh is not None:
            mask = np.asarray(pre.rgba)[..., 3] >= ALPHA_OBJECT
            outline = (fit_view(lr_mesh, mask), mask) if mask.any() else None
        mesh = self.extract(hr_latents, s, outline=outline)
        seconds["hr_mesh"] = time.perf_counter() - t

        view = None
        if s.colour:
            t = time.perf_counter()
            report("colour", 0, 1)
            mesh, view = colour_mesh(mesh, pre.rgba)
            seconds["colour"] = time.perf_counter() - t
        return Result(mesh, lr_mesh if s.lr_mesh else None, pre.image, pre.method, seconds, lr_latents, hr_latents, view)

    def preprocess(self, image, settings: Settings | None = None) -> PreprocessResult:
        """The condition image of `image` as this pipeline makes it (background, crop, size): the
        app shows it at upload and hands it back to __call__."""
        s = settings or Settings()
        if isinstance(image, PreprocessResult):
            raise TypeError("image is already preprocessed")
        return preprocess_image(image, s.background, s.foreground_ratio, size=self.image_size)

    def lookup_reference(self, pixels: torch.Tensor, s: Settings) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The reference shape's LR and HR latents (None, None without an index). An index that
        re-ranks reads the MAR-LR's image features (its frozen encoder: the probe was fitted on it)."""
        if self.references is None:
            return None, None
        features = None
        if s.rerank and self.references.reranks:
            with torch.no_grad(), torch_threads(self.sampling_threads):
                features = self.mar_lr.image_encoder(pixels)
        return self.references.lookup(pixels, features)[:2]

    def sample_lr(self, pixels: torch.Tensor, s: Settings, generator: torch.Generator,
                  progress: Callable[[int, int], None] | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
        """MAR-LR: VAE latents (B, L_lr, C) for condition images (B, 3, H, W) in [0, 1] (and the
        reference shape's LR latents, for a MAR that takes them)."""
        ref = None if reference is None or not self.mar_lr.cfg.reference else self.mar_lr.normalize(reference)
        with torch_threads(self.sampling_threads):
            lr = self.mar_lr.sample(pixels, steps=s.lr_steps, cfg=s.cfg_lr, temperature=s.temperature,
                                    diffusion_steps=s.diffusion_steps, generator=generator, progress=progress,
                                    reference=ref, residual_scale=s.residual_scale)
        return self.mar_lr.denormalize(lr)

    def sample_hr(self, pixels: torch.Tensor, lr_latents: torch.Tensor, s: Settings, generator: torch.Generator,
                  progress: Callable[[int, int], None] | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
        """MAR-HR: VAE latents (B, L_hr, C) for condition images and their LR latents (B, L_lr, C)
        (and the reference shape's HR latents, for a MAR that takes them)."""
        ref = None if reference is None or not self.mar_hr.cfg.reference else self.mar_hr.normalize(reference)
        with torch_threads(self.sampling_threads):
            hr = self.mar_hr.sample(pixels, self.mar_hr.normalize(lr_latents), steps=s.hr_steps, cfg=s.cfg_hr,
                                    temperature=s.temperature, diffusion_steps=s.diffusion_steps,
                                    cond_aug_t=s.cond_aug_t, generator=generator, progress=progress, reference=ref,
                                    residual_scale=s.residual_scale)
        return self.mar_hr.denormalize(hr)

    def extract(self, latents: torch.Tensor, s: Settings, resolution: int | None = None,
                outline: tuple[ViewFit, np.ndarray] | None = None) -> trimesh.Trimesh:
        """Mesh of the VAE occupancy field of `latents` (1, M, C) at `resolution` (default the
        settings'), carved to `outline` (the input's camera and object mask, mar3d.carve) if given;
        raises ExtractionError if empty."""
        decode = self.vae.occupancy_fn(latents, blur=s.query_blur)
        if outline is not None:
            decode = carve(decode, *outline, dilation=s.carve_dilation)
        mesh, _ = extract_mesh(decode, resolution=resolution or s.resolution, target_faces=s.target_faces or None)
        return mesh
