"""The web demo in a real browser: Debian's chromium, headless, driven by Playwright.

The app (app.py) is launched on 127.0.0.1 as tests/test_app.py does; the browser uploads a photo,
checks that its cut-out is shown before Generate, presses Generate (MAR-HR at all its steps, so it
runs long enough to watch), and while MAR-HR runs checks that the Model3D viewer's canvas draws the
LR preview (pixels other than the background colour; headless chromium draws WebGL with SwiftShader)
and that the progress label moves through the stages; then it waits for the HR mesh, downloads the
output file and loads it with trimesh. It saves a screenshot of the preview moment and of the end.

Checkpoint: $MAR3D_BROWSER_CHECKPOINT if set, else the shipped checkpoints/ when all six files are
there, else the micro cascade of tests/conftest.py. $MAR3D_BROWSER_SCREENSHOT names where the page
screenshot goes (default: the test's tmp_path). Needs `apt-get install -y chromium` and the
`playwright` package of requirements-dev.txt (its own browser download is not used); skipped,
with the reason, where either is missing.
"""

import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import trimesh
from PIL import Image

import app
from mar3d.pipeline import MAR3DPipeline
from mar3d.preprocess import DEFAULT_REMBG_MODEL
from tests.conftest import REAL_REMBG_HOME

REPO = Path(__file__).resolve().parents[1]
CHAIR = REPO / "assets" / "instantmesh_chair_wood.jpg"  # a photo without alpha (assets/README.md)
HR_STEPS = 128
CHROMIUM = os.environ.get("MAR3D_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ISNET_INSTALLED = (REAL_REMBG_HOME / f"{DEFAULT_REMBG_MODEL}.onnx").is_file()
NO_PHONING_HOME = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
TIMEOUT_S = 600  # one generation on a busy 2-core CPU, at the page's default settings

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -r requirements-dev.txt)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set MAR3D_CHROMIUM)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(request) -> Path:
    named = os.environ.get("MAR3D_BROWSER_CHECKPOINT")
    if named:
        return Path(named)
    shipped = REPO / "checkpoints"
    if all((shipped / name).is_file() for name in app.CHECKPOINT_FILES):
        return shipped
    root, _ = request.getfixturevalue("tiny_cascade")
    return root / "cascade"


@pytest.fixture(scope="module")
def app_url(checkpoint, tmp_path_factory):
    """The demo on 127.0.0.1, queued and launched by app.serve as main() does, without example images."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in NO_PHONING_HOME.items():
            mp.setenv(key, value)
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio_cache")))  # not the shared /tmp/gradio
        if ISNET_INSTALLED:  # the cut-out a user gets (scripts/fetch_isnet.py), not the suite's fallback
            mp.setenv("REMBG_HOME", str(REAL_REMBG_HOME))
        demo = app.build_demo(MAR3DPipeline.from_pretrained(checkpoint), examples_dir=None)
        app.serve(demo, concurrency=1, max_queue=8, server_name="127.0.0.1", server_port=free_port(),
                  prevent_thread_lock=True, quiet=True)
        try:
            yield demo.local_url
        finally:
            demo.close()


def drawn_pixels(png: bytes, tolerance: int = 12) -> int:
    """Pixels of a viewer screenshot that differ from the background (the most common colour along its
    border), below the label and buttons the viewer lays over the top of its canvas."""
    import io

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    values, counts = np.unique(border, axis=0, return_counts=True)
    background = values[counts.argmax()]
    below_overlays = rgb[rgb.shape[0] // 8:]
    return int(np.sum(np.abs(below_overlays - background).max(axis=-1) > tolerance))


def warm_pixels(png: bytes, margin: int = 25) -> int:
    """Pixels clearly redder than blue: neither the slate background (bluish) nor a grey mesh has
    any; the chair photo's wood colours painted on the mesh do."""
    import io

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    rgb = rgb[rgb.shape[0] // 8:]
    return int(np.sum(rgb[..., 0] - rgb[..., 2] > margin))


def block(page, label: str):
    """The Gradio block whose label is `label`."""
    return page.locator(".block").filter(has=page.get_by_text(label, exact=True)).last


def progress_text(page) -> str:
    """The progress label Gradio shows over the panels named in show_progress_on ('' when none)."""
    texts = page.locator(".progress-level-inner").all_inner_texts()
    return " ".join(t.strip() for t in texts if t.strip())


def test_generate_in_the_browser(app_url, tmp_path):
    """Upload → the cut-out is on screen before Generate; while MAR-HR runs the viewer draws the LR
    preview and the progress label moves through the stages; then the HR mesh and the download."""
    shots = Path(os.environ.get("MAR3D_BROWSER_SCREENSHOT") or tmp_path / "screenshot.png")
    preview_shot = shots.with_name(shots.stem + "_preview" + shots.suffix)
    blocked: list[str] = []

    def loopback_only(route):
        host = urlsplit(route.request.url).hostname or ""
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:  # nothing leaves the machine: fonts or anything else from outside are refused
            blocked.append(host)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("**/*", loopback_only)
            page.set_default_timeout(60_000)
            # MAR-HR at all its steps (settings ride in the URL): it then runs long enough, on any CPU,
            # for the preview to be seen before the HR mesh replaces it
            page.goto(app_url + f"?hr_steps={HR_STEPS}", wait_until="domcontentloaded")

            page.locator("input[type=file]").first.set_input_files(str(CHAIR))
            block(page, "Input image").locator("img").first.wait_for()  # the upload is shown
            # the cut-out appears without pressing Generate, at a readable size
            cutout = block(page, "Processed image (what the model sees)").locator("img").first
            cutout.wait_for(timeout=120_000)
            drawn_size = cutout.evaluate("img => Math.min(img.naturalWidth, img.clientWidth, img.clientHeight)")
            assert drawn_size >= 200, f"the cut-out is drawn {drawn_size} px wide"

            canvas = block(page, "Mesh (LR preview, then HR)").locator("canvas").first
            link = block(page, "Download").locator("a[download]").first
            t0 = time.perf_counter()
            page.get_by_role("button", name="Generate", exact=True).click()

            # while the run is on (no download link yet): progress labels, and the LR preview drawn
            labels, preview_drawn, t_preview, preview_warm = [], 0, None, 0
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline and link.count() == 0:
                text = progress_text(page)
                if text and (not labels or labels[-1] != text):
                    labels.append(text)
                if canvas.count() and t_preview is None:
                    png = canvas.screenshot()
                    drawn = drawn_pixels(png)
                    if drawn > 500 and link.count() == 0:
                        preview_drawn, t_preview = drawn, time.perf_counter() - t0
                        preview_warm = warm_pixels(png)
                        page.screenshot(path=str(preview_shot), full_page=True)
                page.wait_for_timeout(200)
            link.wait_for(timeout=60_000)
            t_final = time.perf_counter() - t0
            print(f"\nbrowser: preview drawn at {t_preview} s ({preview_drawn} px), final at {t_final:.1f} s; "
                  f"progress labels {labels}; refused hosts {sorted(set(blocked))}")
            assert t_preview is not None, f"the LR preview was never seen before the HR mesh came ({preview_shot})"
            assert any("MAR-HR" in t for t in labels), labels
            assert len({t.split()[0] for t in labels}) >= 2, f"progress never moved between stages: {labels}"

            # the HR mesh replaces the grey preview, painted with the photo's colours (wood tones)
            drawn, warm, deadline = 0, 0, time.monotonic() + 120
            while time.monotonic() < deadline:
                png = canvas.screenshot()
                drawn, warm = drawn_pixels(png), warm_pixels(png)
                if drawn > 500 and warm > 200:
                    break
                page.wait_for_timeout(500)
            page.screenshot(path=str(shots), full_page=True)
            print(f"browser: final canvas {drawn} px drawn, {warm} warm (preview: {preview_warm} warm)")
            assert drawn > 500, f"the viewer canvas shows no mesh (screenshot: {shots})"
            assert warm > 200 and preview_warm < 50, f"the HR mesh is not drawn in the photo's colours ({shots})"

            with page.expect_download() as info:
                link.click()
            path = tmp_path / info.value.suggested_filename
            info.value.save_as(path)
            mesh = trimesh.load(path, force="mesh", skip_materials=True)  # keeps COLOR_0 (mesh_io)
            assert len(mesh.faces) > 0 and np.all(np.abs(mesh.bounds) <= 1.05)
            assert mesh.visual.kind == "vertex"  # the download carries the vertex colours
            # the stats panel names the background removal that ran: ISNet wherever it is installed
            method = f"rembg:{DEFAULT_REMBG_MODEL}" if ISNET_INSTALLED else "fallback"
            assert method in block(page, "Stats").inner_text(), block(page, "Stats").inner_text()
            assert not errors, errors
        finally:
            browser.close()
