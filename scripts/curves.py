"""Markdown tables of a training run's held-out curves and stage times (for the model card).

    python scripts/curves.py --ckpt DIR [--work WORK]

Reads <ckpt>/{vae,mar_lr,mar_hr}.log.jsonl (written by mar3d.train) and <work>/stages.jsonl
(written by scripts/train_demo.py) and prints one table per file.
"""

import argparse
import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def curves(ckpt: Path) -> str:
    out = []
    for name in ("vae", "mar_lr", "mar_hr"):
        records = read_jsonl(ckpt / f"{name}.log.jsonl")
        evals = [r for r in records if any(k.startswith("val_") for k in r)]
        if not evals:
            continue
        # minutes since the start of training, from the nearest preceding loss record
        seconds = {r["step"]: r["seconds"] for r in records if "seconds" in r}
        for r in evals:
            r["minutes"] = round(seconds.get(r["step"], 0) / 60, 1)
        keys = ["step", "minutes"] + [k for k in evals[-1] if k not in ("step", "minutes")]
        out.append(f"**{name}** (held-out = `val_*`, training probe = `train_*`)\n\n{table(evals, keys)}")
    return "\n\n".join(out)


def stages(work: Path) -> str:
    rows = read_jsonl(work / "stages.jsonl")
    for r in rows:
        r["minutes"] = round(r["seconds"] / 60, 1)
    return table(rows, ["stage", "minutes"]) if rows else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    print(curves(args.ckpt))
    if args.work:
        print("\n" + stages(args.work))


if __name__ == "__main__":
    main()
