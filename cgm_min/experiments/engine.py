"""Run the merge experiment's steps over many runs, side by side on the available cores, through the cache.

    jobs = [Job(RunSpec("llava", "corners", seed=s)) for s in range(3)]
    table = run_jobs(jobs, cache="build/cache", workers=2)

Phase 1 fine-tunes every run that is not in the cache and measures the bases' h_pt; phase 2 runs the sweeps
(one per run and curvature kind, plus the positive control where asked). Each task runs in its own process
with one thread (two single-thread runs side by side beat one two-thread run on the miniatures), writes its
files into the cache, and the results table is read back from those files. With a warm cache nothing is
recomputed. Progress goes to the terminal (the process's real stderr), never into a notebook.
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from . import runs
from .sweep import Point, SweepConfig, control_sweep, grid, run_sweep, CURVATURE_METHODS


@dataclass(frozen=True)
class Job:
    """One fine-tuning run and what to measure on it."""
    spec: runs.RunSpec
    regime: str = "default"
    kinds: tuple = ("fisher_during",)      # curvature kinds; the first gets every method, the others only
    grid: str = "full"                     # the curvature-guided ones (on the "small" grid)
    positive_control: bool = False

    def sweeps(self, methods: Sequence[str] | None = None) -> list[tuple[str, list[Point]]]:
        out = [(self.kinds[0], grid(self.grid, methods))]
        curv = [m for m in CURVATURE_METHODS if methods is None or m in methods]
        out += [(k, grid("tiny" if self.grid == "tiny" else "small", curv)) for k in self.kinds[1:]]
        return out


CONTROL_METHODS = ("linear", "random_revert", "magnitude", "cgm", "cgm_dagger", "score_ft_magnitude",
                   "score_pt_magnitude")


def _cost(spec: runs.RunSpec) -> float:
    """Relative cost of a run, to start the longest first."""
    return spec.steps * (2.5 if spec.size == "wide" else 1.0) * (1.5 if spec.family == "qwen" else 1.0)


def _init_worker() -> None:
    import torch
    from transformers.utils import logging
    torch.set_num_threads(1)
    logging.disable_progress_bar()          # no "Loading weights" bar per model load


def _finetune(spec, cache):
    runs.finetune_run(spec, cache)
    return spec.label


def _h_pt(spec, estimator, cache):
    runs.h_pt(spec, estimator, cache)
    return f"h_pt {estimator} {spec.family}-{spec.size}"


def _sweep(spec, kind, pts, cfg, cache):
    return run_sweep(spec, kind, pts, cfg, cache)


def _control(spec, pts, cfg, cache):
    return control_sweep(spec, pts, cfg, cache)


def _lmms(rows, cache, include_path):
    from .sweep import rescore_lmms
    return rescore_lmms(rows, cache, include_path)


def _run(tasks: list[tuple[Callable, tuple]], workers: int, desc: str, progress: bool) -> list:
    """Run (function, args) tasks in `workers` single-thread processes (inline when workers == 1); results in
    task order. The first failure is raised after the others have been cancelled."""
    from tqdm import tqdm          # a terminal bar on the real stderr, also inside a notebook kernel
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress or not tasks, file=sys.__stderr__, mininterval=2)
    results = [None] * len(tasks)
    try:
        if workers <= 1:
            _init_worker()
            for i, (fn, args) in enumerate(tasks):
                results[i] = fn(*args)
                bar.update(1)
            return results
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(fn, *args): i for i, (fn, args) in enumerate(tasks)}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update(1)
        return results
    finally:
        bar.close()


def finetune(specs: Sequence[runs.RunSpec], cache: str | Path, workers: int = 2, progress: bool = True) -> None:
    """Fine-tune every run that the cache does not hold, `workers` at a time (longest first)."""
    cache = Path(cache)
    todo = [s for s in sorted(dict.fromkeys(specs), key=lambda s: -_cost(s)) if not (s.folder(cache) / "log.json").is_file()]
    _run([(_finetune, (s, cache)) for s in todo], workers, "fine-tuning", progress)


def run_jobs(jobs: Sequence[Job], cache: str | Path, cfg: SweepConfig | None = None, workers: int = 2,
             methods: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """Every job's rows of the results table (fine-tuning and sweeping what the cache does not hold)."""
    cache = Path(cache)
    cfg = cfg or SweepConfig()
    jobs = sorted(jobs, key=lambda j: -_cost(j.spec))
    specs = list(dict.fromkeys(j.spec for j in jobs))
    estimators = {(j.spec.family, j.spec.size, j.spec.n_layers, runs.CURVATURE_KINDS[k][0]): j.spec
                  for j in jobs for k in j.kinds}
    phase1 = [(_finetune, (s, cache)) for s in specs if not (s.folder(cache) / "log.json").is_file()]
    phase1 += [(_h_pt, (spec, est, cache)) for (_, _, _, est), spec in estimators.items()
               if not runs.h_pt_path(spec, est, cache).is_file()]
    _run(phase1, workers, "fine-tuning and h_pt", progress)
    phase2 = []
    for j in jobs:
        jcfg = SweepConfig(**{**cfg.__dict__, "regime": j.regime})
        phase2 += [(_sweep, (j.spec, kind, pts, jcfg, cache)) for kind, pts in j.sweeps(methods)]
        if j.positive_control:
            ctl = SweepConfig(**{**cfg.__dict__, "regime": "positive control"})
            size = "tiny" if j.grid == "tiny" else "small"
            phase2.append((_control, (j.spec, grid(size, CONTROL_METHODS), ctl, cache)))
    frames = _run(phase2, workers, "merge sweeps", progress)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def rescore_lmms(rows: pd.DataFrame, cache: str | Path, include_path: str | Path, workers: int = 2,
                 progress: bool = True) -> pd.DataFrame:
    """Re-score held-out rows through lmms-eval (`sweep.rescore_lmms`), one task per run, side by side."""
    groups = [g for _, g in rows.groupby("run", sort=False)]
    frames = _run([(_lmms, (g, Path(cache), str(include_path))) for g in groups], workers, "lmms-eval re-scoring",
                  progress)
    return pd.concat(frames, ignore_index=True) if frames else rows.iloc[:0]
