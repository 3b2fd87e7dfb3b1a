"""The paper's real data sets in one local format (see data_scripts/README.md).

    from data_scripts.real import prepare, verify, read_split, export_miniature
    prepare("okvqa", "downloads/okvqa", "data")          # -> data/okvqa/{train,val}/data.jsonl + images
    verify("data", "okvqa")                               # every checksum; one-line ValueError otherwise
    read_split("data", "okvqa", "train")                  # [{"id", "image", "question", "answers"}, ...]
    export_miniature("corners", "train", "data", n=256)   # a miniature task in the same format

Targets: okvqa, flickr30k, latex_ocr and calibration (the h_pt calibration set: n samples of each general
task of the paper's suite, each line with its lmms-eval task name). Nothing is downloaded: `source` is a
folder the user fetched (README: where each comes from).
"""
from __future__ import annotations

import os
from pathlib import Path

from .local import TARGETS, read_manifest, read_split, verify, write_target
from .miniature import export_miniature, export_miniature_splits
from .sources import SUITES, read_source

__all__ = ["TARGETS", "prepare", "verify", "read_split", "read_manifest", "write_target", "export_miniature",
           "export_miniature_splits"]


def prepare(target: str, source: str | os.PathLike, data_dir: str | os.PathLike, overwrite: bool = False,
            **options) -> Path:
    """Read `source` (a folder in one of the target's published formats) and write
    `<data_dir>/<target>/` (checksums computed from the written files; `verify` checks them later).
    Options (calibration only): tasks (a list, or a suite name), n_per_task, seed."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    if target == "calibration" and isinstance(options.get("tasks"), str):
        suite = options["tasks"]
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
        options["tasks"] = SUITES[suite]
    if (Path(data_dir) / target).exists() and not overwrite:
        raise FileExistsError(f"{Path(data_dir) / target} exists; pass --overwrite to replace it")
    how, pairs = read_source(target, Path(source), **options)
    return write_target(data_dir, target, how, pairs, overwrite)
