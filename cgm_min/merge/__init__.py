"""The registry of merge methods: one short function per method, each with its reference.

Every method of the paper's tables, and the classic ones, under one name each:

    endpoints       pre_trained, fine_tuned
    interpolation   linear (WiSE-FT), task_arithmetic
    task vectors    ties, dare
    reversion       magnitude, random_revert, wanda, model_tailor, grafting, cgm_dagger, and the Table 5
                    score ablations score_ft_magnitude, score_pt_magnitude
    curvature       fisher_merging, cgm

A method is a function of one tensor's inputs (`TensorInputs`: w_pt, w_ft, h_pt, h_ft, the activation
statistics of the weight, further fine-tuned copies, the tensor's name) and of its hyperparameters, which are
declared once, in its signature: the annotation gives the range (`Fraction`, `NonNegative`, ...), the default
value makes it optional. A few methods need the whole model at once (grafting learns a mask by gradient
steps through the model); they are registered with level="model" and get the state dicts.

Everything a method needs beyond the two checkpoints comes in one `MergeInputs` (curvature stays a
positional argument of `merge_state`, as it always was):

    activations        {weight name: ActivationStats} of the merged linear weights (Wanda, Model Tailor)
    fine_tuned_others  more fine-tuned copies of the same base (TIES, task arithmetic, DARE merge several)
    target             TargetData: a model and batches of target data (grafting's gradient steps)

A method says what it needs (`needs`); `merge_state` refuses a call that lacks it, with one line naming it.
Room is left for methods that act during training (sparse fine-tuning with a frozen mask) by the `level`
field: such methods produce a fine-tuned model rather than merge two, and are not called by `merge_state`.

Conventions: delta = w_pt - w_ft (the paper's reversion vector), the task vector tau = w_ft - w_pt = -delta.
`k` is the fraction of entries reverted to w_pt for every reversion method (magnitude, random, Wanda,
Model Tailor, grafting, CGM-dagger); TIES keeps its own paper's meaning, k = the fraction of the task
vector it keeps. Math is done in float32 (float64 for float64 weights) and returned in w_ft's dtype.
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Callable, Mapping, Sequence

import torch

from .. import cgm

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Hyperparameter ranges, declared in the methods' signatures.

@dataclass(frozen=True)
class Range:
    """A closed or half-open interval a hyperparameter must lie in (always finite)."""
    lo: float
    hi: float = math.inf
    hi_open: bool = False
    integer: bool = False

    def check(self, method: str, name: str, value) -> None:
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if (isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < self.lo
                or value > self.hi or (self.hi_open and value == self.hi)):
            kind = "an integer " if self.integer else ""
            raise ValueError(f"{method}: {name} must be {kind}in {self}, got {value!r}")

    def __str__(self) -> str:
        hi = "inf)" if self.hi == math.inf else (f"{self.hi:g})" if self.hi_open else f"{self.hi:g}]")
        return f"[{self.lo:g}, {hi}"


Fraction = Annotated[float, Range(0.0, 1.0)]                    # lam, k
Probability = Annotated[float, Range(0.0, 1.0, hi_open=True)]   # DARE's drop rate p < 1
NonNegative = Annotated[float, Range(0.0)]                      # alpha, scale
Count = Annotated[int, Range(0, integer=True)]                  # seeds, steps
Flag = bool                                                     # per_row


# ----------------------------------------------------------------------------------------------
# What a method gets.

@dataclass
class ActivationStats:
    """Input statistics of one linear weight W (out x in) over calibration tokens X (n x in):
    col_sq[j] = sum_t X[t, j]^2 (so ||X_j||_2 = sqrt(col_sq[j])) and gram = X^T X (in x in)."""
    col_sq: Tensor
    gram: Tensor | None
    n: int


@dataclass
class TargetData:
    """A model of the merged architecture and batches of target data: `loss(params)` is the mean target loss
    with the named parameters replaced (torch.func.functional_call), differentiable in them."""
    model: torch.nn.Module
    batches: Sequence[Mapping]

    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        from torch.func import functional_call
        total = sum(functional_call(self.model, dict(params), args=(), kwargs=dict(b)).loss * b["labels"].shape[0]
                    for b in self.batches)
        return total / sum(b["labels"].shape[0] for b in self.batches)


@dataclass
class MergeInputs:
    """Everything beyond two checkpoints and their curvature (see the module docstring)."""
    activations: Mapping[str, ActivationStats] | None = None
    fine_tuned_others: Sequence[Mapping[str, Tensor]] = ()
    target: TargetData | None = None


@dataclass
class TensorInputs:
    """One merged tensor's inputs. h_pt / h_ft are None for methods that do not use curvature."""
    name: str
    w_pt: Tensor
    w_ft: Tensor
    h_pt: Tensor | None = None
    h_ft: Tensor | None = None
    act: ActivationStats | None = None
    w_others: tuple[Tensor, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the math: float32, or float64 for float64 weights."""
        return torch.promote_types(self.w_ft.dtype, torch.float32)

    def task_vectors(self) -> list[Tensor]:
        """tau = w_ft - w_pt of the fine-tuned model and of every further fine-tuned copy, in `dtype`."""
        base = self.w_pt.to(self.dtype)
        return [w.to(self.dtype) - base for w in (self.w_ft, *self.w_others)]

    def generator(self, seed: int) -> torch.Generator:
        """A generator seeded by (seed, tensor name): random methods give the same mask for a tensor
        whatever the order in which tensors are merged."""
        from ..world.tasks import stable_hash
        return torch.Generator().manual_seed(stable_hash(seed, self.name))


# ----------------------------------------------------------------------------------------------
# The registry.

NEEDS = ("curvature", "activations", "fine_tuned_others", "target")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., object]
    family: str                       # endpoint, interpolation, task vectors, reversion, curvature
    reference: str
    needs: frozenset = frozenset()
    level: str = "tensor"             # "tensor": fn(TensorInputs, **hp) -> Tensor; "model": see merge_state
    rule: str = ""                    # the one-line rule, for the book's table
    ranges: Mapping[str, Range] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(self.ranges)

    @property
    def uses_curvature(self) -> bool:
        return "curvature" in self.needs

    def check(self, hyperparameters: Mapping[str, object]) -> dict:
        """The full hyperparameter dict (defaults filled in), or a ValueError naming the unknown, missing
        or out-of-range one."""
        unknown = sorted(set(hyperparameters) - set(self.ranges))
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameters {unknown}; it takes {list(self.ranges)}")
        missing = [p for p in self.ranges if p not in hyperparameters and p not in self.defaults]
        if missing:
            raise ValueError(f"{self.name}: missing hyperparameters {missing}; it takes {list(self.ranges)}")
        full = {**self.defaults, **hyperparameters}
        for p, rng in self.ranges.items():
            if rng is None:                       # a flag
                if not isinstance(full[p], bool):
                    raise ValueError(f"{self.name}: {p} must be True or False, got {full[p]!r}")
            else:
                rng.check(self.name, p, full[p])
        return full


METHODS: dict[str, MergeMethod] = {}


def _signature_ranges(fn, skip: int) -> tuple[dict, dict]:
    """(ranges, defaults) of the hyperparameters in fn's signature after the first `skip` parameters."""
    hints = typing.get_type_hints(fn, include_extras=True)
    ranges, defaults = {}, {}
    for p in list(inspect.signature(fn).parameters.values())[skip:]:
        hint = hints.get(p.name)
        meta = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)]
        if hint is not bool and not meta:
            raise TypeError(f"{fn.__name__}: hyperparameter {p.name} needs a range annotation (Fraction, ...)")
        ranges[p.name] = meta[0] if meta else None
        if p.default is not p.empty:
            defaults[p.name] = p.default
    return ranges, defaults


def register(name: str, family: str, reference: str, needs: Sequence[str] = (), level: str = "tensor",
             rule: str = ""):
    """Decorator: add a method to METHODS. Its hyperparameters are the parameters of its signature after
    the inputs (one for level "tensor", four for level "model"), with their ranges and defaults."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"{name}: unknown needs {sorted(unknown)}; known: {NEEDS}")

    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        ranges, defaults = _signature_ranges(fn, 1 if level == "tensor" else 4)
        METHODS[name] = MergeMethod(name, fn, family, reference, frozenset(needs), level,
                                    rule or (fn.__doc__ or "").strip().split("\n")[0], ranges, defaults)
        return fn
    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def _check_finite(name: str, label: str, w: Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: {label} contains NaN or Inf")


def merge_state(method: str, state_pt: Mapping[str, Tensor], state_ft: Mapping[str, Tensor],
                curv_pt: Mapping[str, Tensor] | None = None, curv_ft: Mapping[str, Tensor] | None = None, *,
                names: Sequence[str] | None = None, inputs: MergeInputs | None = None,
                **hyperparameters) -> dict[str, Tensor]:
    """Merge two checkpoints with a registered method: every tensor of the merge set is merged, every other
    tensor comes from state_ft (the same object). The merge set is `names`, or else the tensors named in
    curv_ft. The inputs are never modified; a new dict is returned.

    Refused with a one-line ValueError: an unknown method, an unknown, missing or out-of-range
    hyperparameter, checkpoints with other tensor names or shapes, curvature that does not cover the merge
    set (for methods that use it), NaN/Inf weights, and a method called without an input it needs.
    """
    m = get_method(method)
    hp = m.check(hyperparameters)
    inputs = inputs or MergeInputs()
    if names is None:
        if curv_ft is None:
            raise ValueError(f"{method}: name the merged tensors (names=...) or pass the curvature that covers them")
        names = list(curv_ft)
    names = list(names)
    if m.uses_curvature or curv_pt is not None or curv_ft is not None:
        cgm.check_state_dicts(state_pt, state_ft, curv_pt or {}, curv_ft or {})
    else:
        cgm.check_state_dicts(state_pt, state_ft, {}, {})
    unknown = [n for n in names if n not in state_ft]
    if unknown:
        raise ValueError(f"{method}: merge-set tensors not in the checkpoints: {unknown[:5]}")
    if m.uses_curvature:
        uncovered = [n for n in names if n not in (curv_ft or {}) or n not in (curv_pt or {})]
        if uncovered:
            raise ValueError(f"{method} uses curvature, but h_pt / h_ft do not cover {uncovered[:5]}")
    if "activations" in m.needs:
        acts = inputs.activations or {}
        missing = [n for n in names if n.endswith(".weight") and state_ft[n].dim() == 2 and n not in acts]
        if missing:
            raise ValueError(f"{method} needs activation statistics (MergeInputs.activations) of the merged "
                             f"linear weights; missing for {missing[:3]}")
    if "target" in m.needs and inputs.target is None:
        raise ValueError(f"{method} needs target data (MergeInputs.target); none given")
    for i, other in enumerate(inputs.fine_tuned_others):
        cgm.check_state_dicts(state_pt, other, {}, {})
    for n in names:
        _check_finite(n, "w_pt", state_pt[n])
        _check_finite(n, "w_ft", state_ft[n])
        if m.uses_curvature:
            cgm.check_mix_inputs(state_pt[n], state_ft[n], curv_pt[n], curv_ft[n], name=n)
    merged = dict(state_ft)
    if m.level == "model":
        merged.update(m.fn(state_pt, state_ft, names, inputs, **hp))
        return merged
    for n in names:
        t = TensorInputs(n, state_pt[n], state_ft[n],
                         curv_pt[n] if m.uses_curvature else None, curv_ft[n] if m.uses_curvature else None,
                         (inputs.activations or {}).get(n), tuple(o[n] for o in inputs.fine_tuned_others))
        merged[n] = m.fn(t, **hp)
    return merged


def methods_table():
    """The registry as a DataFrame (for the book): name, family, rule, hyperparameters with ranges, needs,
    reference."""
    import pandas as pd
    rows = [{"method": m.name, "family": m.family, "rule": m.rule,
             "hyperparameters": ", ".join(f"{p} in {r}" if r is not None else f"{p} (flag)"
                                          for p, r in m.ranges.items()) or "-",
             "needs": ", ".join(sorted(m.needs)) or "-", "reference": m.reference} for m in METHODS.values()]
    return pd.DataFrame(rows).set_index("method")


# The method modules register themselves on import.
from . import interpolation, task_vectors, reversion, curvature, tailor, grafting  # noqa: E402,F401
