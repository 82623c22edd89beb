"""The shipped demo checkpoint (checkpoints/) on held-out renders it never saw in training.

tests/data/heldout/ holds, for a few held-out shapes of the demo run (scripts/train_demo.py,
hash split), the render of view 0 and the ground-truth mesh turned into that view's frame.
"""

from pathlib import Path

import numpy as np
import pytest

from mar3d.geometry import load_mesh
from mar3d.metrics import compare_meshes
from mar3d.pipeline import MAR3DPipeline, Settings

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "tests" / "data" / "heldout"


@pytest.fixture(scope="module")
def pipe():
    if not (ROOT / "checkpoints" / "mar_hr.safetensors").exists():
        pytest.skip("no shipped checkpoint in checkpoints/")
    return MAR3DPipeline.from_pretrained(ROOT / "checkpoints")


def test_checkpoint_is_small_and_safetensors_only():
    files = [p for p in (ROOT / "checkpoints").iterdir() if p.is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        pytest.skip("no shipped checkpoint in checkpoints/")
    assert sum(p.stat().st_size for p in files) <= 60 * 2**20
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl")]


@pytest.mark.slow
def test_each_output_matches_its_own_image(pipe):
    """Each generated mesh is closer (Chamfer) to the shape in its own picture than to the other
    shapes: the model follows its condition, it does not output one average shape."""
    names = sorted(p.stem for p in HELD_OUT.glob("*.png"))
    assert len(names) >= 3
    settings = Settings(seed=0, lr_mesh=False, resolution=64)
    outputs = [pipe(HELD_OUT / f"{n}.png", settings).mesh for n in names]
    truths = [load_mesh(HELD_OUT / f"{n}.ply") for n in names]
    cd = np.array([[compare_meshes(out, gt, n_points=20_000)["chamfer"] for gt in truths] for out in outputs])
    for i, name in enumerate(names):
        others = np.delete(cd[i], i)
        assert cd[i, i] < others.min(), f"{name}: own shape {cd[i, i]:.3f}, others {np.round(others, 3)}"
