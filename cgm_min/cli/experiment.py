"""cgm-experiment: the merge experiment from the command line (the notebook of the merge chapter calls the
same functions).

    cgm-experiment methods                                   # the registry: rules, hyperparameters, needs
    cgm-experiment run --family llava --target corners --seeds 0,1,2 --out results.parquet
    cgm-experiment run --regime long --family llava --target corners --grid small --out long.parquet
    cgm-experiment summary results.parquet                   # held-out table and paired differences

`run` fine-tunes what the cache (--cache, default build/cache) does not hold, sweeps every method on the
validation split, scores the chosen merges on the held-out split and writes the results table. Bad input
(an unknown family, target, regime, method or curvature kind, a results file with the wrong schema, an
existing output) ends in one line "error: ..." and exit status 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from . import run as run_cli

ROOT = Path(__file__).resolve().parents[2]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    from ..experiments import regimes, runs, sweep
    ap = argparse.ArgumentParser(prog="cgm-experiment", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list the registered merge methods")
    r = sub.add_parser("run", help="fine-tune, sweep and score; write the results table")
    r.add_argument("--family", required=True, help="llava or qwen")
    r.add_argument("--target", required=True, help="a target task (corners, colour_code, caption)")
    r.add_argument("--seeds", type=_ints, default=[0], help="fine-tuning seeds, comma-separated (default 0)")
    r.add_argument("--regime", default="default", help=f"one of {list(regimes.REGIMES)}")
    r.add_argument("--kinds", default="fisher_during", help=f"curvature kinds, comma-separated: "
                   f"{list(runs.CURVATURE_KINDS)} (the first gets every method)")
    r.add_argument("--grid", default="full", help=f"one of {list(sweep.GRID_SIZES)}")
    r.add_argument("--methods", default=None, help="comma-separated registry names (default: all gridded)")
    r.add_argument("--positive-control", action="store_true", help="also run the planted positive control")
    r.add_argument("--n-validation", type=int, default=sweep.SweepConfig.n_validation)
    r.add_argument("--n-heldout", type=int, default=sweep.SweepConfig.n_heldout)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--cache", default=str(ROOT / "build" / "cache"))
    r.add_argument("--out", required=True, help="results table to write (.parquet); must not exist")
    s = sub.add_parser("summary", help="held-out summary and paired differences of a results table")
    s.add_argument("table", nargs="+")
    s.add_argument("--n-boot", type=int, default=1000)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import pandas as pd
    from .. import merge
    from ..experiments import analysis, engine, regimes, results, runs, sweep
    a = parser().parse_args(argv)
    pd.set_option("display.width", 200)
    if a.cmd == "methods":
        print(merge.methods_table()[["family", "rule", "hyperparameters", "needs"]].to_string())
        return 0
    if a.cmd == "summary":
        table = results.read_table(a.table)
        for s in analysis.settings(table):
            print(f"\n{s['regime']} | {s['family']} | {s['target']} | {s['curvature']}")
            print(analysis.heldout_summary(table, s).to_string())
        comp = analysis.comparisons(table, n_boot=a.n_boot)
        if not comp.empty:
            print("\n" + comp[["regime", "family", "target", "curvature", "variant", "against", "mean", "ci_low",
                               "ci_high", "verdict"]].to_string(index=False))
        return 0
    out = Path(a.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    if out.suffix != ".parquet":
        raise ValueError(f"--out must be a .parquet file, got {out.name}")
    kinds = tuple(a.kinds.split(","))
    for k in kinds:
        if k not in runs.CURVATURE_KINDS:
            raise ValueError(f"unknown curvature kind {k!r}; known: {list(runs.CURVATURE_KINDS)}")
    if a.grid not in sweep.GRID_SIZES:
        raise ValueError(f"unknown grid {a.grid!r}; known: {list(sweep.GRID_SIZES)}")
    methods = None if a.methods is None else a.methods.split(",")
    if methods is not None:
        for m in methods:
            merge.get_method(m)
        sweep.grid(a.grid, methods)              # refuses methods without a grid
    if a.workers < 1 or a.n_validation < 1 or a.n_heldout < 1:
        raise ValueError("--workers, --n-validation and --n-heldout must be >= 1")
    jobs = [engine.Job(regimes.spec_for(a.regime, a.family, a.target, s), regime=a.regime, kinds=kinds, grid=a.grid,
                       positive_control=a.positive_control and i == 0) for i, s in enumerate(a.seeds)]
    cfg = sweep.SweepConfig(n_validation=a.n_validation, n_heldout=a.n_heldout)
    table = engine.run_jobs(jobs, a.cache, cfg, workers=a.workers, methods=methods)
    results.write_table(table, out)
    print(f"{out}: {len(table)} rows ({int((table['split'] == 'validation').sum())} validation merges)")
    return 0


def entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    raise SystemExit(entry())
