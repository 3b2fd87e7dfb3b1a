"""One way to evaluate a miniature (or real) LLaVA-1.5 / Qwen2.5-VL model on task samples.

    teacher_forced  one forward pass per batch with the reference answer fed in; a sample is an exact match
                    when the argmax at every answer position (answer tokens + end token) is the reference
                    token, which is exactly when greedy decoding would emit the answer and stop
    generate        the real batched greedy decoding (left padding), to confirm that the two agree
    evaluate        {task: {"exact", "relaxed"}} by teacher forcing
    summary         Pre-Avg and the lowest task of such a result (`scores.pre_avg`)

`evaluate.fast.FastScorer` is the same teacher-forced score, precomputed for merge sweeps; the lmms-eval
path (`evaluate.lmms_adapter`) scores greedy decoding.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..world import models as mm
from ..world import tasks as mt
from . import scores


@torch.no_grad()
def teacher_forced(model, encoder: mm.Encoder, samples: Sequence[mt.Sample], batch_size: int = 100,
                   answer_ids: Sequence[Sequence[int]] | None = None):
    """Per sample: (exact, relaxed) from one forward pass with the reference answer fed in.

    exact:   argmax at every answer position, the end token included, is the reference token
             (= greedy decoding emits exactly the answer and then its end token);
    relaxed: the same over the answer tokens only (= greedy output starts with the answer).
    `answer_ids` (token ids ending with the end token) replace the samples' reference answers.
    """
    was_training = model.training
    model.eval()
    exact, relaxed = [], []
    try:
        dev = next(model.parameters()).device
        for i in range(0, len(samples), batch_size):
            b = encoder.batch(samples[i:i + batch_size],
                              answer_ids=None if answer_ids is None else answer_ids[i:i + batch_size]).to(dev)
            labels = b["labels"]
            logits = model(**b).logits
            pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
            ok = (pred == tgt) | (tgt == -100)
            is_end = tgt == encoder.end_id
            exact += ok.all(1).tolist()
            relaxed += (ok | is_end).all(1).tolist()
    finally:
        model.train(was_training)
    return np.array(exact, float), np.array(relaxed, float)


@torch.no_grad()
def generate(model, encoder: mm.Encoder, samples: Sequence[mt.Sample], max_new_tokens: int = 12,
             batch_size: int = 64, return_ids: bool = False):
    """Batched greedy decoding (left padding); the text before the first end token, stripped.
    With `return_ids`, also the generated token ids (up to and including the first end token)."""
    was_training = model.training
    model.eval()
    out, ids = [], []
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            b = encoder.prompts(chunk).to(next(model.parameters()).device)
            gen = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=encoder.end_id, pad_token_id=encoder.tok.pad_token_id)
            for row in gen[:, b["input_ids"].shape[1]:].tolist():
                if encoder.end_id in row:
                    row = row[:row.index(encoder.end_id) + 1]
                ids.append(row)
                text_ids = row[:-1] if row and row[-1] == encoder.end_id else row
                out.append(encoder.tok.decode(text_ids, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return (out, ids) if return_ids else out


def evaluate(model, encoder: mm.Encoder, eval_sets: Mapping[str, Sequence[mt.Sample]], batch_size: int = 100
             ) -> dict[str, dict[str, float]]:
    """{task: {"exact": mean strict score, "relaxed": mean relaxed score}} by teacher forcing."""
    res = {}
    for task, samples in eval_sets.items():
        e, r = teacher_forced(model, encoder, samples, batch_size)
        res[task] = {"exact": float(e.mean()), "relaxed": float(r.mean())}
    return res


def summary(result: Mapping[str, Mapping[str, float]], general: Sequence[str] = mt.GENERAL) -> dict:
    """Pre-Avg and the lowest general task of an `evaluate` result, for both scores:
    {"pre_avg_exact", "min_exact", "pre_avg_relaxed", "min_relaxed"}."""
    gen = [t for t in general if t in result]
    out = {}
    for m in ("exact", "relaxed"):
        vals = {t: result[t][m] for t in gen}
        out[f"pre_avg_{m}"] = scores.pre_avg(vals, gen) if vals else float("nan")
        out[f"min_{m}"] = float(np.min(list(vals.values()))) if vals else float("nan")
    return out
