"""The registry of merge methods: one short function per method, each with its reference.

Every method maps one tensor's (w_pt, w_ft, h_pt, h_ft) and its hyperparameters to the merged tensor.
Curvature-free methods ignore h_pt and h_ft. `merge_state` applies a method to whole state dicts.
The score ablation of the paper's Table 5 is the family `score_*`: the same lowest-k reversion as CGM-dagger
with one term of the Eq. 12 score left out.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .. import cgm

Tensor = torch.Tensor


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor]        # fn(w_pt, w_ft, h_pt, h_ft, **hyperparameters) -> merged tensor
    hyperparameters: tuple[str, ...]
    uses_curvature: bool
    reference: str


METHODS: dict[str, MergeMethod] = {}


def register(name: str, hyperparameters: tuple[str, ...], uses_curvature: bool, reference: str):
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, fn, hyperparameters, uses_curvature, reference)
        return fn
    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def revert_lowest(w_pt: Tensor, w_ft: Tensor, score: Tensor, k: float, per_row: bool) -> Tensor:
    """Revert to w_pt the fraction k of entries with the lowest `score`; keep w_ft elsewhere."""
    cgm.check_hyperparameters(0.0, k)
    return torch.where(cgm.select_lowest(score, k, per_row), w_pt.to(w_ft.dtype), w_ft)


@register("fine_tuned", (), False, "the fine-tuned model itself")
def fine_tuned(w_pt, w_ft, h_pt, h_ft):
    return w_ft


@register("linear", ("lam",), False, "weight interpolation (Wortsman et al. 2022, WiSE-FT)")
def linear(w_pt, w_ft, h_pt, h_ft, lam):
    """w_ft + lam * (w_pt - w_ft) in float32 (float64 for float64 weights), exact at lam = 0 and 1."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"linear: lam must lie in [0, 1], got {lam!r}")
    dt = torch.promote_types(w_ft.dtype, torch.float32)
    return torch.lerp(w_ft.to(dt), w_pt.to(dt), lam).to(w_ft.dtype)


@register("cgm", ("alpha",), True, "CGM soft mixing, Eq. 8 (Yang et al. 2026)")
def cgm_soft(w_pt, w_ft, h_pt, h_ft, alpha):
    return cgm.soft_mix(w_pt, w_ft, h_pt, h_ft, alpha)


@register("cgm_dagger", ("alpha", "k", "per_row"), True, "CGM-dagger hard mixing, Eq. 12-13 (Yang et al. 2026)")
def cgm_dagger(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row=True):
    return cgm.hard_mix(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row)


@register("magnitude", ("k", "per_row"), False, "revert the smallest |w_ft - w_pt| (the paper's Magnitude)")
def magnitude(w_pt, w_ft, h_pt, h_ft, k, per_row=True):
    return revert_lowest(w_pt, w_ft, (w_pt.float() - w_ft.float()) ** 2, k, per_row)


@register("score_ft_magnitude", ("k", "per_row"), True, "Table 5 row 2: score h_ft * delta^2")
def score_ft_magnitude(w_pt, w_ft, h_pt, h_ft, k, per_row=True):
    return revert_lowest(w_pt, w_ft, h_ft.float() * (w_pt.float() - w_ft.float()) ** 2, k, per_row)


@register("score_pt_magnitude", ("alpha", "k", "per_row"), True, "Table 5 row 3: score -alpha * h_pt * delta^2")
def score_pt_magnitude(w_pt, w_ft, h_pt, h_ft, alpha, k, per_row=True):
    cgm.check_hyperparameters(alpha, k)
    return revert_lowest(w_pt, w_ft, -alpha * h_pt.float() * (w_pt.float() - w_ft.float()) ** 2, k, per_row)


def merge_state(method: str, state_pt: Mapping[str, Tensor], state_ft: Mapping[str, Tensor],
                curv_pt: Mapping[str, Tensor], curv_ft: Mapping[str, Tensor], **hyperparameters) -> dict[str, Tensor]:
    """Apply a registered method to every tensor named in curv_ft (the merged set); other tensors come
    from state_ft. The CGM methods go through `cgm.cgm_merge`; every other method gets the same state-dict
    checks and per-tensor checks (of the curvature too where the method uses it). Unknown or missing
    hyperparameters are refused."""
    m = get_method(method)
    unknown = set(hyperparameters) - set(m.hyperparameters)
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameters {sorted(unknown)}; it takes {list(m.hyperparameters)}")
    required = [p.name for p in list(inspect.signature(m.fn).parameters.values())[4:] if p.default is p.empty]
    missing = [p for p in required if p not in hyperparameters]
    if missing:       # (cgm_dagger without k would otherwise be soft mixing)
        raise ValueError(f"{method}: missing hyperparameters {missing}; it takes {list(m.hyperparameters)}")
    if method in ("cgm", "cgm_dagger"):
        return cgm.cgm_merge(state_pt, state_ft, curv_pt, curv_ft, hyperparameters["alpha"],
                             hyperparameters.get("k"), hyperparameters.get("per_row", True))
    cgm.check_state_dicts(state_pt, state_ft, curv_pt, curv_ft)
    merged = dict(state_ft)
    for name in curv_ft:
        args = (state_pt[name], state_ft[name], curv_pt[name], curv_ft[name])
        if m.uses_curvature:
            cgm.check_mix_inputs(*args, name=name)
        else:       # the curvature only names the merged tensors; the weights must still be finite
            for label, w in zip(("w_pt", "w_ft"), args):
                if not torch.isfinite(w).all():
                    raise ValueError(f"{name}: {label} contains NaN or Inf")
        merged[name] = m.fn(*args, **hyperparameters)
    return merged
