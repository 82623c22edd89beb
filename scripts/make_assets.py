"""Example images, test fixtures and the model card's sample figure, from a finished demo run.

    python scripts/make_assets.py --work data/demo --ckpt checkpoints

Writes
  assets/heldout_<shape>.png         view 0 of held-out shapes (the app's example gallery)
  assets/<shared image>              a few of ../shared/data/images (attribution in assets/README.md)
  tests/data/heldout/<shape>.png/.ply  render + ground truth in the view's frame (checkpoint test)
  docs/samples.png                   input | LR mesh | HR mesh | ground truth, one row per example
Shapes are picked by a fixed rule (the first held-out shape of each listed family), not by score.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from mar3d.data import is_held_out  # noqa: E402
from mar3d.pipeline import MAR3DPipeline, Settings  # noqa: E402
from mar3d.render import Camera, render  # noqa: E402
from train_demo import Recipe, ground_truth  # noqa: E402

GALLERY_FAMILIES = ("chair", "table", "mug", "aircraft", "car", "lamp", "vase_bottle", "sofa")
TEST_FAMILIES = ("chair", "mug", "aircraft")
SHARED_IMAGES = ("triposr_chair.png", "instantmesh_chair_wood.jpg", "gso_render_alarm.png")
SHARED = ROOT.parent / "shared" / "data" / "images"
TILE = 160


def first_held_out(work: Path, family: str, val_percent: float) -> str:
    names = sorted(p.stem for p in (work / "prepared").glob(f"{family}_*.npz"))
    return next(n for n in names if is_held_out(n, val_percent))


def mesh_tile(mesh, camera: Camera | None) -> Image.Image:
    """Grey render of a mesh from the input's elevation, azimuth 0 (the view frame), on white."""
    if mesh is None:
        return Image.new("RGB", (TILE, TILE), "white")
    cam = Camera(0.0, camera.elevation_deg if camera else 15.0, camera.distance if camera else 4.0,
                 camera.fov_deg if camera else 40.0, TILE)
    rgba = render(mesh, cam, color=(0.75, 0.75, 0.78), light_dir=(0.4, 0.6, 0.7), ambient=0.3, specular=0.1)
    return composite(Image.fromarray(rgba))


def composite(image: Image.Image) -> Image.Image:
    image = image.convert("RGBA").resize((TILE, TILE))
    out = Image.new("RGBA", image.size, "white")
    return Image.alpha_composite(out, image).convert("RGB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--ckpt", default=ROOT / "checkpoints", type=Path)
    args = p.parse_args()
    val = Recipe().val_percent
    (ROOT / "assets").mkdir(exist_ok=True)
    (ROOT / "tests" / "data" / "heldout").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs").mkdir(exist_ok=True)

    gallery = [first_held_out(args.work, f, val) for f in GALLERY_FAMILIES]
    for name in gallery:
        shutil.copy(args.work / "renders" / name / "0.png", ROOT / "assets" / f"heldout_{name}.png")
    for name in SHARED_IMAGES:
        shutil.copy(SHARED / name, ROOT / "assets" / name)
    for family in TEST_FAMILIES:
        name = first_held_out(args.work, family, val)
        shutil.copy(args.work / "renders" / name / "0.png", ROOT / "tests" / "data" / "heldout" / f"{name}.png")
        ground_truth(args.work, args.work / "prepared" / f"{name}.npz")[1].export(
            ROOT / "tests" / "data" / "heldout" / f"{name}.ply")

    pipe = MAR3DPipeline.from_pretrained(args.ckpt)
    rows = [(n, args.work / "renders" / n / "0.png") for n in gallery] + [(n, SHARED / n) for n in SHARED_IMAGES[:2]]
    header = ["input", "MAR-LR mesh", "MAR-HR mesh", "ground truth"]
    sheet = Image.new("RGB", (4 * TILE, 20 + len(rows) * TILE), "white")
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(header):
        draw.text((k * TILE + 8, 4), text, fill="black")
    for r, (name, image) in enumerate(rows):
        result = pipe(image, Settings(seed=0))
        camera, gt = None, None
        if not str(image).startswith(str(SHARED)):
            cams = json.loads((args.work / "renders" / name / "cameras.json").read_text())
            camera = Camera.from_dict(cams[0])
            gt = ground_truth(args.work, args.work / "prepared" / f"{name}.npz")[1]
        tiles = [composite(Image.open(image)), mesh_tile(result.lr_mesh, camera), mesh_tile(result.mesh, camera),
                 mesh_tile(gt, camera)]
        for k, tile in enumerate(tiles):
            sheet.paste(tile, (k * TILE, 20 + r * TILE))
        print(name, {k: round(v, 2) for k, v in result.seconds.items()}, flush=True)
    sheet.save(ROOT / "docs" / "samples.png")


if __name__ == "__main__":
    main()
