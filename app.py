"""mar3d web demo: image → 3D mesh with MAR-3D, served with Gradio.

    python app.py [--checkpoint DIR] [--device cpu|cuda] [--host 127.0.0.1] [--port 7860] [--share]
                  [--concurrency 1] [--max-queue 16]

This file only builds widgets and turns their values into pipeline arguments; everything else
is `mar3d.pipeline` (the model) and `mar3d.app_state` (one request streamed from a worker thread).
The models load in `main()`, never at import. Nothing is sent anywhere: GRADIO_ANALYTICS_ENABLED=False
and HF_HUB_DISABLE_TELEMETRY=1 are set below, before gradio is imported, and the Blocks are built with
analytics_enabled=False; only `--share` goes online (a gradio.live tunnel), on request.

API (gradio_client), endpoint "/generate": image, then the widgets in the order of
`mar3d.pipeline.Settings` (seed, background, foreground_ratio, lr_steps, hr_steps, cfg_lr, cfg_hr,
temperature, residual_scale, diffusion_steps, cond_aug_t, resolution, target_faces, colour), then export_format;
returns (processed image, GLB for the viewer, mesh file in export_format, stats dict).

Shareable settings: every widget but the image is mirrored in the page URL's query string
(?seed=3&lr_steps=8&...; names are the Settings fields, plus export_format). A small JS snippet
rewrites the URL whenever a widget changes; on page load the server reads the query back.
"""

import os

# Set before gradio and huggingface_hub are imported (huggingface_hub reads them once, at import):
# no Gradio analytics or version check, no Hub telemetry or user-agent look-ups.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import argparse
import functools
import json
import logging
import math
import numbers
import random
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr
from PIL import Image

from mar3d.app_state import stream_pipeline
from mar3d.checkpoint import CheckpointError
from mar3d.extract import ExtractionError
from mar3d.mesh_io import FORMATS, ExportError, export_mesh, mesh_stats
from mar3d.pipeline import MAR3DPipeline, Settings
from mar3d.preprocess import BACKGROUND_MODES, MAX_IMAGE_PIXELS, ImageError, warm_up_background_removal

CHECKPOINT_FILES = [f"{name}.{ext}" for name in ("vae", "mar_lr", "mar_hr") for ext in ("json", "safetensors")]
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SEED = 2**31 - 1
# Strings, not ints: Gradio documents a dropdown's API type as "string" whatever its choices are.
RESOLUTIONS = ["64", "128", "256"]
BACKGROUND_LABELS = {"auto": "auto (keep alpha, else remove)", "remove": "remove", "none": "none (keep as is)"}
# The processed image is shown at least this many pixels wide (app.enlarged).
DISPLAY_SIDE = 384
# The viewer's background (RGBA in 0..1): a mid slate. Gradio's viewer lights the mid-grey mesh
# (mar3d.mesh_io) so that it comes out pale; on Gradio's light default (and on 0.88 grey) it barely
# stood out from the white page.
VIEWER_BACKGROUND = (0.36, 0.39, 0.45, 1.0)
DOMAIN_NOTE = ("**What the shipped model knows:** procedural shapes of 15 families (chairs, tables, stools, "
               "sofas, shelves, mugs, vases and bottles, lamps, cars, aircraft, animals, beds, benches, rockets, "
               "towers), plump quadrupeds in its reference index, and a few real meshes, rendered on plain "
               "backgrounds (checkpoints/README.md). Photos of "
               "other things are outside its domain: it answers with the nearest shape it knows.")
# Gradio's cache (uploads, returned files): every 10 minutes, delete what is older than an hour.
DELETE_CACHE = (600, 3600)
# Limits, on purpose (README, "Limits and failure behaviour"): Gradio refuses bigger uploads before
# they reach the app; Pillow (opening the upload) warns above MAX_IMAGE_PIXELS and refuses twice that,
# mar3d.preprocess refuses above it with a message, and downsizes anything over 40 megapixels.
MAX_FILE_SIZE = "20mb"
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
log = logging.getLogger("mar3d.app")


class UserError(gr.Error):
    """A request refused for what the user sent: one line in the server log, no traceback."""

    def __init__(self, message: str):
        log.info("refused: %s", message)
        super().__init__(message, print_exception=False)  # Gradio prints the rest otherwise


def with_clear_image_errors(widget: gr.Image) -> gr.Image:
    """Make `widget` answer an unreadable upload with a message naming the file, not a PIL traceback.

    Wraps the instance's own preprocess rather than subclassing gr.Image: Gradio writes a .pyi
    stub beside any module that defines a component class."""
    preprocess = widget.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError as e:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise UserError(f"{name} is too large: images over {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are "
                            "refused.") from None
        except Exception as e:  # PIL.UnidentifiedImageError (an OSError), SyntaxError, ValueError...
            name = getattr(payload, "orig_name", None) or "the upload"
            raise UserError(f"{name} is not a readable image ({type(e).__name__}).") from None

    widget.preprocess = checked
    return widget


def with_checked_value(widget: gr.components.Component, name: str) -> gr.components.Component:
    """Make `widget` refuse an API value its page could never send (NaN, out of range, missing, not a
    choice) with a message naming the parameter, rather than failing deep in the pipeline."""
    preprocess = widget.preprocess
    if isinstance(widget, (gr.Radio, gr.Dropdown)):
        choices = [value for _, value in widget.choices]
        valid, expected = (lambda v: v in choices), f"one of {choices}"
    elif isinstance(widget, gr.Checkbox):
        valid, expected = (lambda v: isinstance(v, bool)), "true or false"
    else:
        lo, hi = widget.minimum, widget.maximum
        valid = lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
                           and lo <= v <= hi)
        expected = f"a number from {lo} to {hi}"

    def checked(payload):
        if not valid(payload):
            raise UserError(f"Invalid settings: {name} must be {expected}, got {payload!r}.")
        return preprocess(payload)

    widget.preprocess = checked
    return widget


# --------------------------------------------------------------------------------- generation


# What the progress bar says at each stage, and where each stage starts on the bar (a rough share of
# a default run's time on a 2-core CPU, bench/bench_app.py): the bar moves through every stage.
STAGE_LABELS = {"preprocess": "Removing background", "lr": "MAR-LR sampling", "lr_mesh": "LR preview mesh",
                "hr": "MAR-HR sampling", "hr_mesh": "HR mesh extraction", "colour": "Colouring from the picture",
                "export": "Exporting"}
STAGE_SPAN = {"preprocess": (0.0, 0.03), "lr": (0.03, 0.2), "lr_mesh": (0.2, 0.25), "hr": (0.25, 0.7),
              "hr_mesh": (0.7, 0.92), "colour": (0.92, 0.96), "export": (0.96, 1.0)}


def stage_progress(stage: str, step: int, total: int) -> tuple[float, str]:
    """(fraction of the whole run done, label) for the pipeline's progress event (stage, step, total)."""
    lo, hi = STAGE_SPAN[stage]
    label = STAGE_LABELS[stage] + (f" {step}/{total}" if stage in ("lr", "hr") else "…")
    return lo + (hi - lo) * step / max(total, 1), label


def settings_of(seed, background, foreground_ratio, lr_steps, hr_steps, cfg_lr, cfg_hr, temperature,
                residual_scale, diffusion_steps, cond_aug_t, resolution, target_faces, colour) -> Settings:
    return Settings(seed=int(seed), background=background, foreground_ratio=float(foreground_ratio),
                    lr_steps=int(lr_steps), hr_steps=int(hr_steps), cfg_lr=float(cfg_lr), cfg_hr=float(cfg_hr),
                    temperature=float(temperature), residual_scale=float(residual_scale),
                    diffusion_steps=int(diffusion_steps),
                    cond_aug_t=float(cond_aug_t), resolution=int(resolution),
                    target_faces=int(target_faces), colour=colour, lr_mesh=True)


def enlarged(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """The condition image scaled up by a whole factor to at least `side` pixels, nearest neighbour:
    readable on the page, and still the model's own pixels (each one a k×k block)."""
    k = max(1, math.ceil(side / max(image.size)))
    return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def cut_key(image, background, foreground_ratio) -> tuple:
    """What a cut-out depends on: Generate reuses the session's cut-out only when this is unchanged."""
    return str(image), background, float(foreground_ratio)


def cut_out(pipe: MAR3DPipeline, image, background, foreground_ratio):
    """At upload (and when the background mode or ratio changes): the condition image the model will
    see, shown at once, and kept in the session's state for Generate. Returns (image for the
    "Processed image" panel, state)."""
    if image is None:
        return None, None
    try:
        pre = pipe.preprocess(image, Settings(background=background, foreground_ratio=float(foreground_ratio)))
    except ImageError as e:
        raise UserError(f"Cannot use this image: {e}") from None
    except ValueError as e:
        raise UserError(f"Invalid settings: {e}") from None
    return enlarged(pre.image), {"key": cut_key(image, background, foreground_ratio), "pre": pre}


def generate(pipe: MAR3DPipeline, image, seed, background, foreground_ratio, lr_steps, hr_steps, cfg_lr, cfg_hr,
             temperature, residual_scale, diffusion_steps, cond_aug_t, resolution, target_faces, colour, export_format,
             cut=None,
             progress=gr.Progress()):
    """Widget values → pipeline call. Yields (processed image, viewer GLB, download, stats) twice:
    the LR preview as soon as it exists, then the HR mesh. `cut` is the session's cut-out (cut_out):
    reused when it was made from this image with these background settings."""
    if image is None:
        raise UserError("Upload an image first (or pick an example).")
    try:
        settings = settings_of(seed, background, foreground_ratio, lr_steps, hr_steps, cfg_lr, cfg_hr,
                               temperature, residual_scale, diffusion_steps, cond_aug_t, resolution, target_faces,
                               colour)
        settings.check()
    except ValueError as e:  # a setting out of range (API callers can send anything the widgets accept)
        raise UserError(f"Invalid settings: {e}") from None
    source = image
    if cut and cut.get("key") == cut_key(image, background, foreground_ratio):
        source = cut["pre"]
    # One folder per request; Gradio copies what we return into its own cache (cleaned by
    # DELETE_CACHE), so the folder goes as soon as the request ends.
    with tempfile.TemporaryDirectory(prefix="mar3d_app_") as folder:
        try:
            for kind, value in stream_pipeline(pipe, source, settings):
                if kind == "progress":
                    progress(*stage_progress(*value))
                elif kind == "lr_mesh" and value is not None:
                    preview = export_mesh(value, Path(folder) / "preview_lr.glb")
                    yield gr.skip(), str(preview), gr.skip(), {"status": "LR preview shown; sampling MAR-HR"}
                elif kind == "result":
                    result = value
            progress(*stage_progress("export", 0, 1))
            # the viewer always gets a GLB; the download comes in the chosen format
            name = Path(folder) / f"mar3d_seed{settings.seed}"
            viewer = export_mesh(result.mesh, name.with_suffix(".glb"))
            download = viewer
            if export_format != "glb":
                download = export_mesh(result.mesh, name.with_suffix("." + export_format))
            # a file rather than a PIL image: Gradio then tracks its cached copy, which DELETE_CACHE sweeps
            processed = Path(folder) / "processed.png"
            enlarged(result.image).save(processed)
        except ImageError as e:
            raise UserError(f"Cannot use this image: {e}") from None
        except ExtractionError as e:
            raise UserError(f"No surface to extract ({e}). Try another seed or more sampling steps.") from None
        except ExportError as e:
            log.exception("export failed")
            raise gr.Error(f"Could not write the mesh: {e}") from e
        except ValueError as e:
            raise UserError(f"Invalid settings: {e}") from None
        except Exception as e:  # a fault in the model (out of memory...): this request fails, the app serves on
            log.exception("generation failed")
            raise gr.Error(f"Generation failed ({type(e).__name__}); please try again. "
                           "The server log has the details.") from e
        yield str(processed), str(viewer), str(download), stats(result, settings)


def stats(result, settings: Settings) -> dict:
    """What the stats panel (and an API caller) gets: timings, mesh sizes, background method."""
    return {
        "seed": settings.seed,
        "background_method": result.background_method,
        "seconds": {stage: round(s, 3) for stage, s in result.seconds.items()},
        "total_seconds": round(sum(result.seconds.values()), 3),
        "hr_mesh": mesh_stats(result.mesh),
        "lr_mesh": mesh_stats(result.lr_mesh) if result.lr_mesh is not None else None,
        # the recovered input-view camera the colours were painted from (None: colour off)
        "view": None if result.view is None else {"elevation_deg": round(result.view.camera.elevation_deg, 1),
                                                  "fov_deg": round(result.view.camera.fov_deg, 1),
                                                  "silhouette_iou": round(result.view.iou, 3)},
    }


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# ------------------------------------------------------------------------ settings in the URL


# Runs in the browser on every settings change: write all settings into the page URL (no reload),
# so copying the address bar shares them. KEYS is replaced by the list of parameter names.
WRITE_URL_JS = """
(...values) => {
    const url = new URL(window.location.href);
    KEYS.forEach((key, i) => url.searchParams.set(key, values[i]));
    window.history.replaceState(null, "", url);
}
"""


def value_from_query(widget: gr.components.Component, text: str):
    """The value a query parameter stands for on `widget`, clamped to its range; gr.skip() if none."""
    if isinstance(widget, (gr.Radio, gr.Dropdown)):
        return next((value for _, value in widget.choices if str(value) == text), gr.skip())
    if isinstance(widget, gr.Checkbox):
        return {"true": True, "1": True, "false": False, "0": False}.get(text.lower(), gr.skip())
    try:
        number = float(text)
    except ValueError:
        return gr.skip()
    if not math.isfinite(number):
        return gr.skip()
    number = min(max(number, widget.minimum), widget.maximum)
    return int(round(number)) if widget.precision == 0 else number


def settings_from_query(widgets: dict[str, gr.components.Component], query: dict[str, str]) -> list:
    """Widget values from the page URL's query parameters; widgets not named there stay as they are."""
    return [value_from_query(w, query[key]) if key in query else gr.skip() for key, w in widgets.items()]


# ------------------------------------------------------------------------------------- layout


def example_images(examples_dir: str | Path | None) -> list[str]:
    folder = Path(examples_dir) if examples_dir else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)


def example_caption(path: str | Path, captions: dict) -> str:
    """The caption of an example image: <examples>/captions.json's entry, else its name made readable."""
    name = Path(path).name
    return captions.get(name) or Path(name).stem.replace("_", " ")


def read_captions(examples_dir: str | Path | None) -> dict:
    path = Path(examples_dir or ".") / "captions.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        log.warning("ignoring %s: not valid json", path)
        return {}


def build_demo(pipe: MAR3DPipeline, examples_dir: str | Path | None = None) -> gr.Blocks:
    """The page: input and background on the left, sampling controls in the middle, mesh on the right."""
    d = Settings()
    lr_len, hr_len = pipe.mar_lr.cfg.seq_len, pipe.mar_hr.cfg.seq_len  # the samplers clamp steps to these

    with gr.Blocks(title="MAR-3D", delete_cache=DELETE_CACHE, analytics_enabled=False) as demo:
        gr.Markdown("# MAR-3D: one image → a 3D mesh\nMAR-LR samples coarse shape tokens, MAR-HR refines "
                    "them; the viewer shows the LR preview first, then the HR mesh.\n\n" + DOMAIN_NOTE)
        cut = gr.State(None)  # this session's cut-out of the current upload (cut_out), reused by Generate
        with gr.Row():
            with gr.Column():
                image = with_clear_image_errors(gr.Image(label="Input image", type="filepath", image_mode=None,
                                                         sources=["upload", "clipboard"], height=300))  # None: keeps alpha
                background = gr.Radio([(BACKGROUND_LABELS[m], m) for m in BACKGROUND_MODES], value=d.background,
                                      label="Background")
                foreground_ratio = gr.Slider(0.5, 1.0, d.foreground_ratio, step=0.05, label="Foreground ratio",
                                             info="object size in the condition image")
                processed = gr.Image(label="Processed image (what the model sees)", format="png",
                                     interactive=False, height=320)
            with gr.Column():
                with gr.Row(equal_height=True):
                    seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
                    dice = gr.Button("🎲 Random seed", scale=1)
                lr_steps = gr.Slider(1, lr_len, min(d.lr_steps, lr_len), step=1, precision=0, label="MAR-LR steps")
                hr_steps = gr.Slider(1, hr_len, min(d.hr_steps, hr_len), step=1, precision=0, label="MAR-HR steps")
                resolution = gr.Dropdown(RESOLUTIONS, value=str(d.resolution), label="Marching-cubes resolution")
                colour = gr.Checkbox(d.colour, label="Colour from the picture",
                                     info="paints the mesh with the photo's colours (STL has none)")
                export_format = gr.Dropdown([(f.upper(), f) for f in FORMATS], value="glb", label="Download format")
                with gr.Accordion("Advanced", open=False):
                    cfg_lr = gr.Slider(1.0, 10.0, d.cfg_lr, step=0.1, label="CFG scale, MAR-LR", info="1 = no guidance")
                    cfg_hr = gr.Slider(1.0, 10.0, d.cfg_hr, step=0.1, label="CFG scale, MAR-HR")
                    temperature = gr.Slider(0.1, 2.0, d.temperature, step=0.05, label="Temperature")
                    residual_scale = gr.Slider(0.0, 1.0, d.residual_scale, step=0.05, label="Residual scale",
                                               info="how far the MARs move from the retrieved reference shape "
                                                    "(0 = the reference itself)")
                    diffusion_steps = gr.Slider(1, 250, d.diffusion_steps, step=1, precision=0,
                                                label="Diffusion steps (per token)")
                    cond_aug_t = gr.Slider(0.0, 1.0, d.cond_aug_t, step=0.05,
                                           label="Condition augmentation t (MAR-HR's noise on the LR tokens)")
                    target_faces = gr.Slider(0, 200_000, d.target_faces, step=1000, precision=0,
                                             label="Target face count", info="0 = keep all faces")
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                viewer = gr.Model3D(label="Mesh (LR preview, then HR)", height=420, clear_color=VIEWER_BACKGROUND)
                download = gr.File(label="Download", interactive=False)
                stats_panel = gr.JSON(label="Stats")

        examples = example_images(examples_dir)
        if examples:
            captions = read_captions(examples_dir)
            gr.Examples(examples=[[p] for p in examples], inputs=[image], cache_examples=False,
                        examples_per_page=len(examples), label="Examples (click one, then Generate)",
                        example_labels=[example_caption(p, captions) for p in examples])

        # Keys are the Settings field names (and export_format): the API's parameter names and
        # the URL's query keys.
        widgets = dict(seed=seed, background=background, foreground_ratio=foreground_ratio, lr_steps=lr_steps,
                       hr_steps=hr_steps, cfg_lr=cfg_lr, cfg_hr=cfg_hr, temperature=temperature,
                       residual_scale=residual_scale,
                       diffusion_steps=diffusion_steps, cond_aug_t=cond_aug_t, resolution=resolution,
                       target_faces=target_faces, colour=colour, export_format=export_format)
        for key, widget in widgets.items():
            with_checked_value(widget, key)

        # The cut-out is made at upload and whenever its settings change, so a user sees what the model
        # will see before pressing Generate (a bad upload is refused here, with the message).
        make_cut = functools.partial(cut_out, pipe)
        for trigger in (image.change, background.change, foreground_ratio.release):
            trigger(make_cut, inputs=[image, background, foreground_ratio], outputs=[processed, cut],
                    api_visibility="private")
        # Progress shows on the stats panel only: the viewer stays visible, so the LR
        # preview is seen while MAR-HR runs (Gradio's default would cover every output).
        run.click(functools.partial(generate, pipe), inputs=[image, *widgets.values(), cut],
                  outputs=[processed, viewer, download, stats_panel], api_name="generate",
                  show_progress_on=[stats_panel])
        dice.click(random_seed, outputs=seed, queue=False, api_visibility="private")

        # A closure, not functools.partial: Gradio finds the gr.Request parameter by its type hint,
        # which it cannot read through a partial.
        def settings_from_url(request: gr.Request):
            return settings_from_query(widgets, dict(request.query_params))

        demo.load(settings_from_url, outputs=list(widgets.values()), api_visibility="private")
        gr.on([w.change for w in widgets.values()], fn=None, inputs=list(widgets.values()),
              js=WRITE_URL_JS.replace("KEYS", json.dumps(list(widgets))))
    return demo


# --------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="mar3d image-to-3D demo (Gradio)")
    p.add_argument("--checkpoint", default=str(Path(__file__).parent / "checkpoints"),
                   help="directory with vae / mar_lr / mar_hr (.json + .safetensors each)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (goes online)")
    p.add_argument("--concurrency", type=int, default=1, help="generations running at once")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more are refused")
    p.add_argument("--examples", default=str(Path(__file__).parent / "assets"), help="folder of example images")
    args = p.parse_args(argv)
    # the server log: one line per refused request (UserError), a traceback per fault
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # a line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    missing = [n for n in CHECKPOINT_FILES if not (Path(args.checkpoint) / n).is_file()]
    if missing:
        print(f"mar3d: no usable checkpoint in {args.checkpoint} (missing: {', '.join(missing)}).\n"
              "Train one (README: python -m mar3d.train ...) or pass --checkpoint DIR.", file=sys.stderr)
        return 1
    try:
        pipe = MAR3DPipeline.from_pretrained(args.checkpoint, args.device)
    except CheckpointError as e:
        print(f"mar3d: {e}", file=sys.stderr)
        return 1

    # rembg's import takes ~30 s: paid at start-up, in the background (a request meanwhile waits for it)
    threading.Thread(target=lambda: print(f"mar3d: background removal: {warm_up_background_removal()}",
                                          file=sys.stderr), name="rembg-warm-up", daemon=True).start()
    demo = build_demo(pipe, args.examples)
    serve(demo, args.concurrency, args.max_queue, server_name=args.host, server_port=args.port, share=args.share)
    return 0


def serve(demo: gr.Blocks, concurrency: int = 1, max_queue: int = 16, **launch) -> gr.Blocks:
    """Queue and launch with the demo's limits: `concurrency` generations at once, `max_queue` waiting
    (more are answered "queue is full"), uploads up to MAX_FILE_SIZE."""
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.launch(max_file_size=MAX_FILE_SIZE, **launch)
    return demo


if __name__ == "__main__":
    sys.exit(main())
