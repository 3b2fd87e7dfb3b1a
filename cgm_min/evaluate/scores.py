"""The scores, one copy each: per-sample matches and the paper's summary scores.

Per sample (generated text against the reference answer):
    exact_match     the text before the end token equals the answer (strict)
    relaxed_match   the text starts with the answer (whatever follows is ignored)

Per model (task scores in [0, 1]; the paper prints them x 100):
    Pre-Avg         mean over the general tasks (the paper's "pre-training" suite)
    Target          the score on the fine-tuning task
    Hscore          harmonic mean of Target and Pre-Avg (Eq. 15)
    Avg             (Target + N * Pre-Avg) / (N + 1) over N general tasks (Eq. 14)

Every table in the book, the results table of the experiments and the lmms-eval path compute these
through `summarise`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def exact_match(generated: str, answer: str) -> float:
    """Strict: the text the model generated before its end token equals the answer."""
    return float(generated.strip() == answer.strip())


def relaxed_match(generated: str, answer: str) -> float:
    """Relaxed first answer: the generated text starts with the answer; whatever follows is ignored."""
    return float(generated.strip().startswith(answer.strip()))


def _general(general: Sequence[str] | None) -> tuple[str, ...]:
    if general is None:
        from ..world.tasks import GENERAL
        return GENERAL
    return tuple(general)


def pre_avg(scores: Mapping[str, float], general: Sequence[str] | None = None) -> float:
    """Mean score over the general tasks (default: the miniature world's eight)."""
    general = _general(general)
    missing = [t for t in general if t not in scores]
    if missing:
        raise KeyError(f"Pre-Avg needs every general task; missing {missing}")
    return float(np.mean([scores[t] for t in general]))


def hscore(target: float, pre: float) -> float:
    """Eq. 15: the harmonic mean of Target and Pre-Avg (0 when both are 0)."""
    return 0.0 if target + pre == 0 else 2 * target * pre / (target + pre)


def avg_score(target: float, pre: float, n_general: int) -> float:
    """Eq. 14: (Target + N * Pre-Avg) / (N + 1)."""
    return (target + n_general * pre) / (n_general + 1)


def summarise(scores: Mapping[str, float], target: str | None, general: Sequence[str] | None = None) -> dict:
    """{"pre_avg", "target", "hscore", "avg"} of one model's task scores (target None: Pre-Avg only)."""
    general = _general(general)
    pre = pre_avg(scores, general)
    if target is None:
        return {"pre_avg": pre}
    if target not in scores:
        raise KeyError(f"no score for the target {target!r}")
    tgt = float(scores[target])
    return {"pre_avg": pre, "target": tgt, "hscore": hscore(tgt, pre), "avg": avg_score(tgt, pre, len(general))}


def paper_table(results: Mapping[str, Mapping[str, float]], target: str, general: Sequence[str] | None = None,
                scale: float = 100.0):
    """Tidy table, one row per model: per-task scores, Pre-Avg, Target, Hscore, Avg (x `scale`).

    `results` maps a model label to {task: score in [0, 1]} (one metric, e.g. strict exact match).
    """
    import pandas as pd
    general = _general(general)
    rows = []
    for label, s in results.items():
        summ = summarise(s, target, general)
        rows.append({"model": label, **{t: scale * float(s[t]) for t in general}, "Pre-Avg": scale * summ["pre_avg"],
                     f"Target ({target})": scale * summ["target"], "Hscore": scale * summ["hscore"],
                     "Avg": scale * summ["avg"]})
    return pd.DataFrame(rows).set_index("model")
