"""Shared fixtures: paths to the shared real data, and a small synthetic prepared dataset."""

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_mesh(name: str) -> Path:
    path = SHARED / "meshes" / name
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def write_synthetic_shape(path: Path, rng: np.random.Generator, n_surface=1024, n_pool=4096) -> None:
    """A sphere or an axis-aligned box in the prepared-npz schema (exact labels, random order)."""
    centre = rng.uniform(-0.3, 0.3, 3)
    if rng.random() < 0.5:
        r = rng.uniform(0.3, 0.6)
        normals = rng.normal(size=(n_surface, 3))
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        surface = centre + r * normals
        inside = lambda p: np.linalg.norm(p - centre, axis=1) < r
    else:
        half = rng.uniform(0.2, 0.6, 3)
        axis = rng.integers(0, 3, n_surface)
        sign = rng.choice([-1.0, 1.0], n_surface)
        local = rng.uniform(-1, 1, (n_surface, 3)) * half
        local[np.arange(n_surface), axis] = sign * half[axis]
        surface = centre + local
        normals = np.zeros((n_surface, 3))
        normals[np.arange(n_surface), axis] = sign
        inside = lambda p: np.all(np.abs(p - centre) < half, axis=1)
    uniform = rng.uniform(-1.05, 1.05, (n_pool, 3))
    near = surface[rng.integers(0, n_surface, n_pool)] + rng.normal(scale=0.03, size=(n_pool, 3))
    np.savez_compressed(
        path,
        surface=np.concatenate([surface, normals], 1).astype(np.float32),
        uniform_points=uniform.astype(np.float32), uniform_labels=inside(uniform),
        near_points=near.astype(np.float32), near_labels=inside(near),
    )


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    for i in range(24):
        write_synthetic_shape(root / f"shape_{i:03d}.npz", rng)
    return root
