"""Training of the miniature LLaVA-1.5 / Qwen2.5-VL models, on CPU, deterministic for a seed.

  pretrain            from scratch on the general tasks (the miniature analogue of downloading llava-1.5-7b)
  finetune            only the merge set (last half of the decoder layers + projector) on one target task,
                      optionally accumulating h_ft (the empirical Fisher of the merge set) along the way, as
                      the paper does
  calibration_fisher  h_pt (8 calibration samples per general task) or h_ft (a target) of a model's merge set
  save_curvature / load_curvature   curvature dicts as safetensors

Evaluation is `cgm_min.evaluate.decoding`. The command line is `cgm-train` (`cgm_min.cli.train`):

    cgm-train pretrain --family llava --seed 0 --out DIR --threads 1
    cgm-train finetune --base DIR --target corners --out DIR2 --fisher-during
    cgm-train curvature --model DIR --tasks general --out DIR/h_pt.safetensors
    cgm-train evaluate --model DIR

Determinism: model initialisation comes from `torch.manual_seed(seed)`, the data of step t from
`numpy.random.default_rng([seed, t, ...])`, and no layer uses dropout; at a fixed number of threads two
runs give identical losses. The learning-rate schedule's warm-up does not depend on the total number of
steps, so `--stop-after 20` reproduces the first 20 losses of a long run.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models as mm
from . import tasks as mt
from ..cgm import diag_fisher
from ..evaluate.decoding import evaluate, summary
from ..report import atomic_write

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


def check_config(cfg) -> None:
    """Refuse settings that would fail later or silently do nothing: counts that must be positive, a
    learning rate <= 0, unknown tasks, families and sizes. Called by every config's __post_init__."""
    positive = ("steps", "batch_size", "threads", "eval_n", "warmup", "vocab_size")
    for name in positive:
        v = getattr(cfg, name, None)
        if v is not None and (not isinstance(v, int) or v < (0 if name == "warmup" else 1)):
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {v!r}")
    for name in ("eval_every", "fisher_per_step", "seed", "world_seed"):
        v = getattr(cfg, name, None)
        if v is not None and (not isinstance(v, int) or v < 0):
            raise ValueError(f"{type(cfg).__name__}.{name} must be an integer >= 0, got {v!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"{type(cfg).__name__}.lr must be a number > 0, got {cfg.lr!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"{type(cfg).__name__}.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio!r}")
    for name in ("tasks", "eval_tasks"):
        for t in getattr(cfg, name, ()) or ():
            mt.get_task(t)
    if getattr(cfg, "target", None) is not None:
        mt.get_task(cfg.target)
    if getattr(cfg, "family", None) is not None:
        mm.check_family(cfg.family)
    if getattr(cfg, "size", None) is not None and cfg.size not in mm.SIZES:
        raise ValueError(f"unknown model size {cfg.size!r}; known: {list(mm.SIZES)}")


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

    def __post_init__(self):
        self.tasks, self.betas = tuple(self.tasks), tuple(self.betas)
        if self.task_weights is not None:
            self.task_weights = tuple(self.task_weights)
            if len(self.task_weights) != len(self.tasks):
                raise ValueError(f"task_weights has {len(self.task_weights)} entries for {len(self.tasks)} tasks")
        check_config(self)


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

    def __post_init__(self):
        self.betas, self.eval_tasks = tuple(self.betas), tuple(self.eval_tasks)
        check_config(self)
        if mt.get_task(self.target).kind != "target":
            raise ValueError(f"fine-tuning target must be a target task {mt.TARGETS}, got {self.target!r}")


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
