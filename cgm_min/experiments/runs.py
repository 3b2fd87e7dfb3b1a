"""The first steps of the merge experiment, each a function with files in between, cached by configuration.

    RunSpec           one fine-tuning run: family, base size, target, seed, steps, learning rate, depth
    finetune_run      -> RUN/finetuned.safetensors (the merge set of w_ft), RUN/h_ft_during.safetensors
                         (h_ft accumulated during fine-tuning, the paper's practice), RUN/log.json
    curvature         -> h_pt and h_ft of one kind (CURVATURE_KINDS), cached beside the base or the run
    target_statistics -> the input statistics of the merged linear weights on target data at w_ft (Wanda,
                         Model Tailor)

A cache folder holds one sub-folder per base model (`llava-small/`, ...) with the base's curvature, and one
per run inside it, named by the run's settings and a hash of them and of the code's version of each step.
A finished file is never recomputed: a second build with a warm cache skips training. Files are written
atomically (`report.atomic_write`), so an interrupted build leaves no half-written cache entry.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

from .. import cgm
from ..report import atomic_write
from ..world import models as mm
from ..world import tasks as mt
from ..world import training as tr

# Bump when a step's code changes what it writes: cached files of the old version are then recomputed.
STEP_VERSION = {"finetune": 1, "curvature": 1, "statistics": 1}

CALIBRATION_TARGET = 64       # target calibration samples for h_ft at w_ft, Hutchinson at w_ft, statistics
HUTCHINSON_PROBES = 8         # Rademacher probes per batch


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the merge experiment (the knobs of the regime study)."""
    family: str
    target: str
    seed: int = 0
    size: str = "small"                 # the base: "small" (shipped) or "wide" (decoder hidden 256)
    steps: int = 200
    lr: float = 5e-4
    n_layers: int | None = None         # fine-tuned / merged decoder layers (None: the last half)

    def __post_init__(self):
        mm.check_family(self.family)
        self.finetune_config()            # validates target, steps, lr, seed
        if (self.family, self.size) not in mm.SHIPPED:
            raise ValueError(f"no shipped {self.family} base of size {self.size!r}; shipped: {sorted(mm.SHIPPED)}")

    def finetune_config(self) -> tr.FinetuneConfig:
        return tr.FinetuneConfig(target=self.target, steps=self.steps, lr=self.lr, seed=self.seed,
                                 n_layers=self.n_layers, fisher_during=True, threads=1)

    @property
    def base(self) -> Path:
        return mm.shipped_checkpoint(self.family, self.size)

    @property
    def label(self) -> str:
        depth = "half" if self.n_layers is None else f"L{self.n_layers}"
        return f"{self.family}-{self.size}/{self.target}-s{self.seed}-{self.steps}x{self.lr:g}-{depth}"

    def key(self) -> str:
        payload = {**asdict(self), "base_sha256": base_sha256(self.family, self.size),
                   "version": STEP_VERSION["finetune"]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    def folder(self, cache: Path) -> Path:
        return Path(cache) / f"{self.family}-{self.size}" / f"{self.label.split('/', 1)[1]}-{self.key()}"


def base_sha256(family: str, size: str) -> str:
    """The shipped base's model-file hash from its manifest (what the cache keys depend on)."""
    man = json.loads((mm.shipped_checkpoint(family, size) / "manifest.json").read_text())
    return man["files"]["model.safetensors"]["sha256"]


def base_folder(cache: Path, family: str, size: str) -> Path:
    return Path(cache) / f"{family}-{size}" / f"base-{base_sha256(family, size)[:10]}"


# ----------------------------------------------------------------------------------------------
# Tensors on disk.

def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping | None = None) -> Path:
    from safetensors.torch import save_file
    data = {n: t.detach().contiguous() for n, t in tensors.items()}
    header = {k: json.dumps(v) for k, v in (meta or {}).items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=header))


def load_tensors(path: Path, with_meta: bool = False):
    """The tensors of a safetensors file (and its JSON metadata with `with_meta`)."""
    from safetensors import safe_open
    if not Path(path).is_file():
        raise FileNotFoundError(f"no tensor file {path}")
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return (tensors, meta) if with_meta else tensors


# ----------------------------------------------------------------------------------------------
# Step 1: fine-tuning.

def load_base(spec: RunSpec):
    """(model, processor) of the run's pre-trained base."""
    return mm.load_family(spec.base)


def finetune_run(spec: RunSpec, cache: Path, progress: bool = False) -> Path:
    """Fine-tune (or find in the cache) one run; returns its folder."""
    folder = spec.folder(cache)
    if (folder / "log.json").is_file():
        return folder
    torch.set_num_threads(1)
    model, processor = load_base(spec)
    log, h_ft = tr.finetune(model, processor, spec.finetune_config(), progress=progress)
    names = log["merge_names"]
    state = model.state_dict()
    save_tensors({n: state[n] for n in names}, folder / "finetuned.safetensors", {"spec": asdict(spec)})
    tr.save_curvature(h_ft, folder / "h_ft_during.safetensors",
                      {"kind": "h_ft", "estimator": "fisher_during", "tasks": [spec.target],
                       "samples_per_step": spec.finetune_config().fisher_per_step})
    summary = {"spec": asdict(spec), "label": spec.label, "merge_names": names, "time_s": log["time_s"],
               "losses": log["losses"], "threads": 1}
    atomic_write(folder / "log.json", lambda tmp: Path(tmp).write_text(json.dumps(summary)))   # last: the marker
    return folder


def run_log(spec: RunSpec, cache: Path) -> dict:
    path = spec.folder(cache) / "log.json"
    if not path.is_file():
        raise FileNotFoundError(f"run {spec.label} is not in the cache {cache}: fine-tune it first")
    return json.loads(path.read_text())


def merge_states(spec: RunSpec, cache: Path, base_model=None) -> tuple[dict, dict, list[str]]:
    """(w_pt, w_ft, names): the merge set's tensors of the base and of the fine-tuned run."""
    names = run_log(spec, cache)["merge_names"]
    base = base_model if base_model is not None else load_base(spec)[0]
    state = base.state_dict()
    w_ft = load_tensors(spec.folder(cache) / "finetuned.safetensors")
    return {n: state[n].clone() for n in names}, {n: w_ft[n] for n in names}, names


# ----------------------------------------------------------------------------------------------
# Step 2: curvature of one kind.

# kind -> (h_pt estimator, h_ft estimator). The paper's practice is "fisher_during".
CURVATURE_KINDS = {
    "fisher_during": ("fisher_n8", "during"),             # h_pt: Fisher at w_pt, 8 per general task
    "fisher_at_ft": ("fisher_n8", "fisher_at_ft"),        # h_ft: Fisher at w_ft, 64 target samples
    "fisher_during_n64": ("fisher_n64", "during"),        # h_pt from 64 calibration samples per task
    "hutchinson": ("hutchinson_n8", "hutchinson_at_ft"),  # Hessian diagonals by Hutchinson, clipped at 0
}


def _hutchinson(model, processor, tasks, n_per_task, names) -> tuple[dict[str, torch.Tensor], dict]:
    """Hutchinson's Hessian diagonal, clipped at 0 (an estimate can be negative away from a minimum, and
    Eq. 8 needs h >= 0); the share of clipped entries is kept in the file's metadata."""
    batches = tr.fisher_batches(processor, tasks, n_per_task)
    est = cgm.hutchinson_diag_hessian(model, batches, HUTCHINSON_PROBES, names, progress=False)
    return {n: h.clamp(min=0.0) for n, h in est.items()}, {
        "negative_share": sum(int((h < 0).sum()) for h in est.values()) / sum(h.numel() for h in est.values())}


def h_pt_path(spec: RunSpec, estimator: str, cache: Path) -> Path:
    depth = "half" if spec.n_layers is None else f"L{spec.n_layers}"
    return base_folder(cache, spec.family, spec.size) / f"h_pt-{estimator}-{depth}-v{STEP_VERSION['curvature']}.safetensors"


def h_pt(spec: RunSpec, estimator: str, cache: Path) -> dict[str, torch.Tensor]:
    """h_pt of the run's base on the general calibration samples (cached beside the base, per merge set);
    it does not depend on the fine-tuning, so every run of a base shares it."""
    path = h_pt_path(spec, estimator, cache)
    if path.is_file():
        return tr.load_curvature(path)[0]
    torch.set_num_threads(1)
    model, processor = load_base(spec)
    names = mm.merge_param_names(model, spec.n_layers)
    n = int(estimator.rsplit("_n", 1)[1])
    meta = {"kind": "h_pt", "estimator": estimator, "tasks": list(mt.GENERAL), "n_per_task": n}
    if estimator.startswith("fisher"):
        h = tr.calibration_fisher(model, processor, mt.GENERAL, n, spec.n_layers)
    else:
        h, extra = _hutchinson(model, processor, mt.GENERAL, n, names)
        meta.update(extra)
    tr.save_curvature(h, path, meta)
    return h


def _h_ft(spec: RunSpec, estimator: str, cache: Path, names: list[str]) -> dict[str, torch.Tensor]:
    folder = spec.folder(cache)
    if estimator == "during":
        return tr.load_curvature(folder / "h_ft_during.safetensors")[0]
    path = folder / f"h_ft-{estimator}-v{STEP_VERSION['curvature']}.safetensors"
    if path.is_file():
        return tr.load_curvature(path)[0]
    torch.set_num_threads(1)
    model, processor = finetuned_model(spec, cache)
    meta = {"kind": "h_ft", "estimator": estimator, "tasks": [spec.target], "n_per_task": CALIBRATION_TARGET}
    if estimator == "fisher_at_ft":
        h = tr.calibration_fisher(model, processor, (spec.target,), CALIBRATION_TARGET, spec.n_layers)
    else:
        h, extra = _hutchinson(model, processor, (spec.target,), CALIBRATION_TARGET, names)
        meta.update(extra)
    tr.save_curvature(h, path, meta)
    return h


def curvature(spec: RunSpec, kind: str, cache: Path) -> tuple[dict, dict]:
    """(h_pt, h_ft) of `kind` for a fine-tuned run (computed once, then read from the cache)."""
    if kind not in CURVATURE_KINDS:
        raise ValueError(f"unknown curvature kind {kind!r}; known: {list(CURVATURE_KINDS)}")
    names = run_log(spec, cache)["merge_names"]
    pt_est, ft_est = CURVATURE_KINDS[kind]
    return h_pt(spec, pt_est, cache), _h_ft(spec, ft_est, cache, names)


def finetuned_model(spec: RunSpec, cache: Path):
    """(model, processor): the base with the run's fine-tuned merge set loaded."""
    model, processor = load_base(spec)
    model.load_state_dict(load_tensors(spec.folder(cache) / "finetuned.safetensors"), strict=False)
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------
# Step 3: input statistics on target data at w_ft.

def target_statistics(spec: RunSpec, cache: Path):
    """{weight name: ActivationStats} of the merged linear weights, from CALIBRATION_TARGET target samples
    run through the fine-tuned model: which input columns the target uses (Wanda, Model Tailor)."""
    from ..merge import ActivationStats
    from ..merge.statistics import activation_stats
    path = spec.folder(cache) / f"act_target-v{STEP_VERSION['statistics']}.safetensors"
    if path.is_file():
        flat, meta = load_tensors(path, with_meta=True)
        return {n: ActivationStats(flat[f"{n}::col_sq"], flat[f"{n}::gram"], int(c)) for n, c in meta["n"].items()}
    torch.set_num_threads(1)
    model, processor = finetuned_model(spec, cache)
    names = run_log(spec, cache)["merge_names"]
    stats = activation_stats(model, tr.fisher_batches(processor, (spec.target,), CALIBRATION_TARGET), names)
    flat = {f"{n}::{part}": getattr(s, part) for n, s in stats.items() for part in ("col_sq", "gram")}
    save_tensors(flat, path, {"n": {n: s.n for n, s in stats.items()}, "tasks": [spec.target],
                              "n_per_task": CALIBRATION_TARGET})
    return stats
