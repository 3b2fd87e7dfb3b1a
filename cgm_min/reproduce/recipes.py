"""Recipes: one small commented YAML file per backbone x target, read into a `Recipe` and checked.

    from cgm_min.reproduce.recipes import load_recipe
    r = load_recipe("recipes/llava-1.5-7b-okvqa.yaml")
    r.finetune.lr, r.merge_set.describe(), [m.label for m in r.merge]

A recipe says everything the chain needs (see `recipes/*.yaml` for commented examples):

    name, scale            scale "paper" (real checkpoints, a GPU) or "tiny" (the shipped miniatures, CPU)
    backbone               a name of cgm_min.real.architectures.REAL_MODELS, or "mini-llava-1.5" / "mini-qwen2.5-vl"
    model                  the pre-trained checkpoint: a folder, or a hub id already in the local HF cache
    data_dir, target       the local data format (data_scripts/README.md): DATA_DIR/TARGET/train/data.jsonl;
                           tiny recipes leave data_dir empty: the chain exports the miniature task there
    merge_set              {preset, last_layers} as in cgm-merge (io.layouts): the fine-tuned = merged tensors
    finetune               epochs, lr, global_batch, micro_batch, warmup_ratio, weight_decay, max_steps,
                           gradient_checkpointing, h_ft (accumulate the per-sample empirical Fisher), seed
    curvature              estimator (fisher | hutchinson), n_per_task (calibration samples per general task),
                           probes (Hutchinson), micro_batch
    merge                  a list of {method, parameters} for cgm-merge (data-free registry methods)
    evaluate               backend (lmms: lmms-eval task names through the project's model class; local: the
                           data folder's held-out split, greedy decoding, exact match), the target and the
                           general tasks as {label, task, metric, scale}, batch_size, limit

Every error is one line naming the file and the field: an unknown key, a wrong type, a value out of range,
a missing path. Relative paths are relative to the recipe file's folder.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..io.layouts import PRESETS, MergeSet

SCALES = ("paper", "tiny")
MINIATURES = {"mini-llava-1.5": "llava", "mini-qwen2.5-vl": "qwen"}
ESTIMATORS = ("fisher", "hutchinson")
BACKENDS = ("lmms", "local")
TOP_KEYS = ("name", "scale", "backbone", "model", "data_dir", "target", "merge_set", "finetune", "curvature",
            "merge", "evaluate", "gpus")


class RecipeError(ValueError):
    """A recipe that cannot be used (one line: file, field, problem)."""


@dataclass(frozen=True)
class Finetune:
    epochs: float = 1.0               # passes over the training split
    lr: float = 1e-4                  # peak learning rate (cosine decay after a linear warm-up)
    global_batch: int = 64            # samples per optimizer step over all processes
    micro_batch: int = 4              # samples per forward pass per process (global = micro x accumulation x GPUs)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_steps: int | None = None      # stop after this many optimizer steps (tiny recipes; None: the epochs)
    max_samples: int | None = None    # use only the first N training samples (tiny recipes; None: all)
    gradient_checkpointing: bool = True
    h_ft: bool = True                 # accumulate h_ft (squared per-sample gradients) during training
    seed: int = 0

    RANGES = {"epochs": (0, None, False), "lr": (0, 1, False), "global_batch": (1, None, True),
              "micro_batch": (1, None, True), "warmup_ratio": (0, 0.5, True), "weight_decay": (0, 1, True),
              "max_steps": (1, None, True), "max_samples": (1, None, True), "seed": (0, None, True)}


@dataclass(frozen=True)
class Curvature:
    estimator: str = "fisher"         # fisher: the per-sample empirical Fisher; hutchinson: E[v * Hv]
    n_per_task: int = 8               # calibration samples per general task (the paper: 8)
    probes: int = 8                   # Rademacher probes per batch (hutchinson)
    micro_batch: int = 8              # samples per forward pass (Hutchinson's Hessian is per batch)
    seed: int = 0

    RANGES = {"n_per_task": (1, None, True), "probes": (1, None, True), "micro_batch": (1, None, True),
              "seed": (0, None, True)}


@dataclass(frozen=True)
class MergeStep:
    method: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Folder name and results-table variant: the method and its parameters, e.g. cgm_dagger-k0.1."""
        short = {"alpha_normalised": "an", "alpha": "a"}
        parts = [f"{short.get(k, k)}{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}{v}"
                 for k, v in sorted(self.parameters.items())]
        return "-".join([self.method, *parts])


@dataclass(frozen=True)
class EvalTask:
    label: str                        # the results-table column (task:<label>), e.g. VQAv2 or colour
    task: str                         # lmms-eval task name (backend lmms) or local data target (backend local)
    metric: tuple[str, ...] = ("exact_match",)   # lmms-eval metric(s); several are averaged (Flickr30k)
    scale: float = 1.0                # divide the metric by this to get a score in [0, 1] (100 for percents)


@dataclass(frozen=True)
class Evaluate:
    backend: str = "lmms"
    target: EvalTask | None = None
    general: tuple[EvalTask, ...] = ()
    batch_size: int = 8
    limit: int | None = None          # at most this many documents per task (None: all)
    split: str = "heldout"            # backend local: the data folder's split that is scored


@dataclass(frozen=True)
class Recipe:
    name: str
    scale: str
    backbone: str
    model: Path | str                 # a Path, or a hub id (str) resolved in the local HF cache
    target: str
    merge_set: MergeSet
    finetune: Finetune
    curvature: Curvature
    merge: tuple[MergeStep, ...]
    evaluate: Evaluate
    data_dir: Path | None = None      # None: tiny recipes (the chain exports the miniature tasks)
    gpus: int = 1                     # GPUs the cost estimate assumes (the run uses what accelerate launches)
    source: Path | None = None
    text: str = ""

    @property
    def family(self) -> str:
        """"llava" or "qwen" (the results table's family column)."""
        return "llava" if "llava" in self.backbone else "qwen"

    @property
    def general_labels(self) -> list[str]:
        return [t.label for t in self.evaluate.general]


# ----------------------------------------------------------------------------------------------
# Checking.

def _fail(where: str, msg: str):
    raise RecipeError(f"{where}: {msg}")


def _keys(where: str, data: Any, allowed, what: str) -> dict:
    if not isinstance(data, dict):
        _fail(where, f"{what} must be a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        _fail(where, f"unknown key {unknown[0]!r} in {what}; allowed: {', '.join(allowed)}")
    return data


def _number(where: str, key: str, v: Any, lo, hi, closed: bool, integer: bool):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) \
            or not math.isfinite(v):
        _fail(where, f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if (lo is not None and (v < lo if closed else v <= lo)) or (hi is not None and v > hi):
        rng = f"{'>=' if closed else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
        _fail(where, f"{key} must be {rng}, got {v!r}")
    return v


def _section(where: str, cls, data: Any, what: str):
    names = [f.name for f in fields(cls)]
    data = _keys(where, data or {}, names, what)
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for k, v in data.items():
        if v is None and "None" in str(types[k]):
            out[k] = None
            continue
        if k in cls.RANGES:
            lo, hi, closed = cls.RANGES[k]
            integer = "int" in str(types[k]) and "float" not in str(types[k])
            out[k] = _number(where, f"{what}.{k}", v, lo, hi, closed, integer)
        elif "bool" in str(types[k]):
            if not isinstance(v, bool):
                _fail(where, f"{what}.{k} must be true or false, got {v!r}")
            out[k] = v
        elif "str" in str(types[k]):
            if not isinstance(v, str):
                _fail(where, f"{what}.{k} must be a string, got {v!r}")
            out[k] = v
        else:
            out[k] = _number(where, f"{what}.{k}", v, 0, None, False, False)
    return cls(**out)


def _path(where: str, base: Path, value: Any, key: str, must_exist: bool) -> Path:
    if not isinstance(value, str) or not value.strip():
        _fail(where, f"{key} must be a path, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if must_exist and not p.exists():
        _fail(where, f"{key}: no such file or folder: {p}")
    return p


def _model_ref(where: str, base: Path, value: Any, must_exist: bool) -> Path | str:
    """A local folder, or a hub id ("org/name") resolved in the local HF cache (never downloaded)."""
    from ..io.merge_config import HUB_ID, resolve_input
    if not isinstance(value, str) or not value.strip():
        _fail(where, f"model must be a folder or a hub id, got {value!r}")
    local = Path(value).expanduser()
    local = local if local.is_absolute() else base / local
    if local.exists():
        return local
    if not must_exist:
        return value if HUB_ID.fullmatch(value) else local
    try:
        return resolve_input(value, base, "model")
    except FileNotFoundError as err:
        _fail(where, str(err))


def _eval_task(where: str, data: Any, what: str) -> EvalTask:
    data = _keys(where, data, ("label", "task", "metric", "scale"), what)
    for k in ("label", "task"):
        if not isinstance(data.get(k), str) or not data[k]:
            _fail(where, f"{what}.{k} must be a non-empty string, got {data.get(k)!r}")
    metric = data.get("metric", "exact_match")
    metric = (metric,) if isinstance(metric, str) else metric
    if not isinstance(metric, (list, tuple)) or not metric or not all(isinstance(m, str) and m for m in metric):
        _fail(where, f"{what}.metric must be a metric name or a list of them, got {data.get('metric')!r}")
    scale = _number(where, f"{what}.scale", data.get("scale", 1.0), 0, None, False, False)
    return EvalTask(data["label"], data["task"], tuple(metric), float(scale))


def _evaluate(where: str, data: Any) -> Evaluate:
    data = _keys(where, data, ("backend", "target", "general", "batch_size", "limit", "split"), "evaluate")
    backend = data.get("backend", "lmms")
    if backend not in BACKENDS:
        _fail(where, f"evaluate.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if "target" not in data or "general" not in data:
        _fail(where, "evaluate needs a target and a list of general tasks")
    target = _eval_task(where, data["target"], "evaluate.target")
    if not isinstance(data["general"], list) or not data["general"]:
        _fail(where, "evaluate.general must be a non-empty list of tasks")
    general = tuple(_eval_task(where, g, f"evaluate.general[{i}]") for i, g in enumerate(data["general"]))
    labels = [t.label for t in (*general, target)]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        _fail(where, f"evaluate: label {dup[0]!r} is used twice")
    batch = _number(where, "evaluate.batch_size", data.get("batch_size", 8), 1, None, True, True)
    limit = data.get("limit")
    if limit is not None:
        _number(where, "evaluate.limit", limit, 1, None, True, True)
    split = data.get("split", "heldout")
    if not isinstance(split, str) or not split:
        _fail(where, f"evaluate.split must be a split name, got {split!r}")
    return Evaluate(backend, target, general, batch, limit, split)


def _merge_steps(where: str, data: Any) -> tuple[MergeStep, ...]:
    from ..io.merge_config import parse_config
    if not isinstance(data, list) or not data:
        _fail(where, "merge must be a non-empty list of {method, parameters}")
    out = []
    for i, m in enumerate(data):
        m = _keys(where, m, ("method", "parameters"), f"merge[{i}]")
        cfg = {"pre_trained": "pt", "fine_tuned": "ft", "method": m.get("method"),
               "parameters": m.get("parameters") or {}, "merge_set": MergeSet(patterns=("*",)).as_dict(),
               "curvature": {"pre_trained": "h_pt", "fine_tuned": "h_ft"}}
        try:                                         # cgm-merge's own checks of the method and its parameters
            parse_config(cfg)
        except ValueError as err:
            _fail(where, f"merge[{i}]: {str(err).removeprefix('config: ')}")
        out.append(MergeStep(m["method"], dict(m.get("parameters") or {})))
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        _fail(where, "merge: the same method and parameters are listed twice")
    return tuple(out)


def parse_recipe(data: Any, base_dir: str | os.PathLike = ".", where: str = "recipe", check_paths: bool = True,
                 source: Path | None = None, text: str = "") -> Recipe:
    """A Recipe from a parsed YAML mapping. `check_paths=False` skips the existence of the model and the data
    folder (the dry run plans a paper recipe on a machine that has neither)."""
    base = Path(base_dir)
    data = _keys(where, data, TOP_KEYS, "the recipe")
    for k in ("name", "scale", "backbone", "model", "target", "merge_set", "finetune", "merge", "evaluate"):
        if k not in data:
            _fail(where, f"missing {k}")
    for k in ("name", "backbone", "target"):
        if not isinstance(data[k], str) or not data[k]:
            _fail(where, f"{k} must be a non-empty string, got {data[k]!r}")
    scale = data["scale"]
    if scale not in SCALES:
        _fail(where, f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    backbone = data["backbone"]
    if scale == "tiny" and backbone not in MINIATURES:
        _fail(where, f"a tiny recipe runs a miniature; backbone must be one of {', '.join(MINIATURES)}")
    if scale == "paper":
        from ..real.architectures import REAL_MODELS
        if backbone not in REAL_MODELS:
            _fail(where, f"unknown backbone {backbone!r}; paper backbones: {', '.join(REAL_MODELS)}")
    model = _model_ref(where, base, data["model"], check_paths)
    data_dir = None
    if scale == "paper":
        if "data_dir" not in data:
            _fail(where, "missing data_dir (the folder data_scripts prepared)")
        data_dir = _path(where, base, data["data_dir"], "data_dir", check_paths)
    elif data.get("data_dir") is not None:
        _fail(where, "a tiny recipe has no data_dir: the chain exports the miniature tasks into OUT/data")
    ms = _keys(where, data["merge_set"], ("preset", "last_layers"), "merge_set")
    if ms.get("preset") not in PRESETS:
        _fail(where, f"merge_set.preset must be one of {', '.join(PRESETS)}, got {ms.get('preset')!r}")
    if "last_layers" in ms:
        _number(where, "merge_set.last_layers", ms["last_layers"], 1, None, True, True)
    merge_set = MergeSet(preset=ms["preset"], last_layers=ms.get("last_layers"))
    finetune = _section(where, Finetune, data["finetune"], "finetune")
    if finetune.micro_batch > finetune.global_batch:
        _fail(where, f"finetune.micro_batch {finetune.micro_batch} is larger than global_batch "
                     f"{finetune.global_batch}")
    curvature = _section(where, Curvature, data.get("curvature"), "curvature")
    if curvature.estimator not in ESTIMATORS:
        _fail(where, f"curvature.estimator must be one of {', '.join(ESTIMATORS)}, got {curvature.estimator!r}")
    gpus = _number(where, "gpus", data.get("gpus", 1), 1, None, True, True)
    return Recipe(data["name"], scale, backbone, model, data["target"], merge_set, finetune, curvature,
                  _merge_steps(where, data["merge"]), _evaluate(where, data["evaluate"]), data_dir, gpus,
                  source, text)


def load_recipe(path: str | os.PathLike, check_paths: bool = True) -> Recipe:
    """Read and check a recipe file; every problem is one line naming the file."""
    from ..io.merge_config import read_yaml
    path = Path(path)
    try:
        data, text = read_yaml(path, "recipe")
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return parse_recipe(data, path.parent.resolve(), str(path), check_paths, path.resolve(), text)
