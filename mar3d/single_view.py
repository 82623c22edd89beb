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
