"""Training and evaluation of the miniature LLaVA-1.5 / Qwen2.5-VL models, on CPU, deterministic for a seed.

  pretrain   from scratch on the general tasks (the miniature analogue of downloading llava-1.5-7b)
  finetune   only the merge set (last half of the decoder layers + projector) on one target task, optionally
             accumulating h_ft (the empirical Fisher of the merge set) along the way, as the paper does
  curvature  h_pt (8 calibration samples per general task) or h_ft (a target) of a saved model's merge set
  evaluate   teacher-forced: one forward pass per batch; a sample is an exact match when the argmax at
             every answer position (answer tokens + end token) is the reference token, which is exactly
             when greedy decoding would emit the answer and stop. `generate` is the real batched greedy
             decoding, to confirm the two agree.

Command line (writes model + processor with save_pretrained, and log.json with the per-step losses and
held-out scores):

    python -m cgm_min.training pretrain --family llava --seed 0 --out DIR --threads 1
    python -m cgm_min.training finetune --base DIR --target corners --out DIR2 --fisher-during
    python -m cgm_min.training curvature --model DIR --tasks general --out DIR/h_pt.safetensors
    python -m cgm_min.training evaluate --model DIR

Determinism: model initialisation comes from `torch.manual_seed(seed)`, the data of step t from
`numpy.random.default_rng([seed, t, ...])`, and no layer uses dropout; at a fixed number of threads two
runs give identical losses. The learning-rate schedule's warm-up does not depend on the total number of
steps, so `--stop-after 20` reproduces the first 20 losses of a long run.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import mini_models as mm
from . import mini_tasks as mt
from .cgm import diag_fisher, total_curvature
from .report import atomic_write

# ----------------------------------------------------------------------------------------------
# Data streams.


def train_batch(tasks: Sequence[str], step: int, batch_size: int, seed: int, stream: str = "pretrain",
                weights: Sequence[float] | None = None, world_seed: int = 0, first_index: int = 0
                ) -> list[mt.Sample]:
    """The samples of training step `step`: tasks drawn (with `weights`) from a generator seeded by
    (seed, stream, step); sample indices first_index + step*batch_size + j of each task's train split
    (fresh samples)."""
    rng = np.random.default_rng([int(seed), mt.stable_hash(stream), int(step)])
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    picks = rng.choice(len(tasks), size=batch_size, p=p)
    return [mt.make_sample(tasks[k], "train", first_index + step * batch_size + j, world_seed)
            for j, k in enumerate(picks)]


def batches(encoder: mm.Encoder, samples: Sequence[mt.Sample], batch_size: int):
    for i in range(0, len(samples), batch_size):
        yield encoder.batch(samples[i:i + batch_size])


# ----------------------------------------------------------------------------------------------
# Evaluation.


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


def summary(scores: Mapping[str, Mapping[str, float]], general: Sequence[str] = mt.GENERAL) -> dict:
    gen = [t for t in general if t in scores]
    out = {}
    for m in ("exact", "relaxed"):
        vals = [scores[t][m] for t in gen]
        out[f"pre_avg_{m}"] = float(np.mean(vals)) if vals else float("nan")
        out[f"min_{m}"] = float(np.min(vals)) if vals else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# Optimisation.


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps (independent of `total`), then cosine decay to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# The slowest skills (shape, and reading handwritten digits) get 1.5 times the share of the batch, the two
# quickest (position, count: learned by step ~1000) half of it.
DEFAULT_WEIGHTS = {"colour": 1.0, "shape": 1.5, "position": 0.5, "presence": 1.0, "count": 0.5, "addition": 1.0,
                   "choice": 1.0, "digit": 1.5}
# Steps that fit the 40-minute budget of one single-thread run per family on the reference 2-core machine.
DEFAULT_STEPS = {"llava": 6000, "qwen": 4500}


def default_weights(tasks: Sequence[str]) -> tuple:
    return tuple(DEFAULT_WEIGHTS.get(t, 1.0) for t in tasks)


@dataclass
class PretrainConfig:
    family: str = "llava"
    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.01
    clip: float = 1.0
    size: str = "small"
    tasks: tuple = mt.GENERAL
    task_weights: tuple | None = field(default_factory=lambda: default_weights(mt.GENERAL))
    eval_every: int = 500
    eval_n: int = 200
    threads: int = 1
    world_seed: int = 0
    vocab_size: int = 1024
    device: str = "cpu"


def _versions() -> dict:
    import transformers
    import tokenizers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, stop_after: int | None = None,
             progress: bool = True, model=None, processor=None):
    """Pre-train a miniature from scratch on cfg.tasks. Returns (model, processor, log).

    `stop_after` ends the run early without changing the schedule (to reproduce a long run's first steps).
    With `out`, saves model + processor (save_pretrained) and log.json there.
    """
    torch.set_num_threads(cfg.threads)
    if processor is None:
        processor = mm.build_processor(cfg.family, vocab_size=cfg.vocab_size)
    if model is None:
        model = mm.build_model(cfg.family, processor, size=cfg.size, seed=cfg.seed)
    model.to(cfg.device)
    enc = mm.Encoder(processor, cfg.family)
    eval_sets = mt.eval_set(cfg.tasks, "heldout", cfg.eval_n, cfg.world_seed) if cfg.eval_every else {}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    n_steps = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    log = {"config": asdict(cfg), "versions": _versions(), "n_params": mm.n_params(model), "losses": [],
           "evals": [], "stop_after": stop_after}
    model.train()
    t0 = time.perf_counter()
    t_train = 0.0
    bar = tqdm(range(n_steps), desc=f"pretrain {cfg.family}", disable=not progress, mininterval=10)
    for step in bar:
        ts = time.perf_counter()
        samples = train_batch(cfg.tasks, step, cfg.batch_size, cfg.seed, "pretrain", cfg.task_weights, cfg.world_seed)
        b = enc.batch(samples).to(cfg.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        t_train += time.perf_counter() - ts
        log["losses"].append(float(loss.item()))
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == n_steps):
            scores = evaluate(model, enc, eval_sets)
            rec = {"step": step + 1, "time_s": time.perf_counter() - t0, "scores": scores, **summary(scores, cfg.tasks)}
            log["evals"].append(rec)
            bar.set_postfix(loss=f"{np.mean(log['losses'][-50:]):.3f}", mean=f"{rec['pre_avg_exact']:.2f}",
                            min=f"{rec['min_exact']:.2f}")
            if out is not None:      # the log so far, so that an interrupted run leaves its curves
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / "log.json").write_text(json.dumps(log))
    log["time_s"] = time.perf_counter() - t0
    log["step_time_s"] = t_train / max(1, n_steps)
    model.eval()
    if out is not None:
        out = Path(out)
        mm.save_family(model.cpu() if cfg.device != "cpu" else model, processor, out)
        model.to(cfg.device)
        (out / "log.json").write_text(json.dumps(log, indent=1))
    return model, processor, log


# ----------------------------------------------------------------------------------------------
# Fine-tuning.


# Fine-tuning seed s trains on its own block of target samples: indices from s * SEED_STRIDE on.
SEED_STRIDE = 1_000_000


@dataclass
class FinetuneConfig:
    """Defaults: the target is learned by step 50-100. The learning rate was chosen on the shipped bases
    (target `corners`, seed 0, 200 steps) for a clear but graded loss of general skills; Pre-Avg lost:
    LLaVA 3e-4 -20 points, 5e-4 -24, 1e-3 -39; Qwen 3e-4 -12, 5e-4 -23, 1e-3 -52 (colour down to 0.09)."""
    target: str = "corners"
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    n_layers: int | None = None        # default: half of the decoder layers
    fisher_during: bool = False        # accumulate h_ft along the fine-tuning trajectory
    fisher_per_step: int = 4           # per-sample gradients per step for h_ft (the first ones of the batch)
    eval_every: int = 0
    eval_n: int = 100
    threads: int = 1
    world_seed: int = 0
    eval_tasks: tuple = field(default_factory=lambda: mt.GENERAL)


def finetune(model, processor, cfg: FinetuneConfig, progress: bool = True):
    """Fine-tune the merge set of `model` in place on cfg.target. Returns (log, h_ft or None).

    Only `merge_param_names(model, cfg.n_layers)` are trained. With `fisher_during`, h_ft is the mean
    squared per-sample gradient (empirical Fisher, `cgm.diag_fisher`) of the merge set over
    `fisher_per_step` samples of every step, taken before that step's update.
    """
    torch.set_num_threads(cfg.threads)
    enc = mm.Encoder(processor)
    names = mm.merge_param_names(model, cfg.n_layers)
    chosen = set(names)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in chosen)
    train_params = [params[n] for n in names]
    opt = torch.optim.AdamW(train_params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    eval_sets = mt.eval_set(tuple(cfg.eval_tasks) + (cfg.target,), "heldout", cfg.eval_n, cfg.world_seed) \
        if cfg.eval_every else {}
    h_sum, h_count = None, 0
    log = {"config": asdict(cfg), "merge_names": names, "losses": [], "evals": []}
    t0 = time.perf_counter()
    model.train()
    try:
        for step in tqdm(range(cfg.steps), desc=f"finetune {cfg.target}", disable=not progress, mininterval=10):
            samples = train_batch((cfg.target,), step, cfg.batch_size, cfg.seed, f"finetune/{cfg.target}",
                                  world_seed=cfg.world_seed, first_index=cfg.seed * SEED_STRIDE)
            dev = next(model.parameters()).device
            b = enc.batch(samples).to(dev)
            if cfg.fisher_during and cfg.fisher_per_step > 0:
                sub = enc.batch(samples[:cfg.fisher_per_step]).to(dev)
                f = diag_fisher(model, [sub], names, progress=False)
                m = min(cfg.fisher_per_step, len(samples))
                h_sum = {n: v * m for n, v in f.items()} if h_sum is None else {n: h_sum[n] + f[n] * m for n in f}
                h_count += m
                model.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_params, cfg.clip)
            opt.step()
            log["losses"].append(float(loss.item()))
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                scores = evaluate(model, enc, eval_sets)
                log["evals"].append({"step": step + 1, "scores": scores, **summary(scores, cfg.eval_tasks)})
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.eval()
    log["time_s"] = time.perf_counter() - t0
    h_ft = None if h_sum is None else {n: v / h_count for n, v in h_sum.items()}
    return log, h_ft


def fisher_batches(processor, tasks: Sequence[str], n_per_task: int, split: str = "calibration",
                   batch_size: int = 16, world_seed: int = 0):
    """Batches of `n_per_task` samples of each task's `split`, for cgm.diag_fisher (h_pt: 8 calibration
    samples per general task, the paper's choice)."""
    enc = mm.Encoder(processor)
    samples = [s for t in tasks for s in mt.make_samples(t, split, n_per_task, world_seed=world_seed)]
    return list(batches(enc, samples, batch_size))


# ----------------------------------------------------------------------------------------------
# Curvature of the merge set, saved as safetensors.

H_PT_SAMPLES = 8        # calibration samples per general task for h_pt (the paper's choice)
H_FT_SAMPLES = 64       # target calibration samples for h_ft measured at w_ft (when not accumulated in training)


def calibration_fisher(model, processor, tasks: Sequence[str], n_per_task: int, n_layers: int | None = None,
                       world_seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal (`cgm.diag_fisher`) of the merge set at the model's current weights,
    from `n_per_task` calibration samples of each task. h_pt: the pre-trained model on the general tasks
    (H_PT_SAMPLES each); h_ft: the fine-tuned model on its target (or accumulated by `finetune`)."""
    names = mm.merge_param_names(model, n_layers)
    return diag_fisher(model, fisher_batches(processor, tasks, n_per_task, world_seed=world_seed), names,
                       progress=progress)


def save_curvature(curv: Mapping[str, torch.Tensor], path: str | Path, meta: Mapping[str, object] | None = None
                   ) -> Path:
    """Write a curvature dict as safetensors (with `meta` as JSON strings in the header). Refuses NaN,
    Inf and negative entries; writes a temporary file and renames it, so `path` is never half written."""
    from safetensors.torch import save_file
    for name, h in curv.items():
        if not torch.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"save_curvature: {name} has NaN, Inf or negative entries")
    tensors = {n: h.detach().float().contiguous() for n, h in curv.items()}
    header = {k: json.dumps(v) for k, v in (meta or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_curvature(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(curvature dict, metadata) from `save_curvature`'s file."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no curvature file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {n: f.get_tensor(n) for n in f.keys()}, meta


def curvature_by_module(curv: Mapping[str, torch.Tensor]) -> "pd.DataFrame":
    """One row per merge-set tensor: block ("layer 3", "projector"), module (q_proj, ..., down_proj,
    input_layernorm, ...), number of entries, and the sum and mean of the curvature: where it concentrates."""
    import pandas as pd
    rows = []
    for name, h in curv.items():
        owner, kind = name.rsplit(".", 1)            # e.g. "...layers.3.mlp.down_proj", "weight"
        block = (f"layer {int(name[len(mm.LAYER_PREFIX):].split('.', 1)[0])}" if name.startswith(mm.LAYER_PREFIX)
                 else "projector")
        rows.append({"name": name, "block": block, "module": owner.split(".")[-1], "kind": kind,
                     "n": h.numel(), "sum": float(h.double().sum()), "mean": float(h.double().mean())})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Command line.


def _fmt_scores(scores: Mapping[str, Mapping[str, float]]) -> str:
    return "  ".join(f"{t} {v['exact']:.2f}/{v['relaxed']:.2f}" for t, v in scores.items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cgm_min.training", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="pre-train a miniature from scratch")
    p.add_argument("--family", choices=mm.FAMILIES, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None, help=f"default: {DEFAULT_STEPS}")
    p.add_argument("--stop-after", type=int, default=None, help="run only the first N steps of the schedule")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--warmup", type=int, default=PretrainConfig.warmup)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--size", default="small", choices=list(mm.SIZES))
    p.add_argument("--tasks", default=",".join(mt.GENERAL))
    p.add_argument("--weights", default=None, help="comma-separated task weights (default: DEFAULT_WEIGHTS; "
                   "'uniform' for equal weights)")
    p.add_argument("--eval-every", type=int, default=PretrainConfig.eval_every)
    p.add_argument("--eval-n", type=int, default=PretrainConfig.eval_n)
    p.add_argument("--device", default="cpu", help="torch device (the shipped weights are trained on cpu)")
    f = sub.add_parser("finetune", help="fine-tune the merge set on a target task")
    f.add_argument("--base", required=True)
    f.add_argument("--target", required=True, choices=list(mt.TASKS))
    f.add_argument("--out", required=True)
    f.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    f.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--n-layers", type=int, default=None)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--eval-every", type=int, default=25)
    f.add_argument("--eval-n", type=int, default=100)
    f.add_argument("--fisher-during", action="store_true", help="accumulate h_ft during fine-tuning (h_ft.safetensors)")
    c = sub.add_parser("curvature", help="h_pt (general tasks) or h_ft (a target) of a saved model's merge set")
    c.add_argument("--model", required=True)
    c.add_argument("--tasks", default="general", help="'general' (h_pt) or comma-separated task names")
    c.add_argument("--n-per-task", type=int, default=None,
                   help=f"calibration samples per task (default: {H_PT_SAMPLES} for general, {H_FT_SAMPLES} otherwise)")
    c.add_argument("--n-layers", type=int, default=None)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", required=True, help="output .safetensors file")
    e = sub.add_parser("evaluate", help="held-out scores of a saved model on every task")
    e.add_argument("--model", required=True)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--split", default="heldout", choices=mt.SPLITS)
    a = ap.parse_args(argv)

    if a.cmd == "pretrain":
        tasks = tuple(a.tasks.split(","))
        weights = (default_weights(tasks) if a.weights is None else None if a.weights == "uniform"
                   else tuple(float(w) for w in a.weights.split(",")))
        cfg = PretrainConfig(family=a.family, seed=a.seed, steps=a.steps or DEFAULT_STEPS[a.family], lr=a.lr,
                             warmup=a.warmup, batch_size=a.batch_size, size=a.size, tasks=tasks, task_weights=weights,
                             eval_every=a.eval_every, eval_n=a.eval_n, threads=a.threads, device=a.device)
        _, _, log = pretrain(cfg, a.out, stop_after=a.stop_after)
        if log["evals"]:
            last = log["evals"][-1]
            print(f"step {last['step']}: mean exact {last['pre_avg_exact']:.3f} (min {last['min_exact']:.3f}); "
                  f"{_fmt_scores(last['scores'])}")
        print(f"{len(log['losses'])} steps in {log['time_s']:.0f} s ({1000 * log['step_time_s']:.0f} ms/step)")
    elif a.cmd == "finetune":
        torch.set_num_threads(a.threads)
        model, processor = mm.load_family(a.base)
        cfg = FinetuneConfig(target=a.target, steps=a.steps, lr=a.lr, seed=a.seed, n_layers=a.n_layers,
                             threads=a.threads, eval_every=a.eval_every, eval_n=a.eval_n, fisher_during=a.fisher_during)
        log, h_ft = finetune(model, processor, cfg)
        out = Path(a.out)
        mm.save_family(model, processor, out)
        if h_ft is not None:
            save_curvature(h_ft, out / "h_ft.safetensors", {"kind": "h_ft", "tasks": [a.target], "during": True,
                                                            "samples_per_step": cfg.fisher_per_step})
        (out / "log.json").write_text(json.dumps(log, indent=1))
        for ev in log["evals"]:
            print(f"step {ev['step']}: Pre-Avg {ev['pre_avg_exact']:.3f} target {ev['scores'][a.target]['exact']:.3f}")
    elif a.cmd == "curvature":
        torch.set_num_threads(a.threads)
        model, processor = mm.load_family(a.model)
        general = a.tasks == "general"
        tasks = mt.GENERAL if general else tuple(mt.get_task(t).name for t in a.tasks.split(","))
        n = a.n_per_task or (H_PT_SAMPLES if general else H_FT_SAMPLES)
        curv = calibration_fisher(model, processor, tasks, n, a.n_layers, progress=True)
        meta = {"kind": "h_pt" if general else "h_ft", "tasks": list(tasks), "n_per_task": n, "model": str(a.model)}
        print(f"{save_curvature(curv, a.out, meta)}: {len(curv)} tensors, "
              f"sum {total_curvature(curv):.4g}")
    else:
        torch.set_num_threads(a.threads)
        model, processor = mm.load_family(a.model)
        enc = mm.Encoder(processor)
        scores = evaluate(model, enc, mt.eval_set(tuple(mt.TASKS), a.split, a.n))
        print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
