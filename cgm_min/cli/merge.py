"""cgm-merge: merge a fine-tuned checkpoint with its pre-trained base by streaming, verified, with provenance.

    cgm-merge CONFIG.yaml OUT_DIR                 merge as the config says; OUT_DIR appears only when complete
    cgm-merge CONFIG.yaml OUT_DIR --dry-run       print the plan (tensors, method, bytes, time, memory) only
    cgm-merge CONFIG.yaml OUT_DIR --overwrite     replace an existing OUT_DIR (once the new one is verified)
    cgm-merge curvature --model DIR --tasks general --out H_DIR [--n-per-task 8] [--n-layers 2]
                                                  measure curvature, written in the model's shard layout

The config format and what a merge does: `cgm_min.io.merge_checkpoints` (and the book's page "Merging your
own checkpoints"). Bad input ends in one line "error: ..." and exit status 2, with nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from . import USER_ERRORS, add_config_options, config_from_args, run


@dataclass
class MergeOptions:
    dry_run: bool = field(default=False, metadata={"help": "print the plan and write nothing"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT_DIR"})
    progress: bool = field(default=True, metadata={"help": "progress bar per tensor with bytes/s, on stderr"})
    threads: int = field(default=1, metadata={"help": "torch threads for the arithmetic (1 is fastest on 2 vCPUs)"})


@dataclass
class CurvatureOptions:
    model: str = field(default="", metadata={"help": "checkpoint folder (LLaVA-1.5 or Qwen2.5-VL)"})
    out: str = field(default="", metadata={"help": "output folder of the curvature files"})
    tasks: tuple[str, ...] = field(default=("general",), metadata={
        "help": "'general' (h_pt: the general tasks) or task names (h_ft), comma-separated"})
    n_per_task: int | None = field(default=None, metadata={"help": "calibration samples per task (8 for h_pt, 64 "
                                                                   "for h_ft when not given)"})
    n_layers: int | None = field(default=None, metadata={"help": "decoder layers of the merge set (default half)"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})


def _one_line_os_error(err: OSError) -> ValueError:
    what = err.strerror or str(err)
    return ValueError(f"{what}: {err.filename}" if err.filename and str(err.filename) not in what else what)


def curvature_main(argv: Sequence[str]) -> int:
    import torch
    from ..io.curvature_files import measure_curvature, write_curvature
    from ..world import tasks as mt
    from ..world import training as tr
    ap = argparse.ArgumentParser(prog="cgm-merge curvature",
                                 description="Measure the empirical Fisher of a checkpoint's merge set and write "
                                             "it in the model's shard layout.")
    add_config_options(ap, CurvatureOptions, required=("model", "out"))
    o = config_from_args(CurvatureOptions, ap.parse_args(argv))
    general = tuple(o.tasks) == ("general",)
    tasks = mt.GENERAL if general else o.tasks
    n = o.n_per_task or (tr.H_PT_SAMPLES if general else tr.H_FT_SAMPLES)
    if o.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {o.threads}")
    from ..io.outdir import AtomicOutputDir
    AtomicOutputDir(o.out, o.overwrite)                     # refuse an existing folder before measuring
    torch.set_num_threads(o.threads)
    h, meta = measure_curvature(o.model, tasks, n, o.n_layers, progress=True)
    meta["model"] = o.model
    path = write_curvature(h, o.model, o.out, meta, o.overwrite, hash_cache=True)   # a later merge reuses the hash
    print(f"{path}: {meta['kind']} of {len(h)} tensors from {meta['samples']} samples")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "curvature":
            return curvature_main(argv[1:])
        ap = argparse.ArgumentParser(prog="cgm-merge", description=__doc__.split("\n\n")[0],
                                     epilog="subcommand: cgm-merge curvature --help")
        ap.add_argument("config", help="the merge config (YAML)")
        ap.add_argument("out_dir", help="output folder (must not exist, unless --overwrite)")
        add_config_options(ap, MergeOptions)
        a = ap.parse_args(argv)
        o = config_from_args(MergeOptions, a)
        if o.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {o.threads}")
        from ..io import merge_checkpoints as mc
        if o.dry_run:
            plan = mc.plan_merge(mc.load_config(a.config), a.out_dir, o.overwrite)
            try:
                print(plan.describe())
            finally:
                plan.close()
            return 0
        mc.merge_checkpoints(a.config, a.out_dir, overwrite=o.overwrite, progress=o.progress, threads=o.threads)
        return 0
    except OSError as err:
        if isinstance(err, USER_ERRORS):
            raise
        raise _one_line_os_error(err) from None


def entry() -> int:
    """The console script. It ends the process without the interpreter's teardown (os._exit, after flushing
    stdout and stderr): once transformers is imported for the verification, tearing down its modules took
    0.9 s on the project's 2-vCPU machine class (an eighth of a warm 1 B-parameter merge) and frees nothing
    that the end of the process does not free. By then every output file is written, renamed and closed, and
    every thread has finished; an unexpected exception still ends the ordinary way, with its traceback."""
    code = run(main)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(entry())
