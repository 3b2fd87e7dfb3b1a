"""Step 4 of the merge experiment: merge one fine-tuned run with every method over its grid, score each
merged model on the validation split, choose each method's hyperparameters there, and score the chosen
ones (and the two endpoints) on the held-out split. Output: the run's rows of the results table
(`results.py`), written as RUN/sweep-<curvature>-<hash>.parquet.

Grids are declared once, in `grid()`, as (variant, method, hyperparameters) points. For the curvature-guided
methods alpha is given normalised (`alpha_norm`: alpha = alpha_norm * sum(h_ft) / sum(h_pt), so that
alpha_norm = 1 gives both curvatures the same total weight whatever their scales); the table keeps both.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import cgm
from ..evaluate.fast import FastScorer
from ..merge import MergeInputs, TargetData, get_method, merge_state
from ..world import tasks as mt
from ..world import training as tr
from . import results as rs
from . import runs

SWEEP_VERSION = 1


@dataclass(frozen=True)
class Point:
    variant: str                 # what the tables call it (a method with its fixed flags)
    method: str                  # registry name
    hp: tuple                    # sorted (name, value) pairs; alpha given as alpha_norm

    @property
    def params(self) -> dict:
        return dict(self.hp)


def points(variant: str, method: str, fixed: Mapping | None = None, **swept: Sequence) -> list[Point]:
    """The grid of one variant: the product of the swept values, plus the fixed hyperparameters."""
    import itertools
    names = list(swept)
    return [Point(variant, method, tuple(sorted({**(fixed or {}), **dict(zip(names, combo))}.items())))
            for combo in itertools.product(*swept.values())]


K9 = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
K5 = (0.1, 0.3, 0.5, 0.7, 0.9)
ALPHA_NORM = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


GRID_SIZES = ("tiny", "small", "full")


def grid(size: str, methods: Sequence[str] | None = None) -> list[Point]:
    """The sweep grid: "full" (the book's main comparison), "small" (the regime and curvature-kind studies)
    or "tiny" (CI)."""
    if size not in GRID_SIZES:
        raise ValueError(f"unknown grid size {size!r}; known: {GRID_SIZES}")
    k = {"full": K9, "small": K5, "tiny": (0.3, 0.7)}[size]
    a = {"full": ALPHA_NORM, "small": (0.01, 0.1, 1.0, 10.0, 100.0), "tiny": (0.1, 1.0, 10.0)}[size]
    a3 = (0.1, 1.0, 10.0) if size != "tiny" else (1.0,)
    g = (points("pre_trained", "pre_trained") + points("fine_tuned", "fine_tuned")
         + points("linear", "linear", lam=k)
         + points("ties", "ties", k=(0.1, 0.3, 0.6) if size == "full" else (0.2,),
                  scale=(0.2, 0.4, 0.6, 0.8, 1.0) if size != "tiny" else (0.5, 1.0))
         + points("dare", "dare", {"seed": 0}, p=K5 if size != "tiny" else (0.5,))
         + points("magnitude", "magnitude", k=k)
         + points("random_revert", "random_revert", {"seed": 0}, k=k)
         + points("wanda", "wanda", k=k)
         + points("model_tailor", "model_tailor", k=k)
         + points("grafting", "grafting", {"seed": 0}, k=(0.5, 0.7, 0.8, 0.9, 0.95) if size != "tiny" else (0.8,))
         + points("cgm", "cgm", alpha_norm=a)
         + points("cgm_dagger", "cgm_dagger", {"per_row": True}, alpha_norm=a3, k=k)
         + points("cgm_dagger (global)", "cgm_dagger", {"per_row": False}, alpha_norm=a3, k=k)
         + points("score: h_ft delta^2", "score_ft_magnitude", k=k)
         + points("score: -h_pt delta^2", "score_pt_magnitude", {"alpha_norm": 1.0}, k=k))
    if methods is not None:
        known = {p.method for p in g}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ValueError(f"no grid for methods {unknown}; gridded: {sorted(known)}")
        g = [p for p in g if p.method in set(methods) | {"pre_trained", "fine_tuned"}]
    return g


CURVATURE_METHODS = ("cgm", "cgm_dagger", "score_ft_magnitude", "score_pt_magnitude")   # gridded, curvature-guided


@dataclass
class SweepConfig:
    """What a sweep measures (the grid is passed separately)."""
    n_validation: int = 64          # samples per task for choosing hyperparameters
    n_heldout: int = 200            # samples per task for reporting
    negative_control_seeds: tuple = (1, 2)    # random methods re-run at their chosen point with these seeds
    negative_control_methods: tuple = ("random_revert", "dare")
    regime: str = "default"
    grafting_samples: int = 32      # target calibration samples for grafting's mask

    def key(self, points_: Sequence[Point], kind: str) -> str:
        payload = {"config": asdict(self), "points": [asdict(p) for p in points_], "kind": kind,
                   "version": SWEEP_VERSION, "steps": runs.STEP_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _quad(merged, ref, h) -> float:
    """1/2 sum h (w - w_ref)^2 over the merge set, in float64."""
    return 0.5 * sum(float((h[n].double() * (merged[n].double() - ref[n].double()) ** 2).sum()) for n in h)


def sweep_path(spec: runs.RunSpec, kind: str, pts: Sequence[Point], cfg: SweepConfig, cache: Path) -> Path:
    return spec.folder(cache) / f"sweep-{kind}-{cfg.key(pts, kind)}.parquet"


def run_sweep(spec: runs.RunSpec, kind: str, pts: Sequence[Point], cfg: SweepConfig, cache: Path,
              progress: bool = False) -> pd.DataFrame:
    """The results rows of one run and curvature kind (read from the cache when the sweep was run before)."""
    path = sweep_path(spec, kind, pts, cfg, cache)
    if path.is_file():
        return pd.read_parquet(path)
    torch.set_num_threads(1)
    runs.finetune_run(spec, cache)
    base, processor = runs.load_base(spec)
    w_pt, w_ft, names = runs.merge_states(spec, cache, base)
    h_pt, h_ft = runs.curvature(spec, kind, cache)
    inputs = MergeInputs()
    needs = {need for p in pts for need in get_method(p.method).needs}
    if "activations" in needs:
        inputs.activations = runs.target_statistics(spec, cache)
    if "target" in needs:
        batches = tr.fisher_batches(processor, (spec.target,), cfg.grafting_samples, batch_size=cfg.grafting_samples)
        inputs.target = TargetData(copy.deepcopy(base), batches)
    out = _sweep(spec, kind, "", (base, processor), (w_pt, w_ft, names), (h_pt, h_ft), inputs, pts, cfg, progress)
    out["train_seconds"] = runs.run_log(spec, cache)["time_s"]
    rs.write_table(out, path)
    return out


def control_sweep(spec: runs.RunSpec, pts: Sequence[Point], cfg: SweepConfig, cache: Path,
                  progress: bool = False) -> pd.DataFrame:
    """The positive control (controls.py): the same sweep on the planted fine-tuned weights, with control =
    "positive" and two curvature kinds:

        fisher_at_planted   h_pt as in the paper (Fisher at w_pt), h_ft the Fisher at the planted weights:
                            does the estimated curvature find the plant?
        oracle              the known answer as curvature (h_pt = 1, h_ft = 1e-6 on planted entries; the
                            reverse elsewhere): does the engine (merge, scoring, selection) use it?

    Each row also records `planted_reverted`, the mean reversion ratio over the planted entries."""
    from . import controls
    path = spec.folder(cache) / f"control-{cfg.key(pts, 'positive')}-v{controls.CONTROL_VERSION}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    torch.set_num_threads(1)
    runs.finetune_run(spec, cache)
    folder = controls.positive_control_run(spec, cache)
    base, processor = runs.load_base(spec)
    w_pt, _, names = runs.merge_states(spec, cache, base)
    w_ft = runs.load_tensors(folder / "finetuned.safetensors")
    masks = controls.planted_mask(spec, cache)
    kinds = {"fisher_at_planted": (runs.h_pt(spec, "fisher_n8", cache),
                                   tr.load_curvature(folder / "h_ft.safetensors")[0]),
             "oracle": controls.oracle_curvature(masks, names, w_ft)}
    frames = []
    for kind, curv in kinds.items():
        out = _sweep(spec, kind, "positive", (base, processor), (w_pt, w_ft, names), curv, MergeInputs(), pts,
                     cfg, progress)
        out["planted_reverted"] = [_planted_reverted(r, w_pt, w_ft, names, curv, masks) for _, r in out.iterrows()]
        frames.append(out)
    out = pd.concat(frames, ignore_index=True)
    rs.write_table(out, path)
    return out


def _planted_reverted(row, w_pt, w_ft, names, curv, masks) -> float:
    """The mean reversion ratio lam = (w - w_ft) / (w_pt - w_ft) over the planted entries of a merge."""
    hp = json.loads(row["hyperparameters"])
    hp.pop("alpha_norm", None)
    if not np.isnan(row["alpha"]):
        hp["alpha"] = row["alpha"]
    m = get_method(row["method"])
    merged = merge_state(row["method"], w_pt, w_ft, *(curv if m.uses_curvature else (None, None)), names=names, **hp)
    num = sum(float(((merged[n] - w_ft[n]) * (w_pt[n] - w_ft[n]))[masks[n]].sum()) for n in masks)
    den = sum(float(((w_pt[n] - w_ft[n]) ** 2)[masks[n]].sum()) for n in masks)
    return num / den


def _sweep(spec, kind, control, model, weights, curv, inputs, pts, cfg, progress) -> pd.DataFrame:
    base, processor = model
    w_pt, w_ft, names = weights
    h_pt, h_ft = curv
    ratio = cgm.curvature_scale_ratio(h_pt, h_ft)
    tasks = (*mt.GENERAL, spec.target)
    scorers = {"validation": FastScorer(copy.deepcopy(base), processor,
                                        mt.eval_set(tasks, "validation", cfg.n_validation)),
               "heldout": FastScorer(copy.deepcopy(base), processor, mt.eval_set(tasks, "heldout", cfg.n_heldout))}
    run_cols = {"family": spec.family, "size": spec.size, "target": spec.target, "seed": spec.seed,
                "steps": spec.steps, "lr": spec.lr, "n_layers": -1 if spec.n_layers is None else spec.n_layers,
                "regime": cfg.regime, "curvature": kind, "run": spec.label}

    def evaluate(point: Point, split: str, control: str = control, override: Mapping | None = None) -> dict:
        hp = {**point.params, **(override or {})}
        alpha_norm = hp.pop("alpha_norm", None)
        if alpha_norm is not None:
            hp["alpha"] = alpha_norm * ratio
        t0 = time.perf_counter()
        m = get_method(point.method)
        curv = (h_pt, h_ft) if m.uses_curvature else (None, None)
        merged = merge_state(point.method, w_pt, w_ft, *curv, names=names, inputs=inputs, **hp)
        scorer = scorers[split]
        scorer.load(merged)
        per_sample = scorer.score()
        seconds = time.perf_counter() - t0
        means = {t: float(v["exact"].mean()) for t, v in per_sample.items()}
        row = {**run_cols, "method": point.method, "variant": point.variant,
               "hyperparameters": json.dumps({k: v for k, v in sorted({**point.params, **(override or {})}.items())}),
               "k": hp.get("k", np.nan), "alpha": hp.get("alpha", np.nan),
               "alpha_norm": np.nan if alpha_norm is None else alpha_norm, "scale_ratio": ratio,
               "split": split, "n_per_task": len(next(iter(per_sample.values()))["exact"]),
               **rs.summary_row(means, spec.target, mt.GENERAL),
               "loss_pt": float(np.mean([per_sample[t]["loss"].mean() for t in mt.GENERAL])),
               "loss_ft": float(per_sample[spec.target]["loss"].mean()),
               "quad_pt": _quad(merged, w_pt, h_pt), "quad_ft": _quad(merged, w_ft, h_ft),
               "selected": False, "control": control, "seconds": seconds, "exact_bits": ""}
        if split != "validation":
            row["exact_bits"] = json.dumps({t: "".join("1" if x else "0" for x in v["exact"])
                                            for t, v in per_sample.items()})
        return row

    from tqdm import tqdm          # a terminal bar on the real stderr, also inside a notebook kernel
    import sys
    rows = [evaluate(p, "validation") for p in tqdm(pts, desc=f"sweep {spec.label} {kind}", disable=not progress,
                                                     file=sys.__stderr__, mininterval=5)]
    val = pd.DataFrame(rows)
    chosen = rs.select_on_validation(val)
    val.loc[chosen.index, "selected"] = True
    held = []
    for i in chosen.index:                       # rows are in grid order: row i is pts[i]
        point = pts[i]
        held.append({**evaluate(point, "heldout"), "selected": True})
        if point.method in cfg.negative_control_methods and not control:
            for s in cfg.negative_control_seeds:
                held.append(evaluate(point, "heldout", f"negative: seed {s}", {"seed": s}))
    return pd.concat([val, pd.DataFrame(held)], ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Re-building a row's merge (for re-scoring it through lmms-eval, or drawing its mask).

def spec_of(row) -> runs.RunSpec:
    """The RunSpec of a results-table row."""
    return runs.RunSpec(row["family"], row["target"], int(row["seed"]), row["size"], int(row["steps"]),
                        float(row["lr"]), None if int(row["n_layers"]) < 0 else int(row["n_layers"]))


def rebuild_merge(row, cache: Path, cfg: SweepConfig | None = None) -> dict[str, torch.Tensor]:
    """The merged merge-set tensors of a (non-control) results row, recomputed from the cache."""
    cfg = cfg or SweepConfig()
    spec = spec_of(row)
    base, processor = runs.load_base(spec)
    w_pt, w_ft, names = runs.merge_states(spec, cache, base)
    m = get_method(row["method"])
    inputs = MergeInputs()
    if "activations" in m.needs:
        inputs.activations = runs.target_statistics(spec, cache)
    if "target" in m.needs:
        batches = tr.fisher_batches(processor, (spec.target,), cfg.grafting_samples, batch_size=cfg.grafting_samples)
        inputs.target = TargetData(base, batches)
    hp = json.loads(row["hyperparameters"])
    if "alpha_norm" in hp:
        hp.pop("alpha_norm")
        hp["alpha"] = float(row["alpha"])
    curv = runs.curvature(spec, row["curvature"], cache) if m.uses_curvature else (None, None)
    return merge_state(row["method"], w_pt, w_ft, *curv, names=names, inputs=inputs, **hp)


def rescore_lmms(rows: pd.DataFrame, cache: Path, include_path: str | Path) -> pd.DataFrame:
    """The given held-out rows re-scored by greedy decoding through lmms-eval (split "heldout_lmms"): the
    same merged weights, evaluated by the project's lmms-eval model class on the held-out tasks."""
    from ..evaluate import lmms_adapter as la
    out, adapters = [], {}
    for _, row in rows.iterrows():
        spec = spec_of(row)
        key = (spec.family, spec.size)
        if key not in adapters:
            base, processor = runs.load_base(spec)
            adapters[key] = (la.CGMMini(model=base, processor=processor), base.state_dict())
        adapter, base_state = adapters[key]
        t0 = time.perf_counter()
        adapter.swap_weights(base_state)
        adapter.swap_weights(rebuild_merge(row, cache))
        tasks = [*mt.GENERAL, spec.target]
        df = la.evaluate_lmms(adapter, tasks, include_path=include_path)
        exact = df[df["metric"] == "exact_match"].set_index("task")
        new = row.copy()
        new.update(pd.Series(rs.summary_row({t: float(exact.loc[t, "score"]) for t in tasks}, spec.target, mt.GENERAL)))
        new["split"], new["n_per_task"] = "heldout_lmms", int(exact["n"].iloc[0])
        new["seconds"], new["exact_bits"] = time.perf_counter() - t0, ""
        new["loss_pt"] = new["loss_ft"] = np.nan          # lmms-eval decodes; it reports no loss
        out.append(new)
    return pd.DataFrame(out)
