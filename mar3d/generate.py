"""Generate meshes from images: one JSON line per image, going on past bad images.

    python -m mar3d.generate IMAGE... -o OUTDIR --checkpoint DIR [--seed S] [--lr-steps N] [--hr-steps N]
        [--cfg-lr W] [--cfg-hr W] [--temperature T] [--resolution R] [--format glb|obj|ply|stl] ...

Every field of `mar3d.pipeline.Settings` is a flag. Exit code 0 when every image gave a mesh,
1 when some failed (each failure is a JSON line with its reason), 2 when the checkpoint is unusable
or a setting is out of range (NaN, 0 steps...).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError
from .cli import add_dataclass_flags, dataclass_from_args
from .mesh_io import FORMATS, export_mesh, mesh_stats
from .pipeline import MAR3DPipeline, Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--checkpoint", default="checkpoints", help="directory with vae, mar_lr and mar_hr")
    p.add_argument("--device", default="cpu")
    p.add_argument("--format", choices=FORMATS, default="glb")
    add_dataclass_flags(p, Settings)
    args = p.parse_args(argv)
    settings = dataclass_from_args(Settings, args)
    try:
        settings.check()
    except ValueError as e:
        p.error(str(e))  # exit 2, before loading any model
    try:
        pipe = MAR3DPipeline.from_pretrained(args.checkpoint, args.device)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"mar3d.generate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = 0
    for image in args.images:
        t = time.perf_counter()
        try:
            result = pipe(image, settings)
            path = export_mesh(result.mesh, out / f"{Path(image).stem}.{args.format}")
            record = {"image": image, "output": str(path), "background": result.background_method,
                      "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, **mesh_stats(result.mesh)}
        except Exception as e:  # ImageError, ExtractionError, OSError... or a fault in the model: next image
            failed += 1
            record = {"image": image, "error": f"{type(e).__name__}: {e}"}
        record["total_seconds"] = round(time.perf_counter() - t, 3)
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
