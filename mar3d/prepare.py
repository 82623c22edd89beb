"""Precompute the per-shape training arrays for a folder of meshes (DESIGN.md §2).

    python -m mar3d.prepare MESH_DIR OUT_DIR [--workers N] [--z-up] [--num-surface N] ...

One `<name>.npz` per mesh (the arrays of `geometry.prepare_shape` plus `center`, `scale`,
`source`), where name is the path relative to MESH_DIR without extension and with the
separators replaced by `__`. Existing outputs are skipped, bad meshes are reported in
OUT_DIR/report.json and do not stop the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mar3d.geometry import MESH_EXTENSIONS, PrepareConfig, load_mesh, normalize_mesh, prepare_shape


def find_meshes(mesh_dir) -> list[Path]:
    """Mesh files under `mesh_dir` (recursive, extension case-insensitive), sorted."""
    mesh_dir = Path(mesh_dir)
    return sorted(p for p in mesh_dir.rglob("*") if p.is_file() and p.suffix.lower() in MESH_EXTENSIONS)


def shape_name(rel_path) -> str:
    """Output name for a relative mesh path: 'a/b/c.obj' -> 'a__b__c'."""
    return os.path.splitext(str(rel_path))[0].replace(os.sep, "__")


def shape_seed(name: str) -> int:
    """Per-shape seed from the name only, so reruns and parallel runs are identical."""
    return zlib.crc32(name.encode("utf-8"))


def _atomic_write(path: Path, write) -> None:
    """Call write(file object) on a temp file in the same folder, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare_file(src: Path, rel: str, name: str, out_path: Path, cfg: PrepareConfig, z_up: bool) -> None:
    """Load, normalise and sample one mesh, and write its npz atomically."""
    mesh, center, scale = normalize_mesh(load_mesh(src, z_up=z_up), cfg.extent, cfg.normalize)
    arrays = prepare_shape(mesh, cfg, shape_seed(name))
    arrays["center"] = np.asarray(center, dtype=np.float64)
    arrays["scale"] = np.asarray(scale, dtype=np.float64)
    arrays["source"] = np.asarray(rel)
    _atomic_write(out_path, lambda f: np.savez_compressed(f, **arrays))


def _job(src: Path, rel: str, name: str, out_path: Path, cfg: PrepareConfig, z_up: bool):
    """Worker entry point: never raises, returns (name, rel, error reason or None)."""
    try:
        prepare_file(src, rel, name, out_path, cfg, z_up)
        return name, rel, None
    except Exception as exc:  # one bad file must not stop the batch
        return name, rel, f"{type(exc).__name__}: {exc}"


def _pool_results(pool: ProcessPoolExecutor, jobs):
    """Yield _job results as they complete; a crashed worker becomes a failure, not an abort."""
    futures = {pool.submit(_job, *job): job for job in jobs}
    for future in as_completed(futures):
        try:
            yield future.result()
        except Exception as exc:  # e.g. BrokenProcessPool after a crash in native code
            _, rel, name, *_ = futures[future]
            yield name, rel, f"worker failed: {type(exc).__name__}: {exc}"


def prepare_dir(mesh_dir, out_dir, cfg: PrepareConfig = PrepareConfig(), workers: int = 1, z_up: bool = False) -> dict:
    """Prepare every mesh under `mesh_dir` into `out_dir`; returns (and writes) the report.

    Raises FileNotFoundError if `mesh_dir` is missing and ValueError if it holds no meshes.
    """
    mesh_dir, out_dir = Path(mesh_dir), Path(out_dir)
    if not mesh_dir.is_dir():
        raise FileNotFoundError(f"mesh folder does not exist: {mesh_dir}")
    files = find_meshes(mesh_dir)
    if not files:
        raise ValueError(f"no mesh files ({', '.join(MESH_EXTENSIONS)}) under {mesh_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)

    config = {**dataclasses.asdict(cfg), "near_sigmas": list(cfg.near_sigmas), "z_up": z_up}  # JSON-native
    report = {"prepared": [], "skipped_existing": [], "failed": [], "config": config}
    jobs, seen = [], {}
    for src in files:
        rel = src.relative_to(mesh_dir).as_posix()
        name = shape_name(src.relative_to(mesh_dir))
        if name in seen:  # e.g. chair.obj next to chair.glb: first one (sorted) wins
            report["failed"].append({"source": rel, "reason": f"output name {name!r} already used by {seen[name]}"})
            continue
        seen[name] = rel
        out_path = out_dir / f"{name}.npz"
        if out_path.exists():
            report["skipped_existing"].append(name)
        else:
            jobs.append((src, rel, name, out_path, cfg, z_up))

    progress = tqdm(total=len(jobs), desc="prepare", unit="shape")
    if workers <= 1:
        results = (_job(*job) for job in jobs)
        pool = None
    else:
        # spawn, not fork: forking a process that already runs threads (torch, libigl) can hang.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = _pool_results(pool, jobs)
    try:
        for name, rel, reason in results:
            if reason is None:
                report["prepared"].append(name)
            else:
                report["failed"].append({"source": rel, "reason": reason})
            progress.update()
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    # Completion order varies with workers; sort so the report is reproducible.
    report["prepared"].sort()
    report["failed"].sort(key=lambda item: item["source"])
    _atomic_write(out_dir / "report.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    return report


def main(argv=None) -> None:
    defaults = PrepareConfig()
    parser = argparse.ArgumentParser(prog="python -m mar3d.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("mesh_dir", type=Path, help="folder searched recursively for meshes")
    parser.add_argument("out_dir", type=Path, help="folder for the .npz files and report.json")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (1: in-process)")
    parser.add_argument("--z-up", action="store_true", help="input meshes are Z-up; rotate them to Y-up")
    parser.add_argument("--num-surface", type=int, default=defaults.num_surface)
    parser.add_argument("--num-uniform", type=int, default=defaults.num_uniform)
    parser.add_argument("--num-near", type=int, default=defaults.num_near)
    parser.add_argument("--near-sigmas", type=float, nargs="+", default=list(defaults.near_sigmas))
    parser.add_argument("--bounds", type=float, default=defaults.bounds)
    parser.add_argument("--extent", type=float, default=defaults.extent)
    parser.add_argument("--normalize", choices=("box", "cylinder"), default=defaults.normalize,
                        help="box: longest side = extent; cylinder: fits any rotation about +Y")
    args = parser.parse_args(argv)
    cfg = PrepareConfig(
        num_surface=args.num_surface,
        num_uniform=args.num_uniform,
        num_near=args.num_near,
        near_sigmas=tuple(args.near_sigmas),
        bounds=args.bounds,
        extent=args.extent,
        normalize=args.normalize,
    )
    start = time.perf_counter()
    try:
        report = prepare_dir(args.mesh_dir, args.out_dir, cfg, workers=args.workers, z_up=args.z_up)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(
        f"prepared {len(report['prepared'])}, skipped (existing) {len(report['skipped_existing'])}, "
        f"failed {len(report['failed'])} in {time.perf_counter() - start:.1f}s; "
        f"report: {args.out_dir / 'report.json'}"
    )
    for item in report["failed"]:
        print(f"  failed {item['source']}: {item['reason']}", file=sys.stderr)


if __name__ == "__main__":
    # Run the imported module's main so worker processes pickle `mar3d.prepare._job`, not `__main__._job`.
    from mar3d.prepare import main as _main

    _main()
