"""Speed of the miniature world against its budgets, measured side by side in one process.

    .venv/bin/python benchmarks/mini_world.py                 # both families, 2 repeats
    .venv/bin/python benchmarks/mini_world.py --family qwen --repeats 3 --threads 1,2

Budgets (the issue that defines the miniature world): one model on all miniature tasks through lmms-eval in
at most 30 s, one fine-tuning run of the merge set in at most 3 minutes, both on 2 CPU cores. Printed per
family, as the median over repeats:

  eval      evaluate_lmms on every task x 200 held-out samples; "first" includes building lmms-eval's task
            objects, "repeat" is the next call after swap_weights (what a merge sweep pays per model)
  reload    loading the checkpoint from disk again, against swap_weights: why a sweep keeps one model
  finetune  200 steps on `corners` at the family's learning rate, without and with h_ft accumulation
            (fisher_during), at each thread count

Each line gives the time and its ratio to the budget (or to the line it is compared with). Run it on an
otherwise idle machine (`uptime`), never next to a training run: the numbers are wall-clock times.
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

from cgm_min.evaluate import lmms_adapter as la  # noqa: E402
from cgm_min.world import models as mm  # noqa: E402
from cgm_min.world import tasks as mt  # noqa: E402
from cgm_min import pipeline  # noqa: E402
from cgm_min.world import training as tr  # noqa: E402

EVAL_BUDGET_S = 30.0
FINETUNE_BUDGET_S = 180.0


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build_data(out: Path) -> Path:
    return pipeline.load_data_script("build_mini_data").build(out, n_heldout=200, n_calibration=0, verbose=False)


def bench_family(fam: str, data: Path, repeats: int, threads: list[int], steps: int) -> None:
    path = mm.shipped_checkpoint(fam)
    torch.set_num_threads(threads[0])
    base, proc = mm.load_family(path)
    t0 = time.perf_counter()
    adapter = la.CGMMini(model=copy.deepcopy(base), processor=proc)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    la.evaluate_lmms(adapter, list(mt.TASKS), include_path=data)
    first += time.perf_counter() - t0
    state = base.state_dict()
    swap_s, _ = timed(lambda: adapter.swap_weights(state), repeats)
    repeat_s, _ = timed(lambda: la.evaluate_lmms(adapter, list(mt.TASKS), include_path=data), repeats)
    reload_s, _ = timed(lambda: mm.load_family(path), repeats)
    print(f"[{fam}] eval all {len(mt.TASKS)} tasks x 200, first call  {first:6.1f} s   "
          f"= {first / EVAL_BUDGET_S:.2f} x budget ({EVAL_BUDGET_S:.0f} s)")
    print(f"[{fam}] eval all {len(mt.TASKS)} tasks x 200, repeat call {repeat_s:6.1f} s   "
          f"= {repeat_s / EVAL_BUDGET_S:.2f} x budget")
    print(f"[{fam}] swap_weights {1000 * swap_s:.1f} ms vs reload from disk {1000 * reload_s:.1f} ms: "
          f"reload / swap = {reload_s / swap_s:.0f}")
    for n in threads:
        torch.set_num_threads(n)
        res = {}
        for during in (False, True):
            cfg = tr.FinetuneConfig(target="corners", steps=steps, threads=n,
                                    fisher_during=during)
            res[during], _ = timed(lambda: tr.finetune(copy.deepcopy(base), proc, cfg, progress=False), repeats)
        print(f"[{fam}] finetune {steps} steps, {n} thread(s): {res[False]:6.1f} s plain, {res[True]:6.1f} s with "
              f"h_ft accumulation (x{res[True] / res[False]:.2f}); = {res[True] / FINETUNE_BUDGET_S:.2f} x budget "
              f"({FINETUNE_BUDGET_S:.0f} s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=mm.FAMILIES, action="append", help="default: both")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts for fine-tuning")
    ap.add_argument("--steps", type=int, default=tr.FinetuneConfig.steps)
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.steps < 1:
        ap.error("--repeats and --steps must be at least 1")
    threads = [int(t) for t in a.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(Path(tmp) / "mini_data")
        for fam in a.family or mm.FAMILIES:
            bench_family(fam, data, a.repeats, threads, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
