"""cgm-reproduce: the whole chain of a recipe (data, finetune, curvature, merge, evaluate, results), resumable.

    python -m cgm_min.cli.reproduce RECIPE.yaml --out runs/NAME               every step not yet done
    python -m cgm_min.cli.reproduce RECIPE.yaml --out runs/NAME --step merge  one step (its inputs must be done)
    python -m cgm_min.cli.reproduce RECIPE.yaml --dry-run                     the plan: GPU-hours, memory per step
    accelerate launch --num_processes 4 -m cgm_min.cli.reproduce RECIPE.yaml --out runs/NAME
                                                                              fine-tuning and h_pt on 4 GPUs

What each step writes: `cgm_min.reproduce.chain`. Bad input (a recipe error, a missing model, data folder or
GPU for a paper recipe, a step whose inputs are missing) ends in one line "error: ..." and exit status 2,
before any work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from . import add_config_options, config_from_args, run


@dataclass
class ReproduceOptions:
    out: str = field(default="", metadata={"help": "output folder of the chain (default runs/<recipe name>)"})
    step: str = field(default="", metadata={"help": "run only this step: data, finetune, curvature, merge, "
                                                    "evaluate, results"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan with its estimated cost; run nothing"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cgm-reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML file (recipes/*.yaml)")
    add_config_options(p, ReproduceOptions)
    args = p.parse_args(argv)
    opts = config_from_args(ReproduceOptions, args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from ..reproduce.chain import STEPS, run_chain
    from ..reproduce.recipes import load_recipe
    if opts.step and opts.step not in STEPS:
        raise ValueError(f"unknown step {opts.step!r}; steps: {', '.join(STEPS)}")
    recipe = load_recipe(args.recipe, check_paths=not opts.dry_run)
    if opts.dry_run:
        from ..reproduce.costs import plan_text
        print(plan_text(recipe))
        return 0
    if opts.threads:
        import torch
        torch.set_num_threads(opts.threads)
    out = opts.out or os.path.join("runs", recipe.name)
    run_chain(recipe, out, [opts.step] if opts.step else None)
    return 0


def entry() -> None:
    code = run(main)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
