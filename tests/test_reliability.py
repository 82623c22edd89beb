"""Reliability and security of the demo: bad input through the app's API and the CLI, checkpoints,
load, faults and network, each with a clear message and the server still serving.

The app tests run the demo on loopback with app.serve (the limits of `python app.py`) on the micro
cascade of tests/conftest.py, behind `Switchboard`: the real pipeline, which also records the order
requests start in and can hold them at a gate or make one fail midway.
"""

import inspect
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import huggingface_hub
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import app
from mar3d import generate as generate_cli
from mar3d.checkpoint import CheckpointError
from mar3d.pipeline import MAR3DPipeline, Settings
from mar3d.preprocess import MAX_IMAGE_PIXELS, ImageError, preprocess_image
from tests.conftest import data_image

CHAIR = data_image("instantmesh_chair_wood.jpg")
FLAMINGO = data_image("triposr_flamingo.png")
FAST = dict(lr_steps=4, hr_steps=8, diffusion_steps=25, resolution="64")
NO_PHONING_HOME = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
# The /generate parameters after the image, in order, with the FAST settings.
# the API's parameters in order: every Settings field the page has a control for, then the format
# (the Settings fields the page has widgets for: app.settings_of's parameters, in its order)
PARAMS = {**{k: getattr(Settings(), k) for k in inspect.signature(app.settings_of).parameters}, **FAST,
          "export_format": "glb"}
PARAMS["resolution"] = str(PARAMS["resolution"])


# ------------------------------------------------------------------------------ network guard

# While this list exists, every host looked up or connected to is recorded, and any that is not
# loopback is refused (the audit hook raises, so the connection never happens).
HOSTS: list[str] | None = None


def is_local(host: str) -> bool:
    import ipaddress

    if host.startswith("/") or host in ("localhost", "", "None"):  # unix sockets, local names
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard_sockets(event, args):
    if HOSTS is not None and event in ("socket.getaddrinfo", "socket.connect"):
        address = args[0] if event == "socket.getaddrinfo" else args[1]
        host = str(address[0] if isinstance(address, tuple) else address)
        HOSTS.append(host)
        if not is_local(host):
            raise OSError(f"test guard: outbound connection to {host} refused")


sys.addaudithook(_guard_sockets)  # cannot be removed: it acts only while HOSTS is a list


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cascade(request) -> Path:
    """The micro cascade's checkpoint directory. MAR3D_TEST_CASCADE may name one already built
    (tiny_cascade's root/cascade) to skip its CPU-minute training while working on these tests."""
    if os.environ.get("MAR3D_TEST_CASCADE"):
        return Path(os.environ["MAR3D_TEST_CASCADE"])
    root, _ = request.getfixturevalue("tiny_cascade")
    return root / "cascade"


class Switchboard:
    """The real pipeline (what build_demo and generate use of it), recording the seed of each
    request as it starts; requests wait at `gate` while it is clear; the request with seed
    `fail_seed` raises midway through MAR-HR."""

    def __init__(self, pipe: MAR3DPipeline):
        self.pipe, self.mar_lr, self.mar_hr = pipe, pipe.mar_lr, pipe.mar_hr
        self.started: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_seed: int | None = None

    def __call__(self, image, settings, progress=None, **kwargs):
        self.started.append(settings.seed)
        assert self.gate.wait(timeout=600)

        def report(stage, step, total):
            if settings.seed == self.fail_seed and stage == "hr" and step == 2:
                raise RuntimeError("simulated fault in MAR-HR")
            progress(stage, step, total)

        return self.pipe(image, settings, progress=report, **kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(pipe, tmp_path_factory, max_queue=16):
    """The demo as `python app.py` serves it (app.serve), on loopback, and a client for it."""
    demo = app.serve(app.build_demo(pipe), concurrency=1, max_queue=max_queue, server_name="127.0.0.1",
                     server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, new_client(demo, tmp_path_factory)


def new_client(demo, tmp_path_factory) -> Client:
    return Client(demo.local_url, analytics_enabled=False, verbose=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def served(cascade, tmp_path_factory):
    """The demo (concurrency 1, queue 16, as in main()) on 127.0.0.1, with the network guard on from
    before it is built; Gradio's cache and the temp directory are this fixture's own, to count files."""
    global HOSTS
    with pytest.MonkeyPatch.context() as mp:
        for key, value in NO_PHONING_HOME.items():
            mp.setenv(key, value)
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        cache, tmp = tmp_path_factory.mktemp("gradio_cache"), tmp_path_factory.mktemp("tmp")
        mp.setenv("GRADIO_TEMP_DIR", str(cache))
        mp.setattr(tempfile, "tempdir", str(tmp))  # where generate's per-request folders go
        HOSTS = []
        pipe = Switchboard(MAR3DPipeline.from_pretrained(cascade))
        demo, client = launch(pipe, tmp_path_factory)
        try:
            yield SimpleNamespace(demo=demo, client=client, pipe=pipe, cache=cache, tmp=tmp,
                                  hosts=HOSTS, url=demo.local_url)
        finally:
            client.close()
            demo.close()
            HOSTS = None


def generate(client, image, **settings):
    """One /generate call with the FAST settings; returns its final outputs."""
    image = handle_file(str(image)) if image is not None else None
    return client.submit(image, **{**FAST, **settings}, api_name="/generate").result(timeout=600)


def assert_serves(served, seed=1):
    """The app still answers a good request with a mesh."""
    _, _, _, stats = generate(served.client, CHAIR, seed=seed)
    assert stats["hr_mesh"]["n_faces"] > 0


# -------------------------------------------------------------------------------- bad inputs


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width×height gray pixels, then a few rows of data:
    what a decompression bomb looks like before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def write_bad_inputs(folder: Path) -> dict[str, tuple[Path, str | None, str | None]]:
    """name → (file, error expected from the app or None, error expected from the CLI or None).
    None: the image is usable and gives a mesh."""
    folder.mkdir(parents=True, exist_ok=True)
    chair = Image.open(CHAIR).convert("RGB")
    chair.thumbnail((256, 256))
    files = {}

    def add(name, app_error, cli_error):
        files[name.split(".")[0]] = (folder / name, app_error, cli_error)
        return folder / name

    add("not_an_image.png", "not_an_image.png is not a readable image",
        "is not an image Pillow can read").write_text("hello, I am text")
    data = FLAMINGO.read_bytes()
    add("truncated.png", "Cannot use this image: .*truncated.png could not be decoded \\(truncated or corrupt",
        "could not be decoded \\(truncated or corrupt").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1), "red").save(add("one_pixel.png", "Cannot use this image: no object found",
                                             "no object found"))
    Image.new("RGBA", (64, 48), (255, 0, 0, 0)).save(
        add("transparent.png", "Cannot use this image: no object found: the image is fully transparent",
            "fully transparent"))
    # a decompression bomb (900 megapixels claimed), and a header just over the accepted size
    add("bomb.png", "bomb.png is too large", "too large").write_bytes(png_header_only(30_000, 30_000))
    add("over_limit.png", "Cannot use this image: .*too large: 12000×12000 pixels",
        "too large: 12000×12000 pixels").write_bytes(png_header_only(12_000, 12_000))
    # usable: every mode, 16-bit, CMYK, an animated GIF (first frame), 10,000×10,000
    chair.convert("L").save(add("gray.png", None, None))
    chair.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(add("palette.png", None, None))
    Image.fromarray((np.asarray(chair.convert("L")).astype(np.uint16) * 257)).save(add("gray16.png", None, None))
    chair.convert("CMYK").save(add("cmyk.jpg", None, None))
    other = Image.open(FLAMINGO).convert("RGB").resize(chair.size)
    chair.save(add("animated.gif", None, None), save_all=True, append_images=[other], duration=100, loop=0)
    huge = Image.new("L", (10_000, 10_000), 255)
    huge.paste(0, (3000, 2000, 7000, 8000))
    huge.save(add("huge.png", None, None), compress_level=1)
    return files


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return write_bad_inputs(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.slow
def test_bad_uploads_through_the_api(served, bad_inputs):
    for name, (path, app_error, _) in bad_inputs.items():
        if app_error is not None:
            with pytest.raises(AppError, match=app_error):
                generate(served.client, path)
        else:
            processed, glb, _, stats = generate(served.client, path, seed=3)
            assert stats["hr_mesh"]["n_faces"] > 0 and Image.open(processed).size == (384, 384), name  # 32² enlarged ×12 (app.enlarged)
            if name == "animated":  # the first frame is the picture
                first = preprocess_image(Image.open(path).convert("RGB"), size=32).image
                shown = np.asarray(Image.open(processed).convert("RGB"))[::12, ::12]  # its pixels, enlarged ×12
                assert np.array_equal(shown, np.asarray(first))
            if name == "huge":  # downsized, the object found where it is
                assert stats["background_method"] == "fallback"
    with pytest.raises(AppError, match="Upload an image first"):
        generate(served.client, None)
    assert_serves(served)


@pytest.mark.slow
def test_upload_over_the_size_limit(served, tmp_path):
    big = tmp_path / "big_photo.png"
    limit = 20 * 1024 * 1024
    assert app.MAX_FILE_SIZE == "20mb"
    big.write_bytes(Image.new("RGB", (8, 8)).tobytes() + os.urandom(limit + 1024))
    # gradio_client reads the server's limit and does not even send the file
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {limit} bytes"):
        generate(served.client, big)
    # sent anyway, the server refuses it while it arrives
    with httpx.Client(timeout=300) as h:
        r = h.post(f"{served.url}gradio_api/upload", files=[("files", ("big_photo.png", big.read_bytes()))])
    assert r.status_code == 413 and f"maximum allowed size of {limit} bytes" in r.text, (r.status_code, r.text)
    assert_serves(served)


def raw_generate(url: str, body: str) -> tuple[str, str]:
    """POST a hand-written JSON body to /generate (what no client library would send: NaN...) and
    return (last event, its data) of the answer."""
    with httpx.Client(timeout=600) as h:
        r = h.post(f"{url}gradio_api/call/generate", content=body, headers={"Content-Type": "application/json"})
        r.raise_for_status()
        text = h.get(f"{url}gradio_api/call/generate/{r.json()['event_id']}").text
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    last = events[-1]
    return last[0].removeprefix("event: "), last[1].removeprefix("data: ")


@pytest.mark.slow
def test_bad_numbers_straight_to_the_api(served):
    with httpx.Client() as h:
        uploaded = h.post(f"{served.url}gradio_api/upload", files=[("files", ("chair.jpg", CHAIR.read_bytes()))])
    image = {"path": uploaded.json()[0], "orig_name": "chair.jpg", "meta": {"_type": "gradio.FileData"}}
    cases = [("cfg_lr", math.nan), ("temperature", math.inf), ("foreground_ratio", math.nan),
             ("cond_aug_t", -0.5), ("residual_scale", 2.0), ("seed", -1), ("seed", None), ("lr_steps", 10**9),
             ("hr_steps", 0),
             ("diffusion_steps", "many"), ("target_faces", [1]), ("resolution", "65"), ("resolution", 64),
             ("background", "magic"), ("export_format", "exe")]
    for name, value in cases:
        body = json.dumps({"data": [image, *{**PARAMS, name: value}.values()]})  # allow_nan: NaN, Infinity
        event, data = raw_generate(served.url, body)
        assert event == "error", (name, value, event, data)
        assert f"Invalid settings: {name} must be" in data, (name, value, data)
    event, data = raw_generate(served.url, json.dumps({"data": [image, *PARAMS.values()]}))
    assert event == "complete", data
    # the same through gradio_client: a clear message naming the parameter
    with pytest.raises(AppError, match="Invalid settings: lr_steps must be a number from 1 to"):
        generate(served.client, CHAIR, lr_steps=99)
    assert_serves(served)


# ------------------------------------------------------------------------------ faults, load


@pytest.mark.slow
def test_a_fault_midway_leaves_the_app_serving(served):
    served.pipe.fail_seed = 666
    try:
        with pytest.raises(AppError, match=r"Generation failed \(RuntimeError\); please try again"):
            generate(served.client, CHAIR, seed=666)
    finally:
        served.pipe.fail_seed = None
    assert served.pipe.started[-1] == 666
    assert_serves(served, seed=2)


def wait_until_queued(job, timeout=120):
    """Until the server has the job (in its queue or running)."""
    deadline = time.time() + timeout
    while job.status().code in (Status.STARTING, Status.JOINING_QUEUE):
        assert time.time() < deadline, "the job never reached the queue"
        time.sleep(0.05)


@pytest.mark.slow
def test_eight_concurrent_clients_complete_in_queue_order(served, tmp_path_factory):
    clients = [new_client(served.demo, tmp_path_factory) for _ in range(8)]
    seeds = list(range(100, 108))
    served.pipe.gate.clear()  # the first request holds the worker: the other seven queue behind it
    try:
        jobs = []
        for c, seed in zip(clients, seeds):
            jobs.append(c.submit(handle_file(str(CHAIR)), seed=seed, **FAST, api_name="/generate"))
            wait_until_queued(jobs[-1])
        ranks = [job.status().rank for job in jobs[1:]]
        served.pipe.gate.set()
        results = [job.result(timeout=600) for job in jobs]
    finally:
        served.pipe.gate.set()
        for c in clients:
            c.close()
    assert [stats["seed"] for *_, stats in results] == seeds
    assert all(stats["hr_mesh"]["n_faces"] > 0 for *_, stats in results)
    assert served.pipe.started[-8:] == seeds  # served in the order they were queued
    print("queue ranks while waiting:", ranks)


@pytest.mark.slow
def test_a_full_queue_answers_busy(cascade, tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))  # not the cache the fixture's app counts
    pipe = Switchboard(MAR3DPipeline.from_pretrained(cascade))
    demo, client = launch(pipe, tmp_path_factory, max_queue=2)
    pipe.gate.clear()
    try:
        running = client.submit(handle_file(str(CHAIR)), seed=1, **FAST, api_name="/generate")
        deadline = time.time() + 120
        while not pipe.started:  # the first request is in the pipeline, held at the gate
            assert time.time() < deadline
            time.sleep(0.05)
        waiting = []
        for seed in (2, 3):  # one after the other, so that their order is defined
            waiting.append(client.submit(handle_file(str(CHAIR)), seed=seed, **FAST, api_name="/generate"))
            wait_until_queued(waiting[-1])
        with pytest.raises(QueueError, match="Queue is full"):
            client.submit(handle_file(str(CHAIR)), seed=4, **FAST, api_name="/generate").result(timeout=120)
        r = httpx.post(f"{demo.local_url}gradio_api/call/generate", json={"data": [None, *PARAMS.values()]})
        assert r.status_code == 503 and "Queue is full" in r.text, (r.status_code, r.text)
        pipe.gate.set()
        results = [job.result(timeout=600) for job in [running, *waiting]]
        assert [stats["seed"] for *_, stats in results] == [1, 2, 3]
        assert pipe.started == [1, 2, 3]  # the refused request never reached the pipeline
    finally:
        pipe.gate.set()
        client.close()
        demo.close()


def _write_truncated(path: Path) -> Path:
    path.write_bytes(FLAMINGO.read_bytes()[:3000])
    return path


@pytest.mark.slow
def test_temp_files_do_not_pile_up(served):
    """Many requests (good, refused, failed) leave no per-request folder and no file in the temp dir,
    and what they add to Gradio's cache its sweep (DELETE_CACHE, every 10 minutes) removes: a
    second round of requests leaves no more files after the sweep than the first."""
    from gradio.route_utils import delete_files_created_by_app

    def count(folder):
        return sum(1 for p in Path(folder).rglob("*") if p.is_file())

    def many_requests():
        started = len(served.pipe.started)
        for seed in range(6):
            assert_serves(served, seed=seed)
        with pytest.raises(AppError, match="Cannot use this image"):
            generate(served.client, _write_truncated(served.tmp.parent / "cut.png"))
        served.pipe.fail_seed = 13
        try:
            with pytest.raises(AppError, match="Generation failed"):
                generate(served.client, CHAIR, seed=13)
        finally:
            served.pipe.fail_seed = None
        assert len(served.pipe.started) - started == 8
        assert list(Path(served.tmp).glob("mar3d_app_*")) == [] and count(served.tmp) == 0

    assert served.demo.delete_cache == app.DELETE_CACHE
    left = []
    for _ in range(2):
        many_requests()
        before = count(served.cache)
        delete_files_created_by_app(served.demo, age=0)  # what the sweep does, to files of any age
        left.append(count(served.cache))
        print(f"Gradio cache after {len(served.pipe.started)} requests: {before} files, after the sweep: "
              f"{left[-1]}: {sorted(p.name for p in Path(served.cache).rglob('*') if p.is_file())}")
        assert before > left[-1]
    # Gradio keeps the processed image of a request (one small PNG); on some machines the second
    # round's copy of the same image also escapes the sweep (stop 23: 0 then 1 file, with the
    # stop-22 code too). Piling up would be a dozen files a round.
    assert left[1] <= left[0] + 1 <= 11
    assert_serves(served)


@pytest.mark.slow
def test_no_outbound_connections_while_serving(served):
    """Start-up (build and launch) and every request above talked over loopback only."""
    assert served.hosts, "the guard saw no traffic at all"
    assert all(is_local(h) for h in served.hosts), sorted(set(served.hosts))


# --------------------------------------------------------------- start-up of app.py, offline

GUARDED_MAIN = """
import ipaddress, runpy, sys
def local(host):
    try:
        return host.startswith("/") or host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
def guard(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        address = args[0] if event == "socket.getaddrinfo" else args[1]
        host = str(address[0] if isinstance(address, tuple) else address)
        if not local(host):
            print("OUTBOUND", host, file=sys.stderr, flush=True)
            raise OSError("outbound connection refused: " + host)
sys.addaudithook(guard)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_app_main_starts_and_serves_offline(cascade, tmp_path):
    """`python app.py` with every non-loopback connection refused from the first import on: it starts,
    applies its limits (upload size) and answers a request; nothing tried to go out."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in NO_PHONING_HOME}  # app.py sets these itself
    env["GRADIO_TEMP_DIR"] = str(tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, str(Path(app.__file__)), "--checkpoint",
                             str(cascade), "--port", str(port), "--examples", str(tmp_path / "none")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                config = httpx.get(url + "config", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.time() < deadline, "app.py did not start"
                time.sleep(1)
        assert config["max_file_size"] == 20 * 1024 * 1024
        c = Client(url, analytics_enabled=False, verbose=False, download_files=str(tmp_path / "dl"))
        try:
            *_, stats = generate(c, CHAIR, seed=1)
        finally:
            c.close()
        assert stats["hr_mesh"]["n_faces"] > 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "OUTBOUND" not in err, err[-3000:]


# ----------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_reports_each_bad_input_and_goes_on(cascade, bad_inputs, tmp_path, capsys):
    names = list(bad_inputs)
    paths = [str(bad_inputs[n][0]) for n in names]
    code = generate_cli.main([*paths, "-o", str(tmp_path / "out"), "--checkpoint", str(cascade), "--lr-steps", "4",
                              "--hr-steps", "8", "--diffusion-steps", "25", "--resolution", "64"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and [r["image"] for r in lines] == paths  # one line per image, in order
    for name, record in zip(names, lines):
        cli_error = bad_inputs[name][2]
        if cli_error is None:
            assert "error" not in record and record["n_faces"] > 0, (name, record)
        else:
            assert record["error"].startswith("ImageError: ") and re.search(cli_error, record["error"]), (name, record)


@pytest.mark.parametrize("flag,value", [("--cfg-lr", "nan"), ("--temperature", "inf"), ("--lr-steps", "0"),
                                        ("--resolution", "100000"), ("--cond-aug-t", "2")])
def test_cli_refuses_bad_numbers_before_loading(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        generate_cli.main([str(CHAIR), "-o", str(tmp_path), "--checkpoint", str(tmp_path / "none"), flag, value])
    assert info.value.code == 2
    assert f"{flag[2:].replace('-', '_')} must be" in capsys.readouterr().err


def test_settings_check():
    Settings().check()
    for field, value in [("seed", -1), ("seed", 1.5), ("lr_steps", 0), ("cfg_hr", math.nan), ("temperature", -1.0),
                         ("diffusion_steps", 5000), ("resolution", True), ("target_faces", -5),
                         ("foreground_ratio", math.nan), ("background", "magic")]:
        with pytest.raises(ValueError, match=f"^{field} must be"):
            Settings(**{field: value}).check()


# ------------------------------------------------------------------------------- checkpoints


class Payload:
    """A pickle that, when loaded, creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def copy_cascade(cascade: Path, to: Path) -> Path:
    to.mkdir()
    for f in cascade.iterdir():
        if f.suffix in (".json", ".safetensors") and ".state." not in f.name:
            (to / f.name).write_bytes(f.read_bytes())
    return to


@pytest.mark.slow
def test_checkpoints_load_only_safetensors(cascade, tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    with monkeypatch.context() as mp:
        for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
            mp.setattr(module, name, refuse)
        MAR3DPipeline.from_pretrained(cascade)  # loads without any unpickling

    # a pickle where the weights belong, and one beside them: never executed, the file named
    marker = tmp_path / "executed"
    evil = copy_cascade(cascade, tmp_path / "evil")
    (evil / "mar_hr.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"weights": Payload(marker)}, evil / "mar_hr.pt")
    with pytest.raises(CheckpointError, match=r"mar_hr\.safetensors: unreadable or truncated"):
        MAR3DPipeline.from_pretrained(evil)
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_faults_name_the_file_and_the_problem(cascade, tmp_path, capsys):
    broken = {}
    d = broken["missing"] = copy_cascade(cascade, tmp_path / "missing")
    (d / "mar_lr.safetensors").unlink()
    d = broken["truncated"] = copy_cascade(cascade, tmp_path / "truncated")
    (d / "mar_hr.safetensors").write_bytes((d / "mar_hr.safetensors").read_bytes()[:5000])
    d = broken["mismatched"] = copy_cascade(cascade, tmp_path / "mismatched")
    (d / "mar_lr.safetensors").write_bytes((cascade / "vae.safetensors").read_bytes())
    d = broken["config"] = copy_cascade(cascade, tmp_path / "config")
    (d / "vae.json").write_text('{"class": "PyramidVAE", "config": {"width": "wide"}}')
    expected = {"missing": r"mar_lr\.safetensors: missing", "truncated": r"mar_hr\.safetensors: unreadable or truncated",
                "mismatched": r"mar_lr\.safetensors: does not match MAR",
                "config": r"vae\.json: not a valid mar3d model config"}
    for kind, folder in broken.items():
        with pytest.raises(CheckpointError, match=expected[kind]):
            MAR3DPipeline.from_pretrained(folder)
        # the CLI and the app say the same, and stop with an exit code
        assert generate_cli.main([str(CHAIR), "-o", str(tmp_path / "out"), "--checkpoint", str(folder)]) == 2
        assert re.search(expected[kind], capsys.readouterr().err)
        assert app.main(["--checkpoint", str(folder)]) == 1
        said = capsys.readouterr().err
        assert re.search(expected[kind], said) or (kind == "missing" and "missing: mar_lr.safetensors" in said), said


# ---------------------------------------------------------------------------------- training


def test_training_interrupted_midway_resumes_to_the_same_result(synthetic_data, tmp_path, monkeypatch):
    """A run that crashes at step 9 (Ctrl-C: nothing saved since step 6) and is started again from its
    last checkpoint ends bit-identical to an uninterrupted run (same seed, CPU)."""
    import dataclasses

    from safetensors.torch import load_file

    from mar3d import train as train_module
    from tests.test_train import FAST as TRAIN_FAST
    from tests.test_vae import MICRO

    cfg = dataclasses.replace(TRAIN_FAST, save_every=6, eval_every=6)
    train_module.train("vae", MICRO, cfg, synthetic_data, tmp_path / "whole")

    task = train_module.TASKS["vae"]
    real_loss = task.loss

    def crash_at_step_9(self, model, step, *args, **kwargs):
        if step == 8:  # the 9th step
            raise KeyboardInterrupt
        return real_loss(self, model, step, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(task, "loss", crash_at_step_9)
        with pytest.raises(KeyboardInterrupt):
            train_module.train("vae", MICRO, cfg, synthetic_data, tmp_path / "split")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "split" / "vae.state.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "6"  # the last checkpoint before the crash
    train_module.train("vae", MICRO, cfg, synthetic_data, tmp_path / "split")
    whole = load_file(str(tmp_path / "whole" / "vae.state.safetensors"))
    split = load_file(str(tmp_path / "split" / "vae.state.safetensors"))
    assert whole.keys() == split.keys()
    for k in whole:
        assert torch.equal(whole[k], split[k]), k
    logged = [json.loads(l) for l in (tmp_path / "split" / "vae.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [json.loads(l)["step"] for l in
                                           (tmp_path / "whole" / "vae.log.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------- preprocessing, property


ENCODINGS = {"PNG": ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I"), "JPEG": ("RGB", "L", "CMYK"),
             "GIF": ("P", "L"), "WEBP": ("RGB", "RGBA"), "TIFF": ("RGB", "RGBA", "L", "CMYK", "I;16", "F"),
             "BMP": ("RGB", "L", "P", "1")}


@st.composite
def encoded_images(draw):
    """Random size, mode, content and file format, sometimes cut short or with bytes flipped."""
    fmt = draw(st.sampled_from(sorted(ENCODINGS)))
    mode = draw(st.sampled_from(ENCODINGS[fmt]))
    w, h = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "constant", "rectangle", "transparent"]))
    a = np.full((h, w, 4), rng.integers(0, 256, 4), np.uint8)
    if kind == "noise":
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    elif kind == "rectangle":
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        a[y0:rng.integers(y0, h) + 1, x0:rng.integers(x0, w) + 1] = rng.integers(0, 256, 4)
    elif kind == "transparent":
        a[..., 3] = 0
    im = Image.fromarray(a)
    if mode in ("I;16", "I", "F"):
        gray = np.asarray(im.convert("L")).astype(np.float64)
        im = Image.fromarray({"I;16": (gray * 257).astype(np.uint16), "I": (gray * 200).astype(np.int32),
                              "F": (gray / 255).astype(np.float32)}[mode])
    elif mode == "P":
        im = im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=int(rng.integers(2, 64)))
    elif mode != "RGBA":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        data = bytearray(data)
        for i in rng.integers(0, len(data), 4):
            data[i] ^= 0xFF
        data = bytes(data)
    return data, draw(st.sampled_from(["auto", "remove", "none"])), draw(st.sampled_from([16, 32, 224]))


@settings(max_examples=60, deadline=None)
@given(encoded_images())
def test_property_any_file_gives_a_square_rgb_image_or_an_image_error(case):
    """Whatever the bytes (any size, mode, format, content, truncated or damaged): a size×size RGB
    condition image, or ImageError with a message. Nothing else is raised."""
    data, background, size = case
    try:
        # rembg_model names no file: the fallback segmentation, never rembg
        result = preprocess_image(data, background=background, size=size, rembg_model="no_such_model")
    except ImageError as e:
        assert str(e)
        return
    assert result.image.mode == "RGB" and result.image.size == (size, size)


def test_pixel_limits():
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS == 100_000_000  # app.py sets Pillow's limit on purpose
    with pytest.raises(ImageError, match="too large: 10001×10000 pixels"):
        preprocess_image(png_header_only(10_001, 10_000))
    with pytest.raises(ImageError, match="too large to decode safely"):
        preprocess_image(png_header_only(30_000, 30_000))
