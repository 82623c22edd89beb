"""Score a recipe pilot on the validation split: image → 3D at the pipeline's defaults.

    python scripts/pilot_eval.py --work data/demo --ckpt runs/pilot --label "P1 frozen recon encoder" [--recon]

For `--shapes` validation shapes (mar3d.data.is_validation; spread over the families, or
`--pick first`; view 0, seed 0) it writes the
HR mesh, the LR preview (64³, as the app shows it) and, with --recon, the deterministic
reconstructor's mesh (its predicted HR tokens decoded at 128³) under <work>/pilots/<slug>/, scores
each against the shape turned into the view's frame (mar3d.evaluate's protocol) and prints one
json line: median / mean F@0.05, the share of shapes ≥ 0.5, the mean slab share of the meshes and
of their ground truth, and per-family medians. Rows go to <work>/pilots/<slug>.json. CI never runs this.

Pilots are chosen on the validation split only. `--split test` scores the held-out test split
(mar3d.data.is_held_out, the shapes of `python -m mar3d.evaluate`) with the same rows: it is for
a recipe already chosen, and for the checkpoint it replaces.
"""

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_demo import Recipe, eval_settings, ground_truth, real_mesh_of  # noqa: E402

from mar3d.checkpoint import load_model  # noqa: E402
from mar3d.data import is_held_out, is_validation  # noqa: E402
from mar3d.extract import ExtractionError, extract_mesh  # noqa: E402
from mar3d.metrics import compare_meshes  # noqa: E402
from mar3d.pipeline import PREVIEW_RESOLUTION, MAR3DPipeline  # noqa: E402
from mar3d.preprocess import preprocess_image  # noqa: E402


def family(name: str) -> str:
    return "real" if name.startswith("real__") else name.rsplit("_", 1)[0]


def validation_shapes(work: Path, r: Recipe, count: int, pick: str = "spread", split: str = "validation") -> list[Path]:
    """`count` validation (or test) shapes: "spread" = evenly over the name-sorted list (every
    family), "first" = the first in name order (the first pilots: families aircraft … lamp only)."""
    chosen = {"all": lambda n: True,  # a folder of shapes no model saw: stage unseen's <work>/unseen
              "test": lambda n: is_held_out(n, r.val_percent),
              "validation": lambda n: is_validation(n, r.val_percent, r.validation_percent),
              "train": lambda n: not is_held_out(n, r.val_percent + r.validation_percent)}[split]
    files = [f for f in sorted((work / "prepared").glob("*.npz")) if chosen(f.stem)]
    if pick == "first" or count >= len(files):
        return files[:count]
    return [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]


def score(mesh, gt) -> dict:
    if mesh is None:
        return {"fscore@0.05": 0.0, "failed": True}
    m = compare_meshes(mesh, gt)
    return {k: round(m[k], 4) for k in ("fscore@0.05", "fscore@0.02", "chamfer", "normal_consistency",
                                          "slab_share", "gt_slab_share")}


def summary(rows: list[dict], key: str) -> dict:
    f = [r[key]["fscore@0.05"] for r in rows]
    ok = [r[key] for r in rows if not r[key].get("failed")]
    fam, meshes = {}, {}
    for r in rows:
        fam.setdefault(family(r["shape"]), []).append(r[key]["fscore@0.05"])
        if real_mesh_of(r["shape"]):  # and per source mesh
            meshes.setdefault(real_mesh_of(r["shape"]), []).append(r[key]["fscore@0.05"])
    return {"median_f": round(statistics.median(f), 4), "mean_f": round(statistics.fmean(f), 4),
            "share_ge_0.5": round(float(np.mean([x >= 0.5 for x in f])), 3),
            "slab_share": round(statistics.fmean(m["slab_share"] for m in ok), 3) if ok else None,
            "gt_slab_share": round(statistics.fmean(m["gt_slab_share"] for m in ok), 3) if ok else None,
            "failed": len(rows) - len(ok),
            "families": {k: round(statistics.median(v), 3) for k, v in sorted(fam.items())},
            "real_meshes": {k: round(statistics.median(v), 3) for k, v in sorted(meshes.items())}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--ckpt", required=True, help="directory with vae, mar_lr, mar_hr (and recon)")
    p.add_argument("--label", required=True)
    p.add_argument("--shapes", type=int, default=48)
    p.add_argument("--pick", choices=["spread", "first"], default="spread", help="which validation shapes")
    p.add_argument("--split", choices=["validation", "test", "train", "all"], default="validation",
                   help="test: the held-out test split, for a chosen recipe only; train: shapes the "
                        "models trained on (the generalisation gap); all: every shape of --work (stage "
                        "unseen's <work>/unseen: the real meshes no stage trained on)")
    p.add_argument("--recon", action="store_true", help="also score the deterministic reconstructor (recon)")
    p.add_argument("--occ", action="store_true",
                   help="also score the direct image → occupancy model (occ: pilot O1), extracted like the HR mesh")
    p.add_argument("--occ-true-camera", action="store_true",
                   help="with --occ and a pixel-aligned model: also score it looking up at the true crop camera "
                        "(from the render's camera and mask) instead of its own estimate (row 'occ_true_camera')")
    p.add_argument("--occ-refit", type=int, default=0, metavar="N",
                   help="with --occ and a pixel-aligned model: N rounds of fitting the camera to the input mask "
                        "with the current mesh (mar3d.colour.fit_view), then re-extracting (row 'occ_refit')")
    p.add_argument("--reference", action="store_true",
                   help="also score the retrieved reference shape alone: the HR tokens of the training render with "
                        "the nearest silhouette (mar3d.retrieval, the ckpt's reference.safetensors), decoded")
    p.add_argument("--no-cascade", action="store_true", help="score only the reconstructor (and/or --occ, --reference)")
    p.add_argument("--recon-bias", type=float, default=0.0,
                   help="logit added to the reconstructor's (and --occ model's) occupancy before extraction "
                        "(> 0: a lower iso-level)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pipeline Settings overrides")
    p.add_argument("--candidates", type=int, default=1,
                   help="cascade samples per shape (seeds seed … seed+N−1); the one whose silhouette best "
                        "matches the input mask (mar3d.colour.fit_view's IoU) is scored; every candidate's "
                        "F is kept in the rows (row 'candidates'), with the oracle's pick as 'hr_best'")
    p.add_argument("--shard", default="0/1", metavar="K/N", help="score every N-th shape from the K-th (parallel runs)")
    p.add_argument("--merge", nargs="*", default=[], metavar="LABEL",
                   help="score nothing: summarise the rows the runs of these labels wrote, as --label")
    args = p.parse_args(argv)
    work, ckpt, r = Path(args.work), Path(args.ckpt), Recipe()
    slug = slugify(args.label)
    if args.merge:
        rows = [row for label in args.merge for row in json.loads((work / "pilots" / f"{slugify(label)}.json").read_text())]
        return report(work, slug, sorted(rows, key=lambda row: row["shape"]), {"label": args.label, "merged": args.merge})
    out = work / "pilots" / slug
    out.mkdir(parents=True, exist_ok=True)
    settings = eval_settings()
    for kv in args.set:
        k, v = kv.split("=", 1)
        kind = type(getattr(settings, k))
        setattr(settings, k, v.lower() in ("1", "true", "yes") if kind is bool else kind(v))
    settings.lr_mesh = True
    pipe = None if args.no_cascade else MAR3DPipeline.from_pretrained(ckpt)
    recon = load_model(ckpt, "recon") if args.recon or (args.no_cascade and not (args.occ or args.reference)) else None
    references = None
    if args.reference:
        from mar3d.retrieval import REFERENCE_FILE, ReferenceIndex

        references = pipe.references if pipe and pipe.references else \
            ReferenceIndex.load(ckpt / REFERENCE_FILE, vae=load_model(ckpt, "vae"))
        # an index that re-ranks reads the MAR-LR's image features, as the pipeline's lookup does
        lr_encoder = (pipe.mar_lr if pipe else load_model(ckpt, "mar_lr")).image_encoder.eval() \
            if references.reranks and settings.rerank else None
    occ = load_model(ckpt, "occ") if args.occ else None
    vae = pipe.vae if pipe else load_model(ckpt, "vae")
    rows, t0 = [], time.time()
    shard, shards = (int(x) for x in args.shard.split("/"))
    for npz in validation_shapes(work, r, args.shapes, args.pick, args.split)[shard::shards]:
        _, gt = ground_truth(work, npz)
        image = work / "renders" / npz.stem / "0.png"
        row = {"shape": npz.stem}
        if pipe is not None:
            tried = []  # (silhouette IoU, HR mesh, LR mesh, score of the HR mesh)
            for k in range(args.candidates):
                try:
                    res = pipe(image, settings, seed=settings.seed + k, colour=args.candidates > 1)
                    tried.append((res.view.iou if res.view else 0.0, res.mesh, res.lr_mesh, score(res.mesh, gt)))
                except ExtractionError:
                    tried.append((-1.0, None, None, score(None, gt)))
            _, hr, lr, hr_score = max(tried, key=lambda c: c[0])  # the highest silhouette IoU
            if hr is not None:
                hr.export(out / f"{npz.stem}.ply")
            row["hr"], row["lr"] = hr_score, score(lr, gt)
            if args.candidates > 1:
                row["candidates"] = [{"iou": round(c[0], 4), "fscore@0.05": c[3]["fscore@0.05"]} for c in tried]
                row["hr_best"] = max((c[3] for c in tried), key=lambda m: m["fscore@0.05"])
                row["hr_first"] = tried[0][3]
        if references is not None:
            pixels = condition_pixels(image, settings, REFERENCE_IMAGE_SIZE)
            with torch.no_grad():
                features = lr_encoder(pixels) if lr_encoder is not None else None
            _, hr, idx = references.lookup(pixels, features)
            try:
                mesh, _ = extract_mesh(vae.occupancy_fn(hr), resolution=settings.resolution)
                mesh.export(out / f"{npz.stem}.reference.ply")
            except ExtractionError:
                mesh = None
            row["reference"] = {**score(mesh, gt), "entry": int(idx[0])}
        if recon is not None:
            pixels = condition_pixels(image, settings, recon.encoder.size)
            with torch.no_grad():
                latents = recon.denormalize(recon(pixels)[1])
            try:
                fn = vae.occupancy_fn(latents)
                biased = (lambda q: fn(q) + args.recon_bias) if args.recon_bias else fn
                mesh, _ = extract_mesh(biased, resolution=settings.resolution)
                mesh.export(out / f"{npz.stem}.recon.ply")
            except ExtractionError:
                mesh = None
            row["recon"] = score(mesh, gt)
        if occ is not None:
            row["occ"] = score(occ_mesh(occ, image, settings, out / f"{npz.stem}.occ.ply", bias=args.recon_bias), gt)
            if args.occ_refit:
                mesh, cameras = occ_refit(occ, image, settings, out / f"{npz.stem}.occ_refit.ply", args.occ_refit,
                                          args.recon_bias)
                row["occ_refit"] = {**score(mesh, gt), "cameras": cameras}
            if args.occ_true_camera:
                true = true_camera(work, npz.stem, occ.encoder.size)
                row["occ_true_camera"] = {**score(occ_mesh(occ, image, settings, out / f"{npz.stem}.occ_true.ply", true,
                                                                   args.recon_bias), gt),
                                          "camera": [round(float(x), 3) for x in true]}
        rows.append(row)
    report(work, slug, rows, {
        "label": args.label, "split": args.split, "shard": args.shard, "pick": args.pick,
        "minutes": round((time.time() - t0) / 60, 1), "recon_bias": args.recon_bias, "candidates": args.candidates,
        "settings": {k: getattr(settings, k) for k in ("temperature", "cfg_lr", "cfg_hr", "cond_aug_t")}})


REFERENCE_IMAGE_SIZE = 128  # the cache's images, which the reference index was built from


def condition_pixels(image: Path, settings, size: int, with_mask: bool = False):
    """The image preprocessed as the pipeline does, (1, 3, size, size) in [0, 1] (and its object mask)."""
    from mar3d.colour import ALPHA_OBJECT

    pre = preprocess_image(image, "auto", settings.foreground_ratio, size=size)
    pixels = torch.from_numpy(np.array(pre.image)).permute(2, 0, 1)[None].float().div(255)
    return (pixels, np.asarray(pre.rgba)[..., 3] >= ALPHA_OBJECT) if with_mask else pixels


def occ_extract(occ, pixels: torch.Tensor, settings, camera=None, bias: float = 0.0):
    fn = occ.occupancy_fn(pixels, camera)
    return extract_mesh((lambda q: fn(q) + bias) if bias else fn, resolution=settings.resolution)[0]


def occ_mesh(occ, image: Path, settings, path: Path, camera=None, bias: float = 0.0):
    """The direct occupancy model's mesh of `image` (None if extraction fails), written to `path`;
    `camera` (5,) replaces a pixel-aligned model's own camera estimate."""
    try:
        mesh = occ_extract(occ, condition_pixels(image, settings, occ.encoder.size), settings, camera, bias)
    except ExtractionError:
        return None
    mesh.export(path)
    return mesh


def occ_refit(occ, image: Path, settings, path: Path, rounds: int, bias: float = 0.0):
    """The occupancy model's mesh after `rounds` of: fit the camera to the input mask with the current
    mesh, extract again looking up at it. Returns (mesh or None, the cameras tried)."""
    from mar3d.colour import fit_view
    from mar3d.projection import from_view_fit

    pixels, mask = condition_pixels(image, settings, occ.encoder.size, with_mask=True)
    camera, cameras, mesh = None, [], None
    for k in range(rounds + 1):
        if k:
            camera = torch.from_numpy(from_view_fit(fit_view(mesh, mask)))
            cameras.append([round(float(x), 3) for x in camera])
        try:
            mesh = occ_extract(occ, pixels, settings, camera, bias)
        except ExtractionError:
            mesh = None
            break
    if mesh is not None:
        mesh.export(path)
    return mesh, cameras


def true_camera(work: Path, name: str, size: int) -> torch.Tensor:
    """View 0's crop camera (mar3d.projection) from its render's camera and mask."""
    from PIL import Image

    from mar3d.projection import crop_camera
    from mar3d.render import Camera

    camera = Camera.from_dict(json.loads((work / "renders" / name / "cameras.json").read_text())[0])
    alpha = np.asarray(Image.open(work / "renders" / name / "0.png"))[..., 3]
    return torch.from_numpy(crop_camera(camera, alpha, size=size))


def slugify(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def report(work: Path, slug: str, rows: list[dict], result: dict) -> None:
    """Write the rows to <work>/pilots/<slug>.json; print and append the summary to results.jsonl."""
    (work / "pilots" / f"{slug}.json").write_text(json.dumps(rows, indent=1))
    result["shapes"] = len(rows)
    for key in ("hr", "lr", "recon", "occ", "occ_refit", "occ_true_camera", "reference", "hr_first", "hr_best"):
        if rows and key in rows[0]:
            result[key] = summary(rows, key)
    print(json.dumps(result), flush=True)
    with (work / "pilots" / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
