"""Benchmark: the web demo end to end at its default settings — seconds from upload to the cut-out,
seconds to the LR preview, seconds to the final mesh, peak RSS.

    python bench/bench_app.py [--checkpoint checkpoints] [--image PHOTO] [--repeats 3] [--threads N]

Runs the app's own request handler, `app.generate` (MAR3DPipeline in a worker thread through
mar3d.app_state.stream_pipeline, its on_lr_mesh callback, the GLB exports of the preview and of
the final mesh), on the pipeline object `app.main()` loads, with the values the page's widgets
start with. What it leaves out is the browser and HTTP: Gradio's queue, the upload, the file
copies into Gradio's cache and the download (tens of milliseconds on loopback).
  - cut-out s: `app.cut_out` on a 1-megapixel copy of the photo, what the page runs at upload
    (background removal with the method the stats name; rembg's import and session are warmed up
    first, as the app does at start-up, and timed apart);
  - preview s: from Generate (`app.generate`, reusing the cut-out as the page does) until the app yields the LR preview GLB (what the viewer shows first);
  - final s: from the call until it yields the HR mesh (viewer GLB + download file);
  - peak RSS: the process's high-water mark (getrusage), gradio and the models included.
Goals (the demo issues; a 2-core CPU): cut-out <= 3 s, preview <= 3 s, final <= 10 s, RSS <= 3 GiB.
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

import torch  # noqa: E402

import app  # noqa: E402  (sets the no-analytics environment before gradio is imported)
from mar3d.pipeline import MAR3DPipeline, Settings  # noqa: E402

GOALS = {"cutout_s": 3.0, "preview_s": 3.0, "final_s": 10.0, "rss_gib": 3.0}
DEFAULT_IMAGE = REPO / "assets" / "instantmesh_chair_wood.jpg"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def page_defaults(pipe: MAR3DPipeline) -> dict:
    """The values build_demo gives the widgets (the step sliders are clamped to the token counts)."""
    d = Settings()
    return dict(seed=d.seed, background=d.background, foreground_ratio=d.foreground_ratio,
                lr_steps=min(d.lr_steps, pipe.mar_lr.cfg.seq_len), hr_steps=min(d.hr_steps, pipe.mar_hr.cfg.seq_len),
                cfg_lr=d.cfg_lr, cfg_hr=d.cfg_hr, temperature=d.temperature, residual_scale=d.residual_scale,
                diffusion_steps=d.diffusion_steps,
                cond_aug_t=d.cond_aug_t, resolution=str(d.resolution), target_faces=d.target_faces, colour=d.colour,
                export_format="glb")


def megapixel_copy(image: str, folder: Path) -> str:
    """The photo resized to about 1,000,000 pixels (a phone photo after the browser's upload)."""
    from PIL import Image

    im = Image.open(image).convert("RGB")
    k = (1e6 / (im.width * im.height)) ** 0.5
    path = folder / "photo_1mp.jpg"
    im.resize((round(im.width * k), round(im.height * k)), Image.LANCZOS).save(path, quality=92)
    return str(path)


def one_request(pipe: MAR3DPipeline, image: str, widgets: dict) -> dict:
    t0 = time.perf_counter()
    _, cut = app.cut_out(pipe, image, widgets["background"], widgets["foreground_ratio"])
    cutout = time.perf_counter() - t0
    t0 = time.perf_counter()
    preview = None
    for outputs in app.generate(pipe, image, **widgets, cut=cut, progress=lambda *a, **k: None):
        if isinstance(outputs[-1], dict) and "hr_mesh" in outputs[-1]:
            final, stats = time.perf_counter() - t0, outputs[-1]
        else:
            preview = time.perf_counter() - t0
    return {"cutout_s": cutout, "preview_s": preview, "final_s": final, "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints", help="directory with vae / mar_lr / mar_hr")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--repeats", type=int, default=3, help="requests timed, one after the other")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    pipe = MAR3DPipeline.from_pretrained(args.checkpoint, args.device)
    load_s = time.perf_counter() - t
    rss_loaded = peak_rss_gib()
    widgets = page_defaults(pipe)
    t = time.perf_counter()
    warm_up = getattr(app, "warm_up_background_removal", None)
    method = warm_up() if warm_up else "not warmed"
    warm_s = time.perf_counter() - t
    folder = Path(tempfile.mkdtemp(prefix="bench_app_"))
    image = megapixel_copy(args.image, folder)
    runs = [one_request(pipe, image, widgets) for _ in range(args.repeats)]
    rss = peak_rss_gib()

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.machine()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; device {args.device}; load average before/after "
          f"{load_before:.1f}/{os.getloadavg()[0]:.1f} (other jobs on the machine)")
    print(f"checkpoint: {args.checkpoint} (loaded in {load_s:.1f} s); image: {args.image}, resized to 1 megapixel")
    print(f"background removal warmed up at start-up in {warm_s:.1f} s: {method}; "
          f"method that ran: {runs[0]['stats']['background_method']}")
    print("settings (the page's defaults): " + ", ".join(f"{k}={v}" for k, v in widgets.items()))
    print("path: app.generate -> stream_pipeline -> MAR3DPipeline (on_lr_mesh preview), GLB export; no HTTP\n")
    print("| run | cut-out s | preview s | final s | preprocess | MAR-LR | LR mesh | MAR-HR | HR mesh | colour | HR faces |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        s = r["stats"]["seconds"]
        preview = f"{r['preview_s']:.2f}" if r["preview_s"] is not None else "none (empty LR mesh)"
        print(f"| {i} | {r['cutout_s']:.2f} | {preview} | {r['final_s']:.2f} | {s['preprocess']:.2f} | {s['mar_lr']:.2f} | "
              f"{s.get('lr_mesh', 0):.2f} | {s['mar_hr']:.2f} | {s['hr_mesh']:.2f} | {s.get('colour', 0):.2f} | "
              f"{r['stats']['hr_mesh']['n_faces']:,} |")
    previews = [r["preview_s"] for r in runs if r["preview_s"] is not None]
    summary = {"cutout_s": statistics.median(r["cutout_s"] for r in runs), "preview_s": statistics.median(previews) if previews else None,
               "final_s": statistics.median(r["final_s"] for r in runs), "rss_gib": rss}
    print(f"\npeak RSS {rss:.2f} GiB (after loading the models: {rss_loaded:.2f} GiB)")
    print("goals, medians of the runs: " + "; ".join(
        f"{k} {'n/a' if v is None else f'{v:.2f}'} vs <= {GOALS[k]} "
        f"{'n/a' if v is None else ('met' if v <= GOALS[k] else 'NOT met')}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
