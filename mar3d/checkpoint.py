"""Model checkpoints: `<dir>/<name>.json` (class + config) beside `<dir>/<name>.safetensors`.

Loading rebuilds the model from its own config, so command-line defaults cannot drift from
the weights. Weights are safetensors only: no pickle is ever loaded.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .mar import MAR, MARConfig
from .single_view import ImageOccupancy, OccConfig, ReconConfig, SingleViewRecon
from .vae import PyramidVAE, VAEConfig

# class name in the json → (model class, config dataclass)
MODELS: dict[str, tuple[type, type]] = {"PyramidVAE": (PyramidVAE, VAEConfig), "MAR": (MAR, MARConfig),
                                        "SingleViewRecon": (SingleViewRecon, ReconConfig),
                                        "ImageOccupancy": (ImageOccupancy, OccConfig)}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not match its model."""


def save_model(model: torch.nn.Module, directory: str | Path, name: str, metadata: dict | None = None,
               half: bool = False) -> None:
    """Write `<name>.json` and `<name>.safetensors` (atomically: temp file, then rename).

    half: store the float parameters as float16 (half the file; loading casts them back to the
    model's dtype). Buffers, such as the diffusion schedule, keep their precision."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"class": type(model).__name__, "config": dataclasses.asdict(model.cfg), "metadata": metadata or {}}
    skip = _frozen(model)
    params = {k for k, _ in model.named_parameters()} if half else set()
    tensors = {k: (v.half() if k in params and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items() if not k.startswith(skip)}
    _atomic(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic(directory / f"{name}.json", lambda p: p.write_text(json.dumps(header, indent=2)))


def read_header(directory: str | Path, name: str) -> dict:
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected the model's config json here)")
    try:
        header = json.loads(path.read_text())
        model_cls, config_cls = MODELS[header["class"]]
        header["config_obj"] = config_cls(**header["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid mar3d model config ({type(e).__name__}: {e})") from e
    header["model_cls"] = model_cls
    return header


def load_model(directory: str | Path, name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild `<name>` from its json and load its safetensors weights (strictly)."""
    header = read_header(directory, name)
    weights = Path(directory) / f"{name}.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (expected the model's weights here)")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({e})") from e
    try:
        model = header["model_cls"](header["config_obj"])
    except Exception as e:  # a config of the right fields but unusable values ("width": "wide")
        raise CheckpointError(f"{Path(directory) / f'{name}.json'}: not a valid mar3d model config "
                              f"({type(e).__name__}: {e})") from e
    expected = {k for k in model.state_dict() if not k.startswith(_frozen(model))}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match {header['class']} "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    try:
        model.load_state_dict(state, strict=False)  # key sets were checked above
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: tensor shapes do not match the config in {name}.json ({e})") from e
    return model.to(device).eval()


def _frozen(model: torch.nn.Module) -> tuple[str, ...]:
    """Prefixes of weights that load from their own files (e.g. a frozen pretrained image encoder)."""
    return model.frozen_state_prefixes() if hasattr(model, "frozen_state_prefixes") else ()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
