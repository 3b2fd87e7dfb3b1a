"""cgm-train: pre-train, fine-tune, measure curvature and evaluate the miniature models.

    cgm-train pretrain --family llava --seed 0 --threads 1 --out DIR
    cgm-train finetune --base DIR --target corners --out DIR2 --fisher-during
    cgm-train curvature --model DIR --tasks general --out DIR/h_pt.safetensors
    cgm-train evaluate --model DIR

The options of `pretrain` and `finetune` are the fields of `PretrainConfig` and `FinetuneConfig`
(cgm_min.world.training). Each command writes model + processor with save_pretrained and a log.json with the
per-step losses and evaluations; an existing output folder is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

from . import add_config_options, config_from_args, run
from ..cgm import total_curvature
from ..evaluate import decoding
from ..world import models as mm
from ..world import tasks as mt
from ..world import training as tr


def _fmt_scores(scores: Mapping[str, Mapping[str, float]]) -> str:
    return "  ".join(f"{t} {v['exact']:.2f}/{v['relaxed']:.2f}" for t, v in scores.items())


def _fresh(out: str) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty; choose another --out")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cgm-train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pre-train a miniature from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--stop-after", type=int, default=None, help="run only the first N steps of the schedule")
    add_config_options(p, tr.PretrainConfig, skip=("steps",), required=("family",))
    p.add_argument("--steps", type=int, default=None, help=f"default: {tr.DEFAULT_STEPS}")
    f = sub.add_parser("finetune", help="fine-tune the merge set on a target task")
    f.add_argument("--base", required=True, help="folder of the pre-trained model")
    f.add_argument("--out", required=True)
    add_config_options(f, tr.FinetuneConfig, required=("target",), eval_every=25)
    c = sub.add_parser("curvature", help="h_pt (general tasks) or h_ft (a target) of a saved model's merge set")
    c.add_argument("--model", required=True)
    c.add_argument("--tasks", default="general", help="'general' (h_pt) or comma-separated task names")
    c.add_argument("--n-per-task", type=int, default=None,
                   help=f"calibration samples per task (default: {tr.H_PT_SAMPLES} for general, "
                        f"{tr.H_FT_SAMPLES} otherwise)")
    c.add_argument("--n-layers", type=int, default=None)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", required=True, help="output .safetensors file")
    e = sub.add_parser("evaluate", help="held-out scores of a saved model on every task")
    e.add_argument("--model", required=True)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--split", default="heldout", choices=mt.SPLITS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    a = parser().parse_args(argv)
    if a.cmd == "pretrain":
        weights = a.task_weights
        if tuple(a.tasks) != mt.GENERAL and tuple(weights) == tr.default_weights(mt.GENERAL):
            weights = tr.default_weights(a.tasks)          # the default weights of the tasks asked for
        cfg = config_from_args(tr.PretrainConfig, a, steps=a.steps or tr.DEFAULT_STEPS[a.family],
                               task_weights=weights)
        _, _, log = tr.pretrain(cfg, _fresh(a.out), stop_after=a.stop_after)
        if log["evals"]:
            last = log["evals"][-1]
            print(f"step {last['step']}: mean exact {last['pre_avg_exact']:.3f} (min {last['min_exact']:.3f}); "
                  f"{_fmt_scores(last['scores'])}")
        print(f"{len(log['losses'])} steps in {log['time_s']:.0f} s ({1000 * log['step_time_s']:.0f} ms/step)")
    elif a.cmd == "finetune":
        cfg = config_from_args(tr.FinetuneConfig, a)
        out = _fresh(a.out)
        torch.set_num_threads(cfg.threads)
        model, processor = mm.load_family(a.base)
        log, h_ft = tr.finetune(model, processor, cfg)
        mm.save_family(model, processor, out)
        if h_ft is not None:
            tr.save_curvature(h_ft, out / "h_ft.safetensors", {"kind": "h_ft", "tasks": [cfg.target], "during": True,
                                                               "samples_per_step": cfg.fisher_per_step})
        (out / "log.json").write_text(json.dumps(log, indent=1))
        for ev in log["evals"]:
            print(f"step {ev['step']}: Pre-Avg {ev['pre_avg_exact']:.3f} target {ev['scores'][cfg.target]['exact']:.3f}")
    elif a.cmd == "curvature":
        torch.set_num_threads(a.threads)
        general = a.tasks == "general"
        tasks = mt.GENERAL if general else tuple(mt.get_task(t).name for t in a.tasks.split(","))
        if Path(a.out).exists():
            raise FileExistsError(f"{a.out} exists; choose another --out")
        n = a.n_per_task or (tr.H_PT_SAMPLES if general else tr.H_FT_SAMPLES)
        if n < 1:
            raise ValueError(f"--n-per-task must be >= 1, got {n}")
        model, processor = mm.load_family(a.model)
        curv = tr.calibration_fisher(model, processor, tasks, n, a.n_layers, progress=True)
        meta = {"kind": "h_pt" if general else "h_ft", "tasks": list(tasks), "n_per_task": n, "model": str(a.model)}
        print(f"{tr.save_curvature(curv, a.out, meta)}: {len(curv)} tensors, sum {total_curvature(curv):.4g}")
    else:
        torch.set_num_threads(a.threads)
        model, processor = mm.load_family(a.model)
        scores = decoding.evaluate(model, mm.Encoder(processor), mt.eval_set(tuple(mt.TASKS), a.split, a.n))
        print(json.dumps(scores, indent=1))
    return 0


def entry() -> int:
    return run(main)


if __name__ == "__main__":
    raise SystemExit(entry())
