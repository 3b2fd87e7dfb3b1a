"""python -m data_scripts.real prepare|verify|export-miniature ... (one-line errors, exit status 2)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cgm_min.cli import run

from . import TARGETS, export_miniature, prepare, read_manifest, verify
from .sources import CALIBRATION_TASKS, SUITES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_scripts.real",
                                description="Prepare and verify the paper's data sets in the local format.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="read a downloaded source folder into DATA_DIR/TARGET")
    pr.add_argument("target", choices=TARGETS)
    pr.add_argument("source", help="the folder holding the downloaded files")
    pr.add_argument("data_dir")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing DATA_DIR/TARGET")
    pr.add_argument("--suite", choices=list(SUITES), default="llava",
                    help="calibration: the general tasks (llava: Tables 1-3; qwen-latex: Table 4)")
    pr.add_argument("--tasks", help=f"calibration: comma-separated lmms-eval tasks instead of a suite "
                                    f"({', '.join(CALIBRATION_TASKS)})")
    pr.add_argument("--n-per-task", type=int, default=8, help="calibration: samples per task (the paper: 8)")
    pr.add_argument("--seed", type=int, default=0, help="calibration: which samples")
    ve = sub.add_parser("verify", help="check every checksum of prepared targets")
    ve.add_argument("data_dir")
    ve.add_argument("targets", nargs="*", help="default: every target with a manifest in DATA_DIR")
    ex = sub.add_parser("export-miniature", help="write a miniature task in the same format")
    ex.add_argument("task", help="a miniature task name, or 'calibration' (8 samples of each general task)")
    ex.add_argument("split")
    ex.add_argument("out_dir")
    ex.add_argument("--n", type=int, default=None)
    ex.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "prepare":
        opts = {}
        if a.target == "calibration":
            tasks = tuple(t.strip() for t in a.tasks.split(",") if t.strip()) if a.tasks else SUITES[a.suite]
            opts = {"tasks": tasks, "n_per_task": a.n_per_task, "seed": a.seed}
        folder = prepare(a.target, a.source, a.data_dir, a.overwrite, **opts)
        m = read_manifest(a.data_dir, a.target)
        print(f"{folder}: " + ", ".join(f"{s} {n}" for s, n in m["splits"].items()) + f" ({m['source']})")
    elif a.command == "verify":
        from pathlib import Path
        targets = a.targets or [p.name for p in sorted(Path(a.data_dir).iterdir())
                                if not p.name.startswith(".") and (p / "manifest.json").is_file()]
        if not targets:
            raise ValueError(f"{a.data_dir}: no prepared target (no */manifest.json)")
        for t in targets:
            m = verify(a.data_dir, t)
            print(f"{t}: ok, {len(m['sha256'])} files, " + ", ".join(f"{s} {n}" for s, n in m["splits"].items()))
    else:
        folder = export_miniature(a.task, a.split, a.out_dir, a.n, overwrite=a.overwrite)
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
