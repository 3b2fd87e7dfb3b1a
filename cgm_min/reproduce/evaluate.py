"""Scoring the chain's models, and the results table in the miniature experiment's schema.

Two backends, named by the recipe (`evaluate.backend`):

    lmms    lmms-eval's standard tasks (ok_vqa_val2014, vqav2_val, ...), evaluated in-process by
            `lmms_eval.evaluator.simple_evaluate` with the project's model class (`evaluate.lmms_adapter.CGMMini`:
            lmms-eval's own llava_hf fails on log-likelihood requests with transformers 5 and its qwen2_5_vl
            needs torchvision). A task's score is its metric (several metrics: their mean, e.g. Flickr30k's
            BLEU-1..4, METEOR, ROUGE-L, CIDEr as the paper averages them) divided by `scale`. A task named
            "local:<target>" is scored like the local backend (LaTeX-OCR has no lmms-eval task).
    local   the data folder's split `evaluate.split` of each task, in the local format: greedy decoding
            (`evaluate.decoding.generate`), a document scores 1 when the output equals one of its references
            (`evaluate.scores.exact_match`). The tiny recipes score the miniature tasks this way.

`results_table` turns OUT/evaluate/scores.json into rows of `cgm_min.experiments.results` (split "heldout",
regime "reproduce", run = the recipe's name); the paper's printed tables are in the same schema
(`experiments.paper_figures.paper_results`), so one table holds both.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


# The results table's curvature column: h_pt's estimator, h_ft accumulated during fine-tuning (the miniature
# experiment's "fisher_during" is the same pair: Fisher h_pt from 8 samples per general task, h_ft during).
CURVATURE_KIND = {"fisher": "fisher_during", "hutchinson": "hutchinson_pt_during"}


def local_score(model, encoder, data_dir: Path, target: str, split: str, limit: int | None, batch_size: int) -> float:
    from ..evaluate.decoding import generate
    from ..evaluate.scores import exact_match
    from .data import read_split
    records = read_split(data_dir, target, split, limit)
    out = generate(model, encoder, records, max_new_tokens=64, batch_size=batch_size)
    return float(np.mean([max(exact_match(o, a) for a in r.answers) for o, r in zip(out, records)]))


def _local(task: str) -> tuple[str, str | None] | None:
    """("latex_ocr", "test") for "local:latex_ocr/test"; None for an lmms-eval task."""
    if not task.startswith("local:"):
        return None
    name, _, split = task[len("local:"):].partition("/")
    return name, split or None


def score_model(recipe, path: Path, data_dir: Path) -> dict[str, float]:
    """{task label: score in [0, 1]} of the checkpoint at `path` on the recipe's target and general tasks."""
    import torch
    from ..world import models as mm
    ev = recipe.evaluate
    tasks = (ev.target, *ev.general)
    cuda = torch.cuda.is_available()
    model, processor = mm.load_family(path, dtype=torch.bfloat16 if cuda else torch.float32)
    model.to("cuda" if cuda else "cpu")
    enc = mm.Encoder(processor)
    scores: dict[str, float] = {}
    lmms = []
    for t in tasks:
        local = (t.task, ev.split) if ev.backend == "local" else _local(t.task)
        if local is None:
            lmms.append(t)
        else:
            scores[t.label] = local_score(model, enc, data_dir, local[0], local[1] or ev.split, ev.limit,
                                          ev.batch_size)
    if lmms:
        scores.update(lmms_scores(model, processor, lmms, ev.batch_size, ev.limit))
    return {t.label: scores[t.label] for t in tasks}


def lmms_scores(model, processor, tasks, batch_size: int, limit: int | None) -> dict[str, float]:
    """lmms-eval's standard tasks through the project's model class (datasets from the HF cache or hub)."""
    from lmms_eval.evaluator import simple_evaluate
    from ..evaluate.lmms_adapter import CGMMini
    device = str(next(model.parameters()).device)
    lm = CGMMini(model=model, processor=processor, batch_size=batch_size, device=device, device_map=None)
    res = simple_evaluate(model=lm, tasks=[t.task for t in tasks], limit=limit, bootstrap_iters=0)
    return extract_scores(res, tasks)


def extract_scores(res: dict, tasks) -> dict[str, float]:
    """{label: mean of the task's metrics / scale} from simple_evaluate's result; one-line error if missing."""
    out = {}
    for t in tasks:
        r = res.get("results", {}).get(t.task)
        if r is None:
            raise ValueError(f"lmms-eval returned no result for task {t.task}")
        vals = []
        for m in t.metric:
            key = f"{m},none"
            if key not in r:
                raise ValueError(f"lmms-eval task {t.task} has no metric {m!r}; it reports "
                                 f"{', '.join(k.split(',')[0] for k in r if ',' in k)}")
            vals.append(float(r[key]) / t.scale)
        out[t.label] = float(np.mean(vals))
    return out


def results_table(recipe, out: Path):
    """The results-table rows of a finished evaluate step (one per scored model)."""
    import pandas as pd
    from ..experiments import results as rs
    ev = json.loads((out / "evaluate" / "scores.json").read_text())
    merges = json.loads((out / "merge" / "merges.json").read_text())
    ft_log = json.loads((out / "finetune" / "log.json").read_text())
    size = {"llava-1.5-7b": "7B", "qwen2.5-vl-3b": "3B"}.get(recipe.backbone, "small")
    target = recipe.evaluate.target.label
    general = recipe.general_labels
    ms = recipe.merge_set
    from ..io.layouts import PRESETS
    from .chain import REGIME
    run = {"family": recipe.family, "size": size, "target": target, "seed": recipe.finetune.seed,
           "steps": ft_log["optimizer_steps"], "lr": recipe.finetune.lr,
           "n_layers": ms.last_layers if ms.last_layers is not None else PRESETS[ms.preset].last_layers,
           "regime": REGIME, "curvature": CURVATURE_KIND[recipe.curvature.estimator], "run": recipe.name}
    methods = [m["method"] for m in merges.values()]
    rows = []
    for label, scores in ev["scores"].items():
        m = merges.get(label)
        # the variant is the method's registry name (what the figure chapter selects), unless the recipe
        # merges with one method twice; then the label tells the two apart
        variant = label if m is None or methods.count(m["method"]) > 1 else m["method"]
        hp = m["hyperparameters"] if m else {}
        alpha = (m.get("alpha") or {}) if m else {}
        rows.append({**run, "method": m["method"] if m else label, "variant": variant,
                     "hyperparameters": json.dumps(dict(sorted(hp.items()))),
                     "k": hp.get("k", np.nan), "alpha": alpha.get("alpha", hp.get("alpha", np.nan)),
                     "alpha_norm": alpha.get("alpha_normalised", np.nan),
                     "scale_ratio": (alpha["sum_h_ft"] / alpha["sum_h_pt"]) if alpha else np.nan,
                     "split": "heldout", "n_per_task": recipe.evaluate.limit or -1,
                     **rs.summary_row(scores, target, general),
                     "loss_pt": np.nan, "loss_ft": np.nan, "quad_pt": np.nan, "quad_ft": np.nan,
                     "selected": True, "control": "", "seconds": ev["seconds"][label]})
    return rs.check_schema(pd.DataFrame(rows), f"results of {recipe.name}")
