#!/usr/bin/env python3
"""Fetch the ISNet background-removal model from the npm registry (no model hub needed).

    python scripts/fetch_isnet.py            # -> $REMBG_HOME/isnet-general-use.onnx (default ~/.u2net)
    python scripts/fetch_isnet.py --check    # only verify the installed file (exit 1 if absent or wrong)

The npm package @imgly/background-removal-data@1.4.5 carries ISNet (DIS; its 88 MB "medium"
model) as 22 chunks listed in dist/resources.json, each with its SHA-256. This script runs `npm pack`,
checks every chunk and the total size, and writes the reassembled model atomically where
mar3d.preprocess looks for it, under the name rembg uses (docs/BACKGROUND_REMOVAL.md: licences).
Without npm, or when the registry cannot be reached, it prints one line and exits 0: the app
then uses its scikit-image fallback. A chunk that fails its check is an error (exit 1, nothing
written). Stdlib only.
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

    present = dest.is_file() and dest.stat().st_size == MODEL_SIZE
    if args.check:
        ok = present and sha256_of(dest) == MODEL_SHA256
        print(f"{dest}: {'ok' if ok else 'missing or not the expected ISNet model'}")
        return 0 if ok else 1
    if present:
        print(f"{dest} is already there ({MODEL_SIZE} bytes); nothing to do")
        return 0
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
