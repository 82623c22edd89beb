"""Image encoder: tiny ViT shapes/gradients, pretrained wiring on tiny saved models, fail-fast errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mar3d.image_encoder import (
    CLIP_MEAN, CLIP_STD, PRESETS, EncoderNotFoundError, ImageEncoder, ImageEncoderConfig,
    build_image_encoder, token_shape,
)

REPO = Path(__file__).resolve().parents[1]


# ---- tiny ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_image_encoder(ImageEncoderConfig())


def test_tiny_shapes(tiny):
    assert (tiny.num_tokens, tiny.dim) == (65, 128) == token_shape(ImageEncoderConfig())
    assert tiny.trainable
    assert tiny(torch.rand(2, 3, 128, 128)).shape == (2, 65, 128)
    assert tiny(torch.rand(2, 3, 300, 200)).shape == (2, 65, 128)  # resized inside


def test_tiny_gradients_and_determinism(tiny):
    tiny.train()
    tiny.zero_grad()
    tiny(torch.rand(2, 3, 128, 128)).pow(2).mean().backward()
    grad = tiny.vit.embeddings.patch_embeddings.projection.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny.eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(tiny(x), tiny(x))


def test_tiny_on_meta_and_presets():
    with torch.device("meta"):
        enc = ImageEncoder(ImageEncoderConfig())
    assert next(enc.parameters()).is_meta and enc.num_tokens == 65
    assert PRESETS["paper"].kind == "pretrained"
    assert token_shape(PRESETS["paper"]) == (257, 1024)  # DESIGN §5 (no files needed)


# ---- pretrained, on tiny random models saved locally ----------------------------------------
def _save_clip(path: Path, hidden=32, full=False):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14, projection_dim=16)
    torch.manual_seed(1)
    if full:  # the layout of openai/clip-vit-large-patch14: a whole CLIPModel
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=64, max_position_embeddings=16, projection_dim=16,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _save_dinov2(path: Path, hidden=32):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    model = Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     mlp_ratio=2, image_size=56, patch_size=14))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    _save_clip(root / "clip")
    _save_dinov2(root / "dino")
    return root


def _pretrained_cfg(clip, dino, size=56):
    return ImageEncoderConfig(kind="pretrained", clip_path=str(clip), dinov2_path=str(dino), pretrained_size=size)


def test_pretrained_wiring(saved):
    from transformers import CLIPVisionModel, Dinov2Model

    cfg = _pretrained_cfg(saved / "clip", saved / "dino")
    enc = build_image_encoder(cfg)
    assert (enc.num_tokens, enc.dim) == (1 + (56 // 14) ** 2, 32) == token_shape(cfg)
    assert not enc.trainable
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()  # a parent's .train() must not switch the frozen towers to training mode
    assert not enc.clip.training and not enc.dinov2.training

    x = torch.rand(2, 3, 56, 56)
    tokens = enc(x)
    assert tokens.shape == (2, 17, 32)

    clip = CLIPVisionModel.from_pretrained(saved / "clip", local_files_only=True, use_safetensors=True).eval()
    dino = Dinov2Model.from_pretrained(saved / "dino", local_files_only=True, use_safetensors=True).eval()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    imagenet = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        cls = clip(pixel_values=(x - mean) / std).last_hidden_state[:, :1]
        patches = dino(pixel_values=imagenet).last_hidden_state[:, 1:]
    torch.testing.assert_close(tokens[:, :1], cls)
    torch.testing.assert_close(tokens[:, 1:], patches)
    # a different input size is resized to pretrained_size inside
    assert enc(torch.rand(1, 3, 80, 64)).shape == (1, 17, 32)


def test_pretrained_other_size(saved):
    """pretrained_size != the checkpoints' size: CLIP and DINOv2 position tables are interpolated."""
    cfg = _pretrained_cfg(saved / "clip", saved / "dino", size=70)
    enc = build_image_encoder(cfg)
    assert enc.num_tokens == 1 + 5 * 5 == token_shape(cfg)[0]
    tokens = enc(torch.rand(2, 3, 64, 64))
    assert tokens.shape == (2, 26, 32) and torch.isfinite(tokens).all()


def test_pretrained_full_clip_model_dir(saved, tmp_path):
    """A whole CLIPModel directory (as published by OpenAI) loads its vision tower."""
    full = _save_clip(tmp_path / "clip_full", full=True)
    enc = build_image_encoder(_pretrained_cfg(tmp_path / "clip_full", saved / "dino"))
    # transformers 5's CLIPVisionModel has no .vision_model level; the checkpoint prefix is mapped
    torch.testing.assert_close(enc.clip.embeddings.patch_embedding.weight,
                               full.vision_model.embeddings.patch_embedding.weight)
    torch.testing.assert_close(enc.clip.encoder.layers[-1].mlp.fc2.weight,
                               full.vision_model.encoder.layers[-1].mlp.fc2.weight)


def test_mismatched_hidden_sizes(saved, tmp_path):
    _save_dinov2(tmp_path / "dino48", hidden=48)
    with pytest.raises(ValueError, match="hidden size"):
        ImageEncoder(_pretrained_cfg(saved / "clip", tmp_path / "dino48"))


# ---- fail fast, never download ---------------------------------------------------------------
def test_missing_path_message(tmp_path):
    missing = tmp_path / "nope" / "clip"
    with pytest.raises(EncoderNotFoundError) as err:
        ImageEncoder(_pretrained_cfg(missing, tmp_path / "dino"))
    assert str(missing) in str(err.value) and "config.json" in str(err.value)
    assert "never downloads" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_config_without_weights(saved, tmp_path):
    bare = tmp_path / "dino_bare"
    bare.mkdir()
    (bare / "config.json").write_text((saved / "dino" / "config.json").read_text())
    with pytest.raises(EncoderNotFoundError, match="no model.safetensors"):
        ImageEncoder(_pretrained_cfg(saved / "clip", bare))
    (bare / "pytorch_model.bin").write_bytes(b"")  # pickled weights are refused, with a hint
    with pytest.raises(EncoderNotFoundError, match="pickled"):
        ImageEncoder(_pretrained_cfg(saved / "clip", bare))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EncoderNotFoundError, match="shards missing"):
        ImageEncoder(_pretrained_cfg(saved / "clip", bare))


_FAST_FAIL = """
import sys, time
import torch  # the caller has torch loaded already; time our module import + the check
t0 = time.perf_counter()
from mar3d.image_encoder import ImageEncoder, ImageEncoderConfig, EncoderNotFoundError
try:
    ImageEncoder(ImageEncoderConfig(kind="pretrained", clip_path=sys.argv[1], dinov2_path=sys.argv[1]))
except EncoderNotFoundError as e:
    print(f"{time.perf_counter() - t0:.4f}", "transformers" in sys.modules, e, sep="\\n")
"""


def test_missing_path_fails_fast_without_hub(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}  # no offline flag
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    missing = str(tmp_path / "clip-vit-large-patch14")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _FAST_FAIL, missing], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    seconds, imported, message = out.stdout.strip().split("\n", 2)
    assert float(seconds) < 1.0, seconds  # import of mar3d.image_encoder + the check
    assert imported == "False"  # transformers (and so the hub client) never loaded
    assert missing in message and "config.json" in message
    assert wall < 30  # whole subprocess including python + torch start-up on a busy machine


def test_conv_stem_gives_the_patch_grid_and_learns():
    """stem="conv": 3x3 stride-2 convolutions down to the patch grid (CLS + 8x8 tokens at 128 px / 16),
    trainable end to end; a patch size that is not a power of two is refused."""
    from mar3d.image_encoder import ImageEncoder, ImageEncoderConfig

    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(kind="readout", stem="conv", width=32, layers=1, heads=2,
                                          readout_lr=4, readout_hr=8, readout_layers=1))
    images = torch.rand(2, 3, 128, 128)
    assert enc.vit(images).shape == (2, 65, 32)
    out = enc(images)
    assert out.shape == (2, 12, 32)
    out.pow(2).mean().backward()
    assert enc.vit.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power-of-two"):
        ImageEncoder(ImageEncoderConfig(kind="readout", stem="conv", image_size=120, patch_size=12))
    with pytest.raises(ValueError, match="unknown stem"):
        ImageEncoder(ImageEncoderConfig(kind="readout", stem="pixels"))
