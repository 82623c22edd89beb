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
def test_outputs_follow_their_own_image(pipe):
    """The shipped checkpoint beats the same model with shuffled conditions: the meshes generated
    from each held-out render are closer (Chamfer) to that render's shape than the meshes generated
    from the other renders are. A model that ignores its image scores a ratio of about 1 here.

    Averaged over two seeds, because one sample is noisy. Measured on the shipped checkpoint: own
    0.174, shuffled 0.293, ratio 0.59. The stronger property, that every single output is nearest
    its own shape, is not asserted: it holds for these two seeds averaged, but at seeds 2 and 3 the
    chair's mesh lies nearer the mug (checkpoints/README.md)."""
    names = sorted(p.stem for p in HELD_OUT.glob("*.png"))
    assert len(names) >= 3
    truths = [load_mesh(HELD_OUT / f"{n}.ply") for n in names]
    cd = np.zeros((len(names), len(names)))  # [output of image i, shape j]
    for seed in (0, 1):
        settings = Settings(seed=seed, lr_mesh=False, resolution=64)
        outputs = [pipe(HELD_OUT / f"{n}.png", settings).mesh for n in names]
        cd += [[compare_meshes(out, gt, n_points=20_000)["chamfer"] for gt in truths] for out in outputs]
    cd /= 2
    own, shuffled = cd.diagonal().mean(), cd[~np.eye(len(names), dtype=bool)].mean()
    print(f"{names}\nChamfer [output, shape]:\n{np.round(cd, 3)}\nown {own:.3f}, shuffled {shuffled:.3f}")
    assert own < 0.85 * shuffled, f"own-condition Chamfer {own:.3f} vs shuffled {shuffled:.3f}"
