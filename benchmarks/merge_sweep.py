"""Speed of one step of a merge sweep, measured side by side in one process on one thread.

    .venv/bin/python benchmarks/merge_sweep.py                     # both families, 5 repeats
    .venv/bin/python benchmarks/merge_sweep.py --family qwen --repeats 9 --n 64

A sweep scores hundreds of merged models, so the budget is: scoring one merged model on the validation split
of every task (the eight general tasks and the target, --n samples each) in at most 1 second on one thread.
Printed per family, medians over repeats (min-max in brackets):

  fast       evaluate.fast.FastScorer.score(): the precomputed teacher-forced score the sweeps use
  decoding   evaluate.decoding.evaluate(): teacher forcing through the whole model (the slow reference path)
  lmms-eval  evaluate.lmms_adapter.evaluate_lmms() on the same samples: greedy decoding through lmms-eval,
             what the miniature chapter used to score every model (and what re-scores the chosen merges)
  merge      merge_state of the merge set for a few methods (what each grid point pays before scoring)

with the ratio of each slow path to the fast one. The fast and slow scores are checked to be equal.
Run it on an otherwise idle machine (`uptime`), never next to a training run: these are wall-clock times.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cgm_min import merge  # noqa: E402
from cgm_min.evaluate import decoding  # noqa: E402
from cgm_min.evaluate import lmms_adapter as la  # noqa: E402
from cgm_min.evaluate.fast import FastScorer  # noqa: E402
from cgm_min.world import models as mm  # noqa: E402
from cgm_min.world import tasks as mt  # noqa: E402
from cgm_min import pipeline  # noqa: E402

BUDGET_S = 1.0


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times):7.3f} s [{min(times):.3f}-{max(times):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=mm.FAMILIES, action="append")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=64, help="validation samples per task (the sweeps' default)")
    ap.add_argument("--target", default="corners")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging
    logging.disable_progress_bar()
    tasks = (*mt.GENERAL, a.target)
    # the held-out samples stand in for the validation split here: the same number of samples per task, and
    # the lmms-eval tasks are built on the held-out split
    sets = mt.eval_set(tasks, "heldout", a.n)
    print(f"one thread; {len(tasks)} tasks x {a.n} samples; medians of {a.repeats} [min-max]")
    with tempfile.TemporaryDirectory() as tmp:
        data = pipeline.load_data_script("build_mini_data").build(Path(tmp) / "data", n_heldout=a.n, n_calibration=0,
                                                                  tasks=list(tasks), verbose=False)
        for fam in a.family or list(mm.FAMILIES):
            model, processor = mm.load_family(mm.shipped_checkpoint(fam))
            names = mm.merge_param_names(model)
            g = torch.Generator().manual_seed(0)
            w_pt = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
            w_ft = {n: w + 0.01 * torch.randn(w.shape, generator=g) for n, w in w_pt.items()}
            h_pt = {n: torch.rand(w.shape, generator=g) for n, w in w_pt.items()}
            h_ft = {n: torch.rand(w.shape, generator=g) for n, w in w_pt.items()}
            merged = merge.merge_state("cgm", w_pt, w_ft, h_pt, h_ft, alpha=1.0)
            t0 = time.perf_counter()
            scorer = FastScorer(copy.deepcopy(model), processor, sets)
            setup = time.perf_counter() - t0
            scorer.load(merged)
            model.load_state_dict(merged, strict=False)
            fast_t, fast = timed(scorer.score, a.repeats)
            enc = mm.Encoder(processor)
            slow_t, slow = timed(lambda: decoding.evaluate(model, enc, sets), a.repeats)
            same = all(abs(fast[t]["exact"].mean() - slow[t]["exact"]) < 1e-12 for t in tasks)
            rows = [("fast (sweeps)", fast_t), ("decoding (teacher forcing)", slow_t)]
            adapter = la.CGMMini(model=model, processor=processor)
            la.evaluate_lmms(adapter, list(tasks), include_path=data)          # builds lmms-eval's task objects
            lm_t, _ = timed(lambda: la.evaluate_lmms(adapter, list(tasks), include_path=data), max(1, a.repeats // 2))
            rows.append(("lmms-eval (greedy decoding)", lm_t))
            print(f"\n{fam}: FastScorer set-up {setup:.2f} s (once per sweep); scores equal: {same}")
            base = statistics.median(fast_t)
            for label, t in rows:
                ratio = statistics.median(t) / base
                print(f"  {label:28s} {fmt(t)}   x{ratio:5.1f} of fast")
            print(f"  budget {BUDGET_S:.1f} s per merged model: fast uses {base / BUDGET_S:.2f} of it "
                  f"({'within' if base <= BUDGET_S else 'OVER'} budget)")
            for method, hp in (("linear", {"lam": 0.5}), ("cgm", {"alpha": 1.0}),
                               ("cgm_dagger", {"alpha": 1.0, "k": 0.3}), ("magnitude", {"k": 0.3}),
                               ("random_revert", {"k": 0.3})):
                curv = (h_pt, h_ft) if merge.get_method(method).uses_curvature else (None, None)
                t, _ = timed(lambda: merge.merge_state(method, w_pt, w_ft, *curv, names=names, **hp), a.repeats)
                print(f"  merge {method:22s} {fmt(t)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
