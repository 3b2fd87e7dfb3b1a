"""The positive control of the merge experiment: a constructed case whose answer is known.

Take a fine-tuned run and plant a perturbation in weights that the target does not use but the general
tasks do: in every merged MLP `down_proj`, the input columns (intermediate neurons) whose activation on
target data is smallest relative to their activation on general data (the PLANT_SHARE of neurons with the
lowest ratio) get Gaussian noise of `strength` times the column's own RMS. Such a perturbation hurts the
general tasks and barely touches the target, so reverting exactly those entries repairs the model; a method
that knows which entries matter to which loss must clearly beat random reversion here. If it does not,
the engine or the curvature is wrong, and a null result elsewhere means nothing.

The neurons are chosen from activations, not from curvature, so the control does not assume what it tests.
The strength is the smallest of STRENGTHS for which the planted model loses at least MIN_PRE_AVG_DROP of
validation Pre-Avg against w_ft; the construction fails loudly when the target then loses more than
MAX_TARGET_DROP.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..evaluate.fast import FastScorer
from ..merge.statistics import activation_stats
from ..world import tasks as mt
from ..world import training as tr
from . import runs

PLANT_SHARE = 0.10
STRENGTHS = (2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0)
MIN_PRE_AVG_DROP = 0.08
MAX_TARGET_DROP = 0.05
CONTROL_VERSION = 1


def planted_columns(spec: runs.RunSpec, cache: Path) -> dict[str, torch.Tensor]:
    """{down_proj weight name: indices of the input columns to perturb}."""
    model, processor = runs.finetuned_model(spec, cache)
    names = [n for n in runs.run_log(spec, cache)["merge_names"] if n.endswith("mlp.down_proj.weight")]
    general = activation_stats(model, tr.fisher_batches(processor, mt.GENERAL, 8), names, gram=False)
    target = activation_stats(model, tr.fisher_batches(processor, (spec.target,), 64), names, gram=False)
    cols = {}
    for n in names:
        g = general[n].col_sq / general[n].n
        t = target[n].col_sq / target[n].n
        ratio = (t / t.mean()) / (g / g.mean()).clamp(min=1e-12)
        m = max(1, round(PLANT_SHARE * ratio.numel()))
        cols[n] = torch.argsort(ratio, stable=True)[:m]
    return cols


def plant(w_ft: dict, cols: dict, strength: float, seed: int = 0) -> dict:
    """w_ft with noise of `strength` x column RMS in the planted columns."""
    out = dict(w_ft)
    for n, idx in cols.items():
        g = torch.Generator().manual_seed(seed)
        w = w_ft[n].clone()
        rms = w[:, idx].pow(2).mean(0).sqrt()
        w[:, idx] += strength * rms[None, :] * torch.randn((w.shape[0], len(idx)), generator=g)
        out[n] = w
    return out


def positive_control_run(spec: runs.RunSpec, cache: Path) -> Path:
    """Write (once) the planted fine-tuned merge set and its h_ft (Fisher at the planted weights) into
    RUN/positive-control-v*/; returns that folder. Its info.json records the planted columns, the strength
    and the validation scores that chose it."""
    folder = spec.folder(cache) / f"positive-control-v{CONTROL_VERSION}"
    if (folder / "info.json").is_file():
        return folder
    torch.set_num_threads(1)
    base, processor = runs.load_base(spec)
    _, w_ft, names = runs.merge_states(spec, cache, base)
    cols = planted_columns(spec, cache)
    tasks = (*mt.GENERAL, spec.target)
    scorer = FastScorer(copy.deepcopy(base), processor, mt.eval_set(tasks, "validation", 64))

    def summary(state):
        scorer.load(state)
        s = scorer.means()
        return (float(sum(s[t]["exact"] for t in mt.GENERAL) / len(mt.GENERAL)), s[spec.target]["exact"])

    pre_ft, tgt_ft = summary(w_ft)
    tried = []
    for strength in STRENGTHS:
        planted = plant(w_ft, cols, strength, spec.seed)
        pre, tgt = summary(planted)
        tried.append({"strength": strength, "pre_avg": pre, "target": tgt})
        if pre_ft - pre >= MIN_PRE_AVG_DROP:
            break
    else:
        raise RuntimeError(f"positive control: no strength in {STRENGTHS} lowers Pre-Avg by {MIN_PRE_AVG_DROP}")
    if tgt_ft - tgt > MAX_TARGET_DROP:
        raise RuntimeError(f"positive control: the planted columns are used by the target too (target "
                           f"{tgt_ft:.3f} -> {tgt:.3f} at strength {strength}); the construction failed")
    model = copy.deepcopy(base)
    model.load_state_dict(planted, strict=False)
    h_ft = tr.calibration_fisher(model, processor, (spec.target,), runs.CALIBRATION_TARGET, spec.n_layers)
    runs.save_tensors(planted, folder / "finetuned.safetensors")
    tr.save_curvature(h_ft, folder / "h_ft.safetensors", {"kind": "h_ft", "estimator": "fisher_at_planted"})
    planted_entries = sum(len(i) * planted[n].shape[0] for n, i in cols.items())
    info = {"strength": strength, "tried": tried, "fine_tuned": {"pre_avg": pre_ft, "target": tgt_ft},
            "planted_share_of_merge_set": planted_entries / sum(w.numel() for w in w_ft.values()),
            "columns": {n: i.tolist() for n, i in cols.items()}}
    from ..report import atomic_write
    atomic_write(folder / "info.json", lambda tmp: Path(tmp).write_text(json.dumps(info)))
    return folder


def planted_mask(spec: runs.RunSpec, cache: Path) -> dict[str, torch.Tensor]:
    """Boolean masks of the planted entries (for measuring how much of the plant a merge reverts)."""
    folder = positive_control_run(spec, cache)
    info = json.loads((folder / "info.json").read_text())
    w = runs.load_tensors(folder / "finetuned.safetensors")
    masks = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in w.items()}
    for n, idx in info["columns"].items():
        masks[n][:, idx] = True
    return masks


ORACLE_FLOOR = 1e-6


def oracle_curvature(masks: dict, names, w_ft: dict) -> tuple[dict, dict]:
    """(h_pt, h_ft) that encode the known answer: on planted entries the general loss is sharp (1) and the
    target flat (ORACLE_FLOOR); everywhere else the reverse. Tensors without a plant count as "elsewhere"."""
    h_pt, h_ft = {}, {}
    for n in names:
        m = masks.get(n, torch.zeros_like(w_ft[n], dtype=torch.bool)).float()
        h_pt[n] = m + ORACLE_FLOOR * (1 - m)
        h_ft[n] = (1 - m) + ORACLE_FLOOR * m
    return h_pt, h_ft
