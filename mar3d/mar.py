"""MAR: masked auto-regressive generation of VAE tokens with a per-token diffusion loss (DESIGN §6).

One module serves both stages of the cascade:
  MAR-LR  prefix = image tokens                       → generates the LR token set
  MAR-HR  prefix = image tokens ++ Linear(LR tokens)  → generates the HR token set
Training: encoder (MAE style) sees the prefix and the unmasked tokens; the decoder puts mask
tokens back; the diffusion head learns the masked tokens given the decoder output z.
Sampling: random order, cosine schedule of tokens per step, linear CFG ramp.
Tokens are modelled normalised, (x − latent_shift) / latent_scale; `normalize` and
`denormalize` convert to and from VAE latents.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .diffusion import DiffLoss
from .image_encoder import ImageEncoder, ImageEncoderConfig
from .layers import SelfBlock, init_weights
from .schedules import cfg_scale_at, sample_mask_ratio, tokens_per_step


@dataclass
class MARConfig:
    seq_len: int = 32              # L: tokens generated (the VAE's lr_tokens or hr_tokens)
    token_dim: int = 32            # C: channels per token (the VAE's latent_dim)
    lr_seq_len: int = 0            # > 0 makes this MAR-HR: the prefix also holds that many LR tokens
    width: int = 256
    heads: int = 4
    enc_layers: int = 4
    dec_layers: int = 4
    diff_width: int = 256          # diffusion MLP
    diff_depth: int = 3
    diff_train_steps: int = 1000
    diff_batch_mul: int = 4        # each masked token is noised this many times per step ([ref]: 4)
    cond_drop: float = 0.1         # training probability of the learned "no condition" prefix (CFG)
    mask_ratio_min: float = 0.7    # training mask ratio: normal N(1, mask_ratio_std) truncated to [mask_ratio_min, 1]
    mask_ratio_std: float = 0.25   # ([ref]: 0.7 and 0.25; sampling's later steps go below 0.7)
    cond_aug_min: float = 0.4      # MAR-HR condition augmentation: x' = t·ε + (1 − t)·x, t ~ U(min, max)
    cond_aug_max: float = 0.6
    aux_weight: float = 0.0        # > 0: also regress each masked token from z (MSE), a direct signal into z
    # "prefix": image tokens are prefix tokens (the paper). "aligned": the image encoder gives one
    # token per generated index (the readout encoder, anchored order); each is added to its
    # index's input in the MAE encoder and decoder, and the prefix holds only their mean
    # (and MAR-HR's LR tokens). Cheaper than a prefix of L tokens, and z_i sees its own.
    cond_mode: str = "prefix"
    # True (aligned mode): the diffusion head models each token's residual from a base prediction,
    # a frozen Linear of its aligned image token (the single-view reconstructor's own token head,
    # loaded with its encoder). MAR then starts from the deterministic reconstruction and learns
    # what that leaves out, instead of learning token values from scratch through the diffusion loss.
    residual: bool = False
    # True: MAR also takes a reference, the normalised tokens (B, L, C) of a retrieved training
    # shape (mar3d.retrieval: the render with the nearest silhouette). Each index gets
    # Linear(its reference token) added like an aligned condition, never dropped for CFG; with
    # `residual` the base is the reference itself, so MAR learns how the pictured shape differs
    # from the retrieved one.
    reference: bool = False
    latent_shift: float = 0.0      # token normalisation, set from the training latents
    latent_scale: float = 1.0
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)

    def __post_init__(self):
        if isinstance(self.image_encoder, dict):  # read back from json
            self.image_encoder = ImageEncoderConfig(**self.image_encoder)


class MAR(nn.Module):
    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        W, L = cfg.width, cfg.seq_len
        # --------------------------------------------------------------- condition prefix
        self.image_encoder = ImageEncoder(cfg.image_encoder)
        self.image_proj = nn.Linear(self.image_encoder.dim, W)
        self.lr_proj = nn.Linear(cfg.token_dim, W) if cfg.lr_seq_len else None
        if cfg.cond_mode == "aligned":
            if self.image_encoder.num_tokens != L:
                raise ValueError(f"aligned conditioning needs one image token per index: the encoder gives "
                                 f"{self.image_encoder.num_tokens}, MAR generates {L}")
            self.prefix_len, self.aligned_len = 1 + cfg.lr_seq_len, L  # [mean image token, LR tokens]
        elif cfg.cond_mode == "prefix":
            self.prefix_len, self.aligned_len = self.image_encoder.num_tokens + cfg.lr_seq_len, L if cfg.reference else 0
        else:
            raise ValueError(f"unknown cond_mode {cfg.cond_mode!r} (expected 'prefix' or 'aligned')")
        # the whole condition (prefix, then the aligned part) and its learned null (CFG)
        self.fake_prefix = nn.Parameter(torch.zeros(1, self.prefix_len + self.aligned_len, W))
        # --------------------------------------------------------------- MAE encoder
        self.token_proj = nn.Linear(cfg.token_dim, W)
        self.enc_pos = nn.Parameter(torch.zeros(1, self.prefix_len + L, W))
        self.encoder = nn.ModuleList(SelfBlock(W, cfg.heads) for _ in range(cfg.enc_layers))
        self.enc_norm = nn.LayerNorm(W)
        # --------------------------------------------------------------- MAE decoder
        self.dec_proj = nn.Linear(W, W)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        self.dec_pos = nn.Parameter(torch.zeros(1, self.prefix_len + L, W))
        self.decoder = nn.ModuleList(SelfBlock(W, cfg.heads) for _ in range(cfg.dec_layers))
        self.dec_norm = nn.LayerNorm(W)
        self.diff_pos = nn.Parameter(torch.zeros(1, L, W))
        # --------------------------------------------------------------- diffusion head
        self.diffloss = DiffLoss(cfg.token_dim, W, cfg.diff_width, cfg.diff_depth, cfg.diff_train_steps)
        self.aux_head = nn.Linear(W, cfg.token_dim) if cfg.aux_weight > 0 else None  # training only
        self.ref_proj = nn.Linear(cfg.token_dim, W) if cfg.reference else None
        self.base_head = None
        if cfg.residual and not cfg.reference:
            if cfg.cond_mode != "aligned":
                raise ValueError("residual needs cond_mode='aligned' (one image token per generated index) "
                                 "or a reference")
            self.base_head = nn.Linear(self.image_encoder.dim, cfg.token_dim).requires_grad_(False)

        for name, module in self.named_modules():
            if not name.startswith(("image_encoder", "diffloss", "base_head")):  # initialised elsewhere
                init_weights(module)
        for p in (self.fake_prefix, self.enc_pos, self.mask_token, self.dec_pos, self.diff_pos):
            nn.init.normal_(p, std=0.02)

    def frozen_state_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes not saved with the model: a frozen pretrained encoder loads from its own files."""
        return ("image_encoder.",) if self.image_encoder.external else ()

    # ------------------------------------------------------------------- tokens
    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.cfg.latent_shift) / self.cfg.latent_scale

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.cfg.latent_scale + self.cfg.latent_shift

    # ------------------------------------------------------------------- condition
    def base(self, image_tokens: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor | None:
        """The base prediction (B, L, C) the diffusion head's targets are residuals from (None: no residual)."""
        if self.cfg.residual and self.cfg.reference:
            return reference
        if self.base_head is None:
            return None
        return self.base_head(image_tokens.to(self.base_head.weight.dtype))

    def with_reference(self, cond: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """`cond` with Linear(reference token) added to each index's part (a no-op without `cfg.reference`)."""
        if self.ref_proj is None:
            return cond
        if reference is None or reference.shape[1:] != (self.cfg.seq_len, self.cfg.token_dim):
            raise ValueError(f"this MAR needs a reference of ({self.cfg.seq_len}, {self.cfg.token_dim}) tokens per "
                             f"image, got {None if reference is None else tuple(reference.shape)}")
        aligned = cond[:, self.prefix_len:] + self.ref_proj(reference.to(self.ref_proj.weight.dtype))
        return torch.cat([cond[:, : self.prefix_len], aligned], dim=1)

    def condition(self, images: torch.Tensor | None, lr_tokens: torch.Tensor | None = None, aug_t: float | None = None,
                  generator: torch.Generator | None = None, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix (B, P, W) from images (B, 3, H, W) in [0, 1] and, for MAR-HR, normalised LR tokens.

        `image_tokens` (B, T_img, D): the image encoder's output computed beforehand (a frozen
        encoder's cached features), used instead of `images`.
        Condition augmentation of the LR tokens: t ~ U(cond_aug_min, cond_aug_max) per shape while
        training, `aug_t` (default the middle of that range) at inference."""
        if image_tokens is None:
            image_tokens = self.image_encoder(images)
        prefix = self.image_proj(image_tokens.to(self.image_proj.weight.dtype))  # (B, T_img, W)
        aligned = prefix[:, :0]
        if self.cfg.cond_mode == "aligned":  # (B, L, W) per index; the prefix keeps their mean
            aligned, prefix = prefix, prefix.mean(1, keepdim=True)
        elif self.aligned_len:  # prefix mode with a reference: the per-index part holds only the reference
            aligned = prefix.new_zeros(prefix.shape[0], self.aligned_len, prefix.shape[2])
        if self.lr_proj is None:
            return torch.cat([prefix, aligned], dim=1)
        if lr_tokens is None:
            raise ValueError("MAR-HR needs the LR tokens as condition")
        B = lr_tokens.shape[0]
        if aug_t is None and self.training:
            lo, hi = self.cfg.cond_aug_min, self.cfg.cond_aug_max
            t = lo + (hi - lo) * torch.rand(B, 1, 1, device=lr_tokens.device, generator=generator)
        else:
            t = torch.full((B, 1, 1), 0.5 * (self.cfg.cond_aug_min + self.cfg.cond_aug_max) if aug_t is None else aug_t,
                           device=lr_tokens.device)
        noise = torch.randn(lr_tokens.shape, device=lr_tokens.device, generator=generator)
        lr = t * noise + (1 - t) * lr_tokens  # (B, L_lr, C)
        return torch.cat([prefix, self.lr_proj(lr), aligned], dim=1)  # (B, P + aligned, W)

    def drop_condition(self, prefix: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace the whole prefix by the learned fake one with probability cond_drop (per shape)."""
        drop = torch.rand(prefix.shape[0], 1, 1, device=prefix.device, generator=generator) < self.cfg.cond_drop
        return torch.where(drop, self.fake_prefix.to(prefix.dtype), prefix)

    # ------------------------------------------------------------------- MAE encoder / decoder
    def _keep(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, P + L) bool: prefix positions and unmasked tokens."""
        return torch.cat([mask.new_ones(mask.shape[0], self.prefix_len), ~mask], dim=1)

    def encode(self, tokens: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder over prefix + unmasked tokens. tokens (B, L, C), cond (B, P [+ L], W) from
        `condition`, mask (B, L) bool, same count per row."""
        B, W = tokens.shape[0], self.cfg.width
        x = torch.cat([cond[:, : self.prefix_len], self.token_proj(tokens) + self._aligned(cond)], dim=1)
        x = x + self.enc_pos  # (B, P + L, W)
        x = x[self._keep(mask)].view(B, -1, W)  # (B, P + L_visible, W)
        for block in self.encoder:
            x = block(x)
        return self.enc_norm(x)

    def _aligned(self, cond: torch.Tensor) -> torch.Tensor | float:
        """The per-index part of the condition (B, L, W), or 0 in prefix mode."""
        return cond[:, self.prefix_len:] if self.aligned_len else 0.0

    def decode(self, x: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder with mask tokens put back; returns z (B, L, W) for the diffusion head.
        `cond` (needed in aligned mode) adds each index's image token to its mask token too."""
        B, W = x.shape[0], self.cfg.width
        x = self.dec_proj(x)
        full = self.mask_token.to(x.dtype).expand(B, self.prefix_len + self.cfg.seq_len, W).clone()
        full[self._keep(mask)] = x.reshape(-1, W)
        full = full + self.dec_pos  # (B, P + L, W)
        if self.aligned_len:
            full = torch.cat([full[:, : self.prefix_len], full[:, self.prefix_len:] + self._aligned(cond)], dim=1)
        for block in self.decoder:
            full = block(full)
        return self.dec_norm(full)[:, self.prefix_len:] + self.diff_pos  # (B, L, W)

    def random_mask(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) bool: one truncated-normal ratio per batch, random positions per shape."""
        L = self.cfg.seq_len
        n = math.ceil(L * sample_mask_ratio(generator, std=self.cfg.mask_ratio_std, low=self.cfg.mask_ratio_min))
        order = torch.rand(batch, L, device=device, generator=generator).argsort(dim=1)
        return torch.zeros(batch, L, dtype=torch.bool, device=device).scatter_(1, order[:, :n], True)

    # ------------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None, lr_tokens: torch.Tensor | None = None,
                image_tokens: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on the masked tokens (+ aux_weight · MSE of the aux regression).
        tokens (B, L, C) normalised; images (B, 3, H, W), or the encoder's `image_tokens`;
        `reference` (B, L, C) normalised, for a MAR with `cfg.reference`."""
        if image_tokens is None:
            image_tokens = self.image_encoder(images)
        prefix = self.condition(None, lr_tokens, image_tokens=image_tokens)  # (B, P, W)
        if self.training:
            prefix = self.drop_condition(prefix)
        prefix = self.with_reference(prefix, reference)
        mask = self.random_mask(tokens.shape[0], tokens.device)          # (B, L)
        z = self.decode(self.encode(tokens, prefix, mask), mask, prefix)  # (B, L, W)
        base = self.base(image_tokens, reference)
        target = (tokens if base is None else tokens - base)[mask]      # (N_masked, C)
        z = z[mask]                                                      # (N_masked, W)
        k = self.cfg.diff_batch_mul
        loss = self.diffloss.loss(target.repeat(k, 1), z.repeat(k, 1))
        if self.aux_head is not None:
            loss = loss + self.cfg.aux_weight * (self.aux_head(z).float() - target.float()).pow(2).mean()
        return loss

    # ------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, images: torch.Tensor, lr_tokens: torch.Tensor | None = None, steps: int = 16, cfg: float = 3.0,
               temperature: float = 1.0, diffusion_steps: int = 100, cond_aug_t: float | None = None,
               generator: torch.Generator | None = None,
               progress: Callable[[int, int], None] | None = None, reference: torch.Tensor | None = None,
               residual_scale: float = 1.0) -> torch.Tensor:
        """Normalised tokens (B, L, C) for images (B, 3, H, W) (and normalised LR tokens for MAR-HR,
        and the normalised reference tokens for a MAR with `cfg.reference`). A residual MAR adds
        `residual_scale` × each sampled residual to its base (0: the base itself).

        Every random draw comes from `generator` (on the images' device): same seed and settings,
        same tokens."""
        B, L, device = images.shape[0], self.cfg.seq_len, images.device
        steps = max(1, min(steps, L))
        image_tokens = self.image_encoder(images)
        prefix = self.condition(None, lr_tokens, aug_t=cond_aug_t, generator=generator, image_tokens=image_tokens)
        base = self.base(image_tokens, reference)  # (B, L, C) or None
        if base is not None and residual_scale == 0:  # nothing sampled would be kept
            return base.clone()
        both = (lambda t: torch.cat([t, t])) if cfg != 1.0 else (lambda t: t)  # noqa: E731 (cond; uncond)
        if cfg != 1.0:  # conditional and unconditional passes as one batch
            prefix = torch.cat([prefix, self.fake_prefix.expand_as(prefix).to(prefix.dtype)])
        if self.ref_proj is not None:  # both passes see the reference
            prefix = self.with_reference(prefix, None if reference is None else both(reference))
        tokens = torch.zeros(B, L, self.cfg.token_dim, device=device)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        order = torch.rand(B, L, device=device, generator=generator).argsort(dim=1)  # random generation order
        done = 0
        for step, count in enumerate(tokens_per_step(L, steps)):
            z = self.decode(self.encode(both(tokens), prefix, both(mask)), both(mask), prefix)  # (B or 2B, L, W)
            positions = order[:, done: done + count]                                   # (B, count)
            done += count
            pick = torch.zeros_like(mask).scatter_(1, positions, True)                  # (B, L)
            scale = cfg_scale_at(cfg, L - done, L)  # guidance grows as tokens are decoded
            new = self.diffloss.sample(z[both(pick)], temperature, scale, diffusion_steps, generator)
            if base is not None:
                new = residual_scale * new + base[pick]
            tokens[pick] = new.to(tokens.dtype)
            mask = mask & ~pick
            if progress is not None:
                progress(step + 1, steps)
        return tokens


# ----------------------------------------------------------------------- presets
PRESETS = {
    # CPU-trainable cascade members (DESIGN §8); the seq_len / token_dim / lr_seq_len are set
    # from the VAE the MAR is trained on. Sized for a 2-core CPU budget of under an hour: on the
    # CPU the per-token diffusion MLP costs as much as the transformer, so the diffusion batch
    # is repeated 2× rather than [ref]'s 4×, and the model is narrower and shallower
    # (4.5 M parameters) so it sees more examples in the same time.
    "tiny": MARConfig(width=192, enc_layers=3, dec_layers=3, diff_width=192, diff_batch_mul=2),
    # DESIGN §6, sizes of the reference code: 1024 wide, 16 + 16 layers, diffusion MLP 6 × 1024.
    "paper": MARConfig(seq_len=256, token_dim=64, width=1024, heads=16, enc_layers=16, dec_layers=16,
                       diff_width=1024, diff_depth=6,
                       image_encoder=ImageEncoderConfig(kind="pretrained",
                                                        clip_path="checkpoints/encoders/clip-vit-large-patch14",
                                                        dinov2_path="checkpoints/encoders/dinov2-large")),
}
