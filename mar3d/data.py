"""Prepared shapes (the npz files of `python -m mar3d.prepare`) held in memory as tensors.

A training step then costs two gathers instead of file reads: every query point is drawn
fresh from each shape's stored pools, so long runs do not memorise a fixed query set
(DESIGN §9).
"""

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def is_held_out(name: str, val_percent: float) -> bool:
    """Fixed split by a hash of the shape's name: the same on every machine and every run.

    Only the part before "@" counts ("real__spot@03" → "real__spot"), so every variant of one
    source mesh falls on the same side; a MAR entry "<shape>/<view>" splits by its shape.
    """
    group = name.split("/")[0].split("@")[0]
    return zlib.crc32(group.encode()) % 10_000 < val_percent * 100


def is_validation(name: str, test_percent: float, val_percent: float) -> bool:
    """The validation split: the hash bucket right after the test split's (same grouping as
    is_held_out). Recipes are chosen on it; training leaves out both (is_held_out at the sum)."""
    return is_held_out(name, test_percent + val_percent) and not is_held_out(name, test_percent)


def split_files(data_dir: str | Path, val_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, held-out) npz files of a prepared directory, sorted by name."""
    files = sorted(Path(data_dir).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{data_dir}: no prepared shapes (*.npz); run `python -m mar3d.prepare` first")
    val = [f for f in files if is_held_out(f.stem, val_percent)]
    train = [f for f in files if not is_held_out(f.stem, val_percent)]
    return train, val


@dataclass
class Batch:
    surface: torch.Tensor         # (B, N, 6) FPS-ordered surface points + normals
    uniform: torch.Tensor         # (B, Qu, 3)
    uniform_labels: torch.Tensor  # (B, Qu) bool
    near: torch.Tensor            # (B, Qn, 3)
    near_labels: torch.Tensor     # (B, Qn) bool

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


class ShapeBank:
    """All shapes of one split, stacked: surface (S, N, 6), query pools (S, P, 3) + labels."""

    def __init__(self, files: list[Path], num_points: int):
        if not files:
            raise ValueError("ShapeBank needs at least one shape")
        arrays = [np.load(f) for f in files]
        self.names = [f.stem for f in files]
        pools = {k: min(a[k].shape[0] for a in arrays) for k in ("uniform_points", "near_points")}
        short = [n for n, a in zip(self.names, arrays) if a["surface"].shape[0] < num_points]
        if short:
            raise ValueError(f"{len(short)} shapes have fewer than {num_points} surface points (e.g. {short[0]})")

        def stack(key, n):
            return torch.from_numpy(np.stack([a[key][:n] for a in arrays]))

        self.surface = stack("surface", num_points).float()
        self.uniform = stack("uniform_points", pools["uniform_points"]).float()
        self.uniform_labels = stack("uniform_labels", pools["uniform_points"]).bool()
        self.near = stack("near_points", pools["near_points"]).float()
        self.near_labels = stack("near_labels", pools["near_points"]).bool()

    def __len__(self) -> int:
        return len(self.names)

    def sample(self, shapes: torch.Tensor, num_queries: int, generator: torch.Generator, yaw: bool = False) -> Batch:
        """Batch for the given shape indices: num_queries points, half uniform, half near-surface.

        yaw=True turns each shape (points, normals, queries alike) by a random angle about +Y,
        so the VAE learns shapes in every orientation a camera can put them in; the data must
        then be cylinder-normalised (mar3d.geometry.normalize_mesh) to stay inside the box."""
        n_uniform = num_queries // 2
        iu = torch.randint(self.uniform.shape[1], (len(shapes), n_uniform), generator=generator)
        inr = torch.randint(self.near.shape[1], (len(shapes), num_queries - n_uniform), generator=generator)
        s = shapes[:, None]
        surface, uniform, near = self.surface[shapes], self.uniform[s, iu], self.near[s, inr]
        if yaw:
            rot = yaw_matrices(2 * torch.pi * torch.rand(len(shapes), generator=generator))  # (B, 3, 3)
            turn = lambda p: torch.einsum("bij,bnj->bni", rot, p)  # noqa: E731
            surface = torch.cat([turn(surface[..., :3]), turn(surface[..., 3:])], dim=-1)
            uniform, near = turn(uniform), turn(near)
        return Batch(surface, uniform, self.uniform_labels[s, iu], near, self.near_labels[s, inr])


def yaw_matrices(angles: torch.Tensor) -> torch.Tensor:
    """Rotations about +Y by `angles` (B,) → (B, 3, 3)."""
    c, s, zero, one = angles.cos(), angles.sin(), torch.zeros_like(angles), torch.ones_like(angles)
    return torch.stack([c, zero, s, zero, one, zero, -s, zero, c], dim=-1).view(-1, 3, 3)
