#!/usr/bin/env python3
"""Fetch the ISNet background-removal model from the npm registry (no model hub needed).

    python scripts/fetch_isnet.py            # -> $REMBG_HOME/isnet-general-use.onnx (default ~/.u2net)
    python scripts/fetch_isnet.py --check    # only verify the installed file (exit 1 if absent or wrong)

The npm package @imgly/background-removal-data@1.4.5 carries ISNet (DIS; its 88 MB "medium"
model) as 22 chunks listed in dist/resources.json, each with its SHA-256. This script runs `npm pack`,
checks every chunk, the total size and the whole file's SHA-256, and writes the model atomically
where mar3d.preprocess looks for it, under the name rembg uses (docs/BACKGROUND_REMOVAL.md: licences).

The package's model is float16. A CPU without float16 arithmetic (x86) runs it with a cast around
every operator, so the script widens it to float32 (176 MB, the same values exactly; the file
records the SHA-256 of the float16 model it came from): about 20 % faster per photo
(bench/bench_app.py). Widening needs the `onnx` package; without it the float16 file is kept.
An already installed float16 file is widened in place on the next run.

Without npm, or when the registry cannot be reached, it prints one line and exits 0: the app
then uses its scikit-image fallback. A chunk that fails its check is an error (exit 1, nothing
written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@imgly/background-removal-data@1.4.5"
RESOURCE = "/models/medium"
MODEL_FILE = "isnet-general-use.onnx"
MODEL_SIZE = 88_188_479
MODEL_SHA256 = "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"
WIDENED_KEY = "mar3d.widened_from_sha256"  # metadata of a widened model: its float16 source's SHA-256
FALLBACK = ("background removal will use the scikit-image fallback; "
            "install npm and rerun scripts/fetch_isnet.py")


class ChunkError(ValueError):
    """The package's chunks do not match its resources.json (or the pinned model)."""


def default_dir() -> Path:
    """The folder mar3d.preprocess.rembg_model_path reads: $REMBG_HOME, default ~/.u2net."""
    return Path(os.environ.get("REMBG_HOME") or os.path.join("~", ".u2net")).expanduser()


def assemble(resources: dict, chunk_dir: Path, dest: Path, key: str = RESOURCE,
             sha256: str | None = None) -> int:
    """Concatenate the chunks of resources[key] (files named by their hash in chunk_dir) into
    dest, checking each chunk's SHA-256 and length, the total size and, if given, the whole
    file's sha256. Writes a temporary file and renames it: dest appears only when all is
    right. Returns the size; raises ChunkError otherwise."""
    try:
        size, chunks = int(resources[key]["size"]), resources[key]["chunks"]
        spans = [(c["hash"], int(c["offsets"][0]), int(c["offsets"][1])) for c in chunks]
        if not all(re.fullmatch("[0-9a-f]{64}", h) for h, _, _ in spans):
            raise ValueError("a chunk name is not a SHA-256")  # also keeps reads inside chunk_dir
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ChunkError(f"resources.json has no usable {key!r} entry ({e!r})") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        whole, written = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for digest, start, end in sorted(spans, key=lambda s: s[1]):
                if start != written:
                    raise ChunkError(f"chunk {digest[:12]} starts at {start}, expected {written}")
                path = Path(chunk_dir) / digest
                data = path.read_bytes() if path.is_file() else b""
                if len(data) != end - start or hashlib.sha256(data).hexdigest() != digest:
                    raise ChunkError(f"chunk {digest[:12]} is missing or corrupt "
                                     f"({len(data)} bytes, SHA-256 mismatch or wrong length)")
                out.write(data)
                whole.update(data)
                written = end
            if written != size:
                raise ChunkError(f"chunks give {written} bytes, resources.json says {size}")
            if sha256 and whole.hexdigest() != sha256:
                raise ChunkError(f"assembled model has SHA-256 {whole.hexdigest()}, expected {sha256}")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


def widen_to_float32(src: Path, dest: Path, source_sha256: str) -> None:
    """Write `src` (an ONNX model with float16 weights and casts) as float32 to `dest`, atomically:
    float16 initialisers, Constant values and tensor types become float32 (exact), Cast-to-float16
    nodes cast to float32. Records `source_sha256` in the model's metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph

    def widened(t):
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)

    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(widened(t))
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
            if node.op_type == "Constant" and a.HasField("t") and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(widened(a.t))
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.helper.set_model_props(model, {WIDENED_KEY: source_sha256})
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def widened_from(path: Path) -> str | None:
    """The float16 source SHA-256 recorded in a model widen_to_float32 wrote, else None."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, or no onnx package
        return None
    return next((p.value for p in model.metadata_props if p.key == WIDENED_KEY), None)


def npm_pack(workdir: Path) -> tuple[dict, Path]:
    """`npm pack PACKAGE` into workdir and extract the model's chunks only (88 of 136 MB).
    Returns (resources.json, the folder holding the chunks)."""
    out = subprocess.run(["npm", "pack", PACKAGE, "--loglevel=error"], cwd=workdir,
                         capture_output=True, text=True, timeout=900, check=True)
    tarball = workdir / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        resources = json.load(tar.extractfile("package/dist/resources.json"))
        wanted = {f"package/dist/{c['hash']}" for c in resources[RESOURCE]["chunks"]}
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(workdir, members=members, **safe)
    tarball.unlink()
    return resources, workdir / "package" / "dist"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", type=Path, default=None, help="folder to write to (default $REMBG_HOME or ~/.u2net)")
    p.add_argument("--check", action="store_true", help="verify the installed model's SHA-256; fetch nothing")
    args = p.parse_args(argv)
    dest = (args.dest.expanduser() if args.dest else default_dir()) / MODEL_FILE

    original = dest.is_file() and dest.stat().st_size == MODEL_SIZE  # the package's float16 file
    widened = dest.is_file() and not original and widened_from(dest) == MODEL_SHA256
    if args.check:
        ok = widened or (original and sha256_of(dest) == MODEL_SHA256)
        kind = "float32, widened from the checked float16 model" if widened else "float16"
        print(f"{dest}: {f'ok ({kind})' if ok else 'missing or not the expected ISNet model'}")
        return 0 if ok else 1
    if widened:
        print(f"{dest} is already there (float32); nothing to do")
        return 0
    if original:
        return widen_installed(dest)
    if shutil.which("npm") is None:
        print(f"npm not found: {FALLBACK}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fetch_isnet.") as tmp:
        try:
            resources, chunk_dir = npm_pack(Path(tmp))
        except (OSError, subprocess.SubprocessError, tarfile.TarError, LookupError, ValueError) as e:
            why = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or [type(e).__name__]
            print(f"could not fetch {PACKAGE} ({why[0][:160]}): {FALLBACK}")
            return 0
        try:
            size = assemble(resources, chunk_dir, dest, sha256=MODEL_SHA256)
        except ChunkError as e:
            print(f"fetch_isnet: {e}; nothing written", file=sys.stderr)
            return 1
    print(f"wrote {dest} ({size} bytes, {PACKAGE} {RESOURCE}, every chunk's SHA-256 checked)")
    return widen_installed(dest)


def widen_installed(dest: Path) -> int:
    """Widen the installed float16 model in place (the float16 file stays if onnx is missing)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        print(f"{dest} kept in float16 (pip install onnx, then rerun, for the faster float32 copy)")
        return 0
    if sha256_of(dest) != MODEL_SHA256:
        print(f"fetch_isnet: {dest} is not the expected ISNet model; delete it and rerun", file=sys.stderr)
        return 1
    widen_to_float32(dest, dest, MODEL_SHA256)
    print(f"widened {dest} to float32 ({dest.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
