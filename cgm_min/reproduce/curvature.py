"""h_pt at w_pt on the calibration set, over as many processes as `accelerate launch` starts.

    h, meta = measure_h_pt(recipe, model_path, records)       # every process returns the same h

The calibration records are cut into micro batches in a fixed order; process r of W takes batches r, r + W,
... and sums over its samples (the empirical Fisher: `cgm.diag_fisher`'s squared per-sample gradients; or
Hutchinson's v * Hv, `cgm.hutchinson_diag_hessian`, whose probes are seeded by the batch's index, not by the
process, so the estimate does not depend on how many processes share the work). The per-process sums and
sample counts are all-reduced (accelerate.utils.reduce: NCCL on GPUs, gloo on CPUs) and divided once: the
result equals the single-process one up to the order of float32 additions (tests/test_reproduce_chain.py
checks two gloo processes against one). A process's Fisher sum is one `cgm.diag_fisher` call over all its
batches, so one float32 accumulator of the merge set exists per process (`process_sums`,
tests/test_reproduce_curvature.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .. import cgm


def measure_h_pt(recipe, model_path, records: Sequence, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """({in-memory name: h_pt} of the recipe's merge set, metadata). Collective: call it on every process."""
    from accelerate.utils import reduce
    from .chain import process_state
    from ..world import models as mm
    from .finetune import load_published, merge_set_names

    state = process_state()
    cv = recipe.curvature
    model, processor, _ = load_published(model_path, cuda=state.device.type == "cuda")
    model.to(state.device)
    names = merge_set_names(model, recipe.merge_set)
    enc = mm.Encoder(processor)
    chunks = [records[i:i + cv.micro_batch] for i in range(0, len(records), cv.micro_batch)]
    mine = range(state.process_index, len(chunks), state.num_processes)
    sums = process_sums(model, enc, chunks, mine, names, cv, state.device)
    count = torch.tensor(float(sum(len(chunks[j]) for j in mine)), device=state.device)
    if state.num_processes > 1:
        count = reduce(count, "sum")
        sums = {n: reduce(s, "sum") for n, s in sums.items()}
    if count.item() == 0:
        raise ValueError("no calibration samples")
    h = {n: (s / count).cpu() for n, s in sums.items()}
    tasks = sorted({r.task for r in records if getattr(r, "task", None)})
    meta = {"kind": "h_pt", "estimator": "empirical_fisher" if cv.estimator == "fisher" else "hutchinson",
            "samples": int(count.item()), "n_per_task": cv.n_per_task, "tasks": tasks,
            "processes": state.num_processes, **({"probes": cv.probes} if cv.estimator == "hutchinson" else {})}
    return h, meta


def process_sums(model, enc, chunks: Sequence[Sequence], mine: Sequence[int], names: Sequence[str], cv,
                 device) -> dict[str, torch.Tensor]:
    """{name: the sum over this process's samples} of the estimate, for the batches `chunks[j]`, j in `mine`,
    in one float32 buffer per tensor. The Fisher is one `cgm.diag_fisher` call over all of them (its mean
    times the sample count; batches encoded as it reaches them), so its accumulator is the only full-size
    buffer; Hutchinson's probes are seeded per batch, one call each, added into the first call's result."""
    batches = (enc.batch(chunks[j]).to(device) for j in mine)
    n = sum(len(chunks[j]) for j in mine)
    params = dict(model.named_parameters())
    if n == 0:                                   # more processes than batches
        return {k: torch.zeros(params[k].shape, dtype=torch.float32, device=device) for k in names}
    if cv.estimator == "fisher":
        sums = cgm.diag_fisher(model, batches, names, progress=False)
        for h in sums.values():
            h.mul_(n)
        return sums
    sums = None
    for j, batch in zip(mine, batches):
        est = cgm.hutchinson_diag_hessian(model, [batch], cv.probes, names, seed=cv.seed * 1_000_003 + j,
                                          progress=False)
        for h in est.values():
            h.mul_(len(chunks[j]))
        if sums is None:
            sums = est
        else:
            for k in names:
                sums[k] += est[k]
        del est
    return sums


def calibration_records(records: Sequence, n_per_task: int, tasks: Sequence[str]) -> list:
    """The first `n_per_task` records of each of `tasks` (the recipe's general suite) in the calibration set;
    one-line error when a task has too few."""
    by_task: dict[str, list] = {}
    for r in records:
        by_task.setdefault(r.task or "", []).append(r)
    short = [f"{t} ({len(by_task.get(t, []))})" for t in tasks if len(by_task.get(t, [])) < n_per_task]
    if short:
        raise ValueError(f"the calibration set has fewer than {n_per_task} samples of {', '.join(short)}; "
                         f"prepare it with these tasks (data_scripts)")
    return [r for t in tasks for r in by_task[t][:n_per_task]]


def write_h_pt(h, meta, model_path, out_dir: Path) -> Path:
    """h_pt in the model's shard layout; the model's files are hashed through cgm-merge's hash cache, so the
    chain's merges do not hash them again."""
    from ..io.curvature_files import write_curvature
    return write_curvature(h, model_path, out_dir, meta, hash_cache=True)
