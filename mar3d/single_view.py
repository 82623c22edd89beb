"""Single-view reconstruction: the pretraining task of the frozen image encoder (this project's choice).

MAR-3D conditions its MARs on frozen CLIP + DINOv2. None can be had offline, and a ViT trained
from scratch through MAR's diffusion loss alone learns little about shape in a CPU budget
(checkpoints/README.md). So the encoder is first trained on the strongest signal the data has:

    image → tiny ViT → readout head (one query per LR / HR token, anchored order) → Linear → tokens
    loss = MSE(tokens, the VAE's tokens) + bce_weight · BCE(the frozen VAE decoder's occupancy of
           the predicted HR tokens, the shape's occupancy labels)

Afterwards the encoder (ViT + readout head) is frozen inside MAR-LR (its LR-query features) and
MAR-HR (its HR-query features), and the training engine computes its features once per image.
The reconstructor itself is a deterministic image → 3D model: its held-out F-score is the
baseline the generative cascade must beat (scripts/pilot_eval.py --recon).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from .image_encoder import ImageEncoder, ImageEncoderConfig
from .projection import CAMERA_FIELDS, project


@dataclass
class ReconConfig:
    token_dim: int = 32        # the VAE's latent channels
    bce_weight: float = 1.0    # occupancy BCE through the frozen VAE decoder, beside the token MSE
    latent_shift: float = 0.0  # the latent cache's normalisation (tokens are predicted normalised)
    latent_scale: float = 1.0
    encoder: ImageEncoderConfig = field(default_factory=lambda: ImageEncoderConfig(kind="readout"))

    def __post_init__(self):
        if isinstance(self.encoder, dict):  # read back from json
            self.encoder = ImageEncoderConfig(**self.encoder)


class SingleViewRecon(nn.Module):
    """images (B, 3, H, W) in [0, 1] → normalised LR tokens (B, L_lr, C) and HR tokens (B, L_hr, C)."""

    def __init__(self, cfg: ReconConfig):
        super().__init__()
        if cfg.encoder.kind != "readout" or cfg.encoder.output != "all" or cfg.encoder.frozen:
            raise ValueError("SingleViewRecon trains a readout encoder with output 'all' (not frozen)")
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg.encoder)
        self.to_tokens = nn.Linear(cfg.encoder.width, cfg.token_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.to_tokens(self.encoder(images))  # (B, L_lr + L_hr, C)
        return tokens[:, : self.cfg.encoder.readout_lr], tokens[:, self.cfg.encoder.readout_lr:]

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.cfg.latent_scale + self.cfg.latent_shift

    def encoder_config(self, output: str) -> ImageEncoderConfig:
        """The config of this encoder frozen inside a MAR, giving the `output` ("lr" / "hr") queries' features."""
        from dataclasses import replace

        return replace(self.cfg.encoder, output=output, frozen=True)


@dataclass
class OccConfig:
    """Image → occupancy directly (this project's pilots O1, O3): no shape tokens in between."""

    num_freqs: int = 6          # Fourier octaves of the query points, as the VAE's
    dec_layers: int = 2         # cross-attention blocks (with feed-forward) from a point to the image tokens
    near_weight: float = 1.0    # weight of the near-surface BCE next to the uniform BCE (the VAE's)
    out_bias: float = -1.0      # initial logit: most of the box is empty
    encoder: ImageEncoderConfig = field(default_factory=lambda: ImageEncoderConfig(kind="tiny", stem="conv", layers=8))
    # O3: pixel-aligned features. A point also reads a small CNN's stride-4 map and the ViT's patch grid
    # where it lands in the image (mar3d.projection), at the camera a head reads off the picture.
    pixel_aligned: bool = False
    pixel_channels: int = 64
    camera_mean: list = field(default_factory=list)  # the training views' CAMERA_FIELDS: mean and std,
    camera_std: list = field(default_factory=list)   # the head predicts them standardised (set by the task)
    camera_jitter: list = field(default_factory=lambda: [3.0, 0.1, 0.08, 0.02, 0.02])  # training lookups: true + N(0, this)
    camera_weight: float = 1.0  # the camera head's MSE (standardised units) beside the BCE

    def __post_init__(self):
        if isinstance(self.encoder, dict):  # read back from json
            self.encoder = ImageEncoderConfig(**self.encoder)


class ImageOccupancy(nn.Module):
    """images (B, 3, H, W) in [0, 1] and points (B, Q, 3) in the view's frame → occupancy logits (B, Q).

    The VAE decoder's query path with the image's ViT tokens in place of the shape tokens: a point's
    Fourier embedding attends to the CLS + patch tokens (`dec_layers` blocks), then a linear logit.
    So the image → shape map is learnt with no token space to regress into (checkpoints/README.md:
    the reconstructor's tokens explain a fifth of the true tokens' variance and decode to fragments).
    With `pixel_aligned` the point's embedding first gets the features at its projection (PIFu's
    pixel-aligned features), so what the picture shows at a point is read there, not searched for."""

    def __init__(self, cfg: OccConfig):
        super().__init__()
        from .layers import CrossBlock, FourierEmbed, init_weights

        if cfg.encoder.kind != "tiny":
            raise ValueError("ImageOccupancy trains a tiny ViT encoder (kind 'tiny')")
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg.encoder)
        width = cfg.encoder.width
        self.fourier = FourierEmbed(cfg.num_freqs)
        self.query_embed = nn.Linear(self.fourier.out_dim, width)
        self.blocks = nn.ModuleList(CrossBlock(width, cfg.encoder.heads) for _ in range(cfg.dec_layers))
        self.out_norm = nn.LayerNorm(width)
        self.to_logit = nn.Linear(width, 1)
        parts = [self.query_embed, self.blocks, self.out_norm, self.to_logit]
        if cfg.pixel_aligned:
            c = cfg.pixel_channels
            self.pixel_cnn = nn.Sequential(
                nn.Conv2d(3, c // 2, 3, stride=2, padding=1), nn.GroupNorm(1, c // 2), nn.GELU(),
                nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.GroupNorm(1, c), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1))
            self.pixel_embed = nn.Linear(c + width, width)
            fields = len(CAMERA_FIELDS)
            self.camera_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, fields))
            self.register_buffer("camera_mean", torch.tensor(cfg.camera_mean or [0.0] * fields), persistent=False)
            self.register_buffer("camera_std", torch.tensor(cfg.camera_std or [1.0] * fields), persistent=False)
            parts += [self.pixel_embed, self.camera_head]
        for module in parts:
            module.apply(init_weights)
        nn.init.constant_(self.to_logit.bias, cfg.out_bias)

    def features(self, images: torch.Tensor) -> dict:
        """What the points read: the ViT tokens (B, T, D); with pixel_aligned also the CNN's map,
        the patch grid (B, C, h, w) and the predicted camera (B, 5, mar3d.projection.CAMERA_FIELDS)."""
        tokens = self.encoder(images)
        out = {"tokens": tokens}
        if self.cfg.pixel_aligned:
            n = tokens.shape[0]
            side = int(round((tokens.shape[1] - 1) ** 0.5))
            out["pixels"] = self.pixel_cnn(self.encoder.normalise(images))
            out["grid"] = tokens[:, 1:].transpose(1, 2).reshape(n, -1, side, side)
            out["camera"] = self.camera_head(tokens[:, 0]) * self.camera_std + self.camera_mean
        return out

    def query(self, feats: dict, points: torch.Tensor, camera: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, Q) at points (B, Q, 3); `camera` (B, 5) overrides the predicted one (training)."""
        q = self.query_embed(self.fourier(points))
        if self.cfg.pixel_aligned:
            uv = project(points.float(), (feats["camera"] if camera is None else camera).float())[:, :, None]
            look = lambda m: nn.functional.grid_sample(m, uv.to(m.dtype), align_corners=False)[..., 0]  # noqa: E731
            local = torch.cat([look(feats["pixels"]), look(feats["grid"])], 1).transpose(1, 2)  # (B, Q, C + D)
            q = q + self.pixel_embed(local)
        for block in self.blocks:
            q = block(q, feats["tokens"])
        return self.to_logit(self.out_norm(q)).squeeze(-1)

    def forward(self, images: torch.Tensor, points: torch.Tensor, camera: torch.Tensor | None = None):
        """(logits (B, Q), predicted camera (B, 5) or None)."""
        feats = self.features(images)
        return self.query(feats, points, camera), feats.get("camera")

    def occupancy_fn(self, images: torch.Tensor, camera: torch.Tensor | None = None):
        """A decode function for mesh extraction (mar3d.extract): points (Q, 3) → logits (Q,), one image,
        looked up at the predicted camera (or at `camera` (5,))."""
        assert images.shape[0] == 1, "occupancy_fn takes one image"
        with torch.no_grad():
            feats = self.features(images)
        camera = None if camera is None else camera.reshape(1, -1)

        @torch.no_grad()
        def decode_fn(points: torch.Tensor) -> torch.Tensor:
            return self.query(feats, points.to(feats["tokens"])[None], camera)[0].float()

        return decode_fn
