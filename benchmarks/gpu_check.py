"""GPU check of the paper preset's chain, on the shipped miniatures (minutes, not GPU-days).

    python benchmarks/gpu_check.py                      # on CUDA: bf16, about 2-5 minutes, well under 10
    python benchmarks/gpu_check.py --device cpu         # the same measurements on the CPU (fp32)
    python benchmarks/gpu_check.py --out gpu_check.json # also write the figures as JSON

What it measures, on the device:
  1. the throughput cost of accumulating h_ft during fine-tuning: `reproduce.finetune.hft_overhead`, plain
     training and training with h_ft side by side (alternating runs from the same weights, the first step
     of each run not counted, medians over the rest), at the recipe's micro batch (4: h_ft splits each
     micro batch into single-sample passes) and at micro batch 1 (h_ft only adds the squaring hooks: the
     paper's setting, where it reports 3.81 -> 3.51 samples/s, about 8 %);
  2. the whole tiny chain (`recipes/tiny-llava-corners.yaml`) into a temporary folder: the seconds of each
     step (data, fine-tuning with h_ft, h_pt, the two cgm-merge runs, evaluation, results table).
It prints one table and the device, torch and transformers versions. A machine without CUDA asked for
--device cuda stops with one line (exit status 2) before any work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-llava-corners.yaml"))
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each mode")
    p.add_argument("--out", default="", help="write the figures as JSON here too")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import transformers
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no GPU: torch.cuda.is_available() is False (use --device cpu to measure on the CPU)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from cgm_min.reproduce.chain import STEPS, run_chain
    from cgm_min.reproduce.data import read_split
    from cgm_min.reproduce.finetune import hft_overhead
    from cgm_min.reproduce.recipes import load_recipe
    if args.device == "cpu":
        torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": "bf16 autocast" if args.device == "cuda" else "float32", "recipe": recipe.name}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_chain(recipe, Path(tmp) / "chain", log=lambda *a: None)
        report["chain_seconds"] = time.perf_counter() - t0
        report["steps"] = {s: json.loads((Path(tmp) / "chain" / s / "done.json").read_text())["seconds"]
                           for s in STEPS}
        records = read_split(Path(tmp) / "chain" / "data", recipe.target, "train")
        model = Path(recipe.model)
        report["h_ft_overhead"] = {}
        for micro in (recipe.finetune.micro_batch, 1):
            r = replace(recipe, finetune=replace(recipe.finetune, micro_batch=micro))
            report["h_ft_overhead"][f"micro_batch {micro}"] = hft_overhead(r, model, records, args.steps,
                                                                          args.repeats, out_dir=Path(tmp) / "ovh")
    print(f"{report['device']}  torch {report['torch']}  transformers {report['transformers']}  {report['dtype']}")
    print(f"tiny chain ({recipe.name}): {report['chain_seconds']:.1f} s in all")
    for s, sec in report["steps"].items():
        print(f"  {s:<10} {sec:8.2f} s")
    print("h_ft accumulation during fine-tuning (median optimizer-step time, global batch "
          f"{recipe.finetune.global_batch}):")
    for k, o in report["h_ft_overhead"].items():
        m = o["median_step_s"]
        print(f"  {k:<13} plain {m['plain'] * 1e3:8.1f} ms  with h_ft {m['h_ft'] * 1e3:8.1f} ms  "
              f"cost {100 * o['overhead']:+.1f} %  ({o['steps_each']['plain']} + {o['steps_each']['h_ft']} steps)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
