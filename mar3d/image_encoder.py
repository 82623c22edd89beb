"""Image encoders that turn a conditioning image into the prefix tokens of MAR (DESIGN §5).

Three kinds:
- ``"tiny"``: a small DINOv2-style ViT built from config (random init) and trained together with
  MAR; tokens = its CLS token + patch tokens.
- ``"readout"``: the same tiny ViT followed by a readout head: one learned query per LR and per HR
  shape token (anchored order, mar3d.token_order) cross-attends to the ViT tokens. It is
  pretrained on single-view reconstruction (mar3d.single_view: image → shape tokens → the frozen VAE
  decoder), then frozen inside MAR (this project's stand-in for the paper's frozen CLIP + DINOv2,
  which cannot be had offline). tokens = the readout features of the LR or HR queries.
- ``"pretrained"``: frozen CLIP ViT-L/14 vision tower + DINOv2 loaded from local directories;
  tokens = [CLIP CLS token, DINOv2 patch tokens] (257 x 1024 at 224 px, as in the reference).

Nothing is ever downloaded: a missing or incomplete encoder directory raises
``EncoderNotFoundError`` before ``transformers`` is even imported.
"""

from __future__ import annotations

import os

# Offline by default (must be set before transformers is imported); loads also pass
# local_files_only=True, so nothing is fetched even if the caller already imported transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Shape of the pretrained encoders when their files are absent (CLIP ViT-L/14 and DINOv2-L).
_VIT_L14_PATCH, _VIT_L14_WIDTH = 14, 1024


@dataclass
class ImageEncoderConfig:
    """Which image encoder to use; plain fields only (stored as JSON inside the MAR config)."""

    kind: str = "tiny"  # "tiny" (trained with MAR), "readout" (tiny + readout head) or "pretrained"
    # tiny (and the ViT of readout)
    image_size: int = 128
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    # "patch": DINOv2's linear patch embedding; "conv": a stride-2 3x3 conv stack down to the same
    # token grid, then the same transformer (ConvStemViT; early convolutions train faster on small data)
    stem: str = "patch"
    # readout: one query per shape token; `output` picks which queries' features are the tokens
    readout_lr: int = 32
    readout_hr: int = 128
    readout_layers: int = 3
    output: str = "all"  # "lr" | "hr" | "all" (LR then HR)
    frozen: bool = False  # readout: no gradients, eval mode (its weights still live in MAR's file)
    # pretrained: transformers model directories; relative paths are resolved by the caller
    clip_path: str = ""
    dinov2_path: str = ""
    pretrained_size: int = 224


# "paper" paths are relative to the repository root; the caller resolves them.
PRESETS = {
    "tiny": ImageEncoderConfig(),
    "paper": ImageEncoderConfig(
        kind="pretrained",
        clip_path="checkpoints/encoders/clip-vit-large-patch14",
        dinov2_path="checkpoints/encoders/dinov2-large",
    ),
}


class EncoderNotFoundError(FileNotFoundError):
    """A pretrained encoder directory is missing or incomplete (mar3d never downloads weights)."""


def _check_model_dir(path: str, what: str, example: str) -> Path:
    """Fail fast (no transformers import) unless `path` holds config.json + safetensors weights."""
    expected = (
        f"expected a transformers model directory with config.json and model.safetensors "
        f"(e.g. the files of {example} saved with save_pretrained); mar3d never downloads weights."
    )
    if not path:
        raise EncoderNotFoundError(f"{what} path is empty: {expected}")
    root = Path(path)
    if not root.is_dir():
        where = str(root) if root.is_absolute() else f"{root} (resolved: {root.resolve()})"
        raise EncoderNotFoundError(f"{what} not found at {where}: {expected}")
    if not (root / "config.json").is_file():
        raise EncoderNotFoundError(f"{what} at {root} has no config.json: {expected}")
    index = root / "model.safetensors.index.json"
    if index.is_file():  # sharded checkpoint: every shard named in the index must be there
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing or not shards:
            raise EncoderNotFoundError(
                f"{what} at {root} is incomplete: shards missing from {index.name}: {missing}; {expected}")
        return root
    if (root / "model.safetensors").is_file() or any(root.glob("*.safetensors")):
        return root
    # Pickled .bin weights are refused on purpose (arbitrary code on load).
    bins = sorted(p.name for p in root.glob("*.bin"))
    hint = f" (found {bins}: pickled weights are not loaded; re-save with safe_serialization=True)" if bins else ""
    raise EncoderNotFoundError(f"{what} at {root} has config.json but no model.safetensors{hint}: {expected}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def token_shape(cfg: ImageEncoderConfig) -> tuple[int, int]:
    """(num_tokens, dim) without building the encoder (e.g. for the "paper" preset on meta).

    For "pretrained", reads the local config.json files when present and otherwise assumes
    CLIP ViT-L/14 + DINOv2-L (patch 14, width 1024).
    """
    if cfg.kind == "tiny":
        return 1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.width
    if cfg.kind == "readout":
        return readout_slice(cfg).stop - readout_slice(cfg).start, cfg.width
    if cfg.kind == "pretrained":
        dino = _read_json(Path(cfg.dinov2_path) / "config.json") if cfg.dinov2_path else {}
        patch = dino.get("patch_size", _VIT_L14_PATCH)
        width = dino.get("hidden_size", _VIT_L14_WIDTH)
        return 1 + (cfg.pretrained_size // patch) ** 2, width
    raise ValueError(f"unknown image encoder kind {cfg.kind!r} (expected 'tiny', 'readout' or 'pretrained')")


def readout_slice(cfg: ImageEncoderConfig) -> slice:
    """Which readout queries (LR first, then HR) are the encoder's output tokens."""
    lr, hr = cfg.readout_lr, cfg.readout_hr
    try:
        return {"lr": slice(0, lr), "hr": slice(lr, lr + hr), "all": slice(0, lr + hr)}[cfg.output]
    except KeyError:
        raise ValueError(f"unknown readout output {cfg.output!r} (expected 'lr', 'hr' or 'all')") from None


class ConvStemViT(nn.Module):
    """A small ViT whose patch embedding is a stack of 3x3 stride-2 convolutions (Xiao et al. 2021,
    "Early convolutions help transformers see better"): log2(patch_size) of them, widths doubling up
    to `width`, so the token grid is the patch grid. pixel_values (B, 3, S, S) → tokens
    (B, 1 + (S / patch)², width): CLS first, as DINOv2's last_hidden_state."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        from .layers import SelfBlock, init_weights

        n = cfg.patch_size.bit_length() - 1
        if 2 ** n != cfg.patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch_size, got {cfg.patch_size}")
        widths = [3] + [max(cfg.width >> (n - 1 - i), 8) for i in range(n)]
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1)] + ([nn.GroupNorm(1, b), nn.GELU()] if i < n - 1 else [])
        self.stem = nn.Sequential(*layers)
        grid = (cfg.image_size // cfg.patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.randn(1, 1 + grid, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(SelfBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        for module in (self.blocks, self.norm):
            module.apply(init_weights)

    def forward(self, pixel_values: Tensor):
        x = self.stem(pixel_values).flatten(2).transpose(1, 2)  # (B, grid, W)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ImageEncoder(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> condition tokens (B, num_tokens, dim)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.external = cfg.kind == "pretrained"  # weights load from their own files, not from MAR's
        if cfg.kind in ("tiny", "readout"):
            self._build_tiny(cfg)
            if cfg.kind == "readout":
                self._build_readout(cfg)
        elif cfg.kind == "pretrained":
            self._build_pretrained(cfg)
        else:
            raise ValueError(f"unknown image encoder kind {cfg.kind!r} (expected 'tiny', 'readout' or 'pretrained')")

    # ---- construction -------------------------------------------------------------------
    def _build_tiny(self, cfg: ImageEncoderConfig) -> None:
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.stem == "conv":
            self.vit = ConvStemViT(cfg)
        elif cfg.stem == "patch":
            from transformers import Dinov2Config, Dinov2Model

            vit_cfg = Dinov2Config(
                image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, mlp_ratio=4,
            )
            self.vit = Dinov2Model(vit_cfg)
            # DINOv2's mask token (for masked-image pretraining) is never used here; frozen, it
            # does not leave DDP waiting for a gradient that never comes.
            self.vit.embeddings.mask_token.requires_grad_(False)
        else:
            raise ValueError(f"unknown stem {cfg.stem!r} (expected 'patch' or 'conv')")
        self.size = cfg.image_size
        self.trainable = True
        self.num_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2  # CLS + patches
        self.dim = cfg.width
        self._register_norm("mean", "std", IMAGENET_MEAN, IMAGENET_STD)

    def _build_readout(self, cfg: ImageEncoderConfig) -> None:
        from .layers import CrossBlock, SelfBlock, init_weights

        W = cfg.width
        self.queries = nn.Parameter(torch.randn(1, cfg.readout_lr + cfg.readout_hr, W) * 0.02)
        self.readout = nn.ModuleList(
            nn.ModuleList([CrossBlock(W, cfg.heads), SelfBlock(W, cfg.heads)]) for _ in range(cfg.readout_layers))
        self.readout_norm = nn.LayerNorm(W)
        for module in (self.readout, self.readout_norm):
            module.apply(init_weights)
        self.select = readout_slice(cfg)
        self.num_tokens = self.select.stop - self.select.start
        if cfg.frozen:
            self.requires_grad_(False)
            self.trainable = False

    def _build_pretrained(self, cfg: ImageEncoderConfig) -> None:
        # Check the files first: a missing encoder fails in milliseconds, never via the hub.
        clip_dir = _check_model_dir(cfg.clip_path, "CLIP vision encoder", "openai/clip-vit-large-patch14")
        dino_dir = _check_model_dir(cfg.dinov2_path, "DINOv2 encoder", "facebook/dinov2-large")

        from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

        # CLIPVisionConfig also reads the vision part of a full CLIPModel config.json.
        clip_cfg = CLIPVisionConfig.from_pretrained(clip_dir, local_files_only=True)
        dino_cfg = Dinov2Config.from_pretrained(dino_dir, local_files_only=True)
        # The CLS token and the patch tokens share one sequence, so their widths must agree
        # (1024 for CLIP ViT-L/14 and DINOv2-L); no projection is learnt here.
        if clip_cfg.hidden_size != dino_cfg.hidden_size:
            raise ValueError(
                f"CLIP hidden size {clip_cfg.hidden_size} ({clip_dir}) != DINOv2 hidden size "
                f"{dino_cfg.hidden_size} ({dino_dir}): the pretrained encoder concatenates their tokens, "
                f"so use a matching pair (e.g. CLIP ViT-L/14 with DINOv2-L, both 1024)."
            )
        # float32 explicitly: transformers 5 may otherwise pick the checkpoint's dtype.
        load = dict(local_files_only=True, use_safetensors=True, dtype=torch.float32)
        self.clip = CLIPVisionModel.from_pretrained(clip_dir, config=clip_cfg, **load)
        self.dinov2 = Dinov2Model.from_pretrained(dino_dir, config=dino_cfg, **load)
        for model in (self.clip, self.dinov2):
            model.requires_grad_(False)
            model.eval()

        self.size = cfg.pretrained_size
        self.trainable = False
        self.num_tokens = 1 + (cfg.pretrained_size // dino_cfg.patch_size) ** 2  # CLIP CLS + DINO patches
        self.dim = dino_cfg.hidden_size
        # CLIP's position table is fixed to its training size; interpolate only when sizes differ.
        self._clip_interpolate = cfg.pretrained_size != clip_cfg.image_size
        self._register_norm("clip_mean", "clip_std", CLIP_MEAN, CLIP_STD)
        self._register_norm("mean", "std", IMAGENET_MEAN, IMAGENET_STD)

    def _register_norm(self, mean_name: str, std_name: str, mean, std) -> None:
        # Non-persistent: constants, not weights, so they stay out of checkpoints.
        self.register_buffer(mean_name, torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(std_name, torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ---- running ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "ImageEncoder":
        """Frozen pretrained encoders stay in eval mode whatever the parent module does."""
        super().train(mode)
        if self.external:
            self.clip.eval()
            self.dinov2.eval()
        elif not self.trainable:
            super().train(False)
        return self

    def _resize(self, images: Tensor) -> Tensor:
        """Resize to the encoder's square size (the preprocessing already padded to a square)."""
        if images.shape[-2:] == (self.size, self.size):
            return images
        out = F.interpolate(images, size=(self.size, self.size), mode="bicubic",
                            align_corners=False, antialias=True)  # (B, 3, S, S)
        return out.clamp(0.0, 1.0)  # bicubic overshoots slightly

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) float in [0, 1] -> tokens (B, num_tokens, dim)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self._resize(images.to(self.mean.dtype))  # (B, 3, S, S), in the module's dtype
        if self.external:
            return self._pretrained_tokens(x)
        tokens = self.vit(pixel_values=self.normalise(x))  # (B, 65, D)
        if not isinstance(tokens, Tensor):  # DINOv2's output object
            tokens = tokens.last_hidden_state
        if self.cfg.kind == "tiny":
            return tokens
        return self.read_out(tokens)[:, self.select]  # (B, num_tokens, D)

    def normalise(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> the tiny ViT's input: resized, ImageNet-normalised."""
        return (self._resize(images.to(self.mean.dtype)) - self.mean) / self.std

    def read_out(self, vit_tokens: Tensor) -> Tensor:
        """Readout features of every query (B, L_lr + L_hr, D): LR queries first, then HR."""
        q = self.queries.to(vit_tokens.dtype).expand(vit_tokens.shape[0], -1, -1)
        for cross, self_block in self.readout:
            q = self_block(cross(q, vit_tokens))
        return self.readout_norm(q)

    @torch.no_grad()
    def _pretrained_tokens(self, x: Tensor) -> Tensor:
        clip_in = (x - self.clip_mean) / self.clip_std  # (B, 3, S, S)
        dino_in = (x - self.mean) / self.std  # (B, 3, S, S)
        # Reference: CLIP last_hidden_state (before post_layernorm), CLS position only.
        cls = self.clip(pixel_values=clip_in, interpolate_pos_encoding=self._clip_interpolate
                        ).last_hidden_state[:, :1]  # (B, 1, D)
        patches = self.dinov2(pixel_values=dino_in).last_hidden_state[:, 1:]  # (B, P, D)
        return torch.cat([cls, patches], dim=1)  # (B, 1 + P, D)


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """Build the encoder described by `cfg` (pretrained paths must already be resolved)."""
    return ImageEncoder(cfg)
