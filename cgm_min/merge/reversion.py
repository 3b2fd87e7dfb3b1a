"""Reversion methods: keep w_ft, and send a fraction k of the entries back to w_pt, chosen by a score.

Each method differs only in its score; the lowest scores are reverted (`revert_lowest`, within each output
row when per_row=True, the authors' practice, or over the whole tensor). CGM-dagger's own score (Eq. 12)
is in `curvature.py`.
"""
from __future__ import annotations

import torch

from .. import cgm
from . import Count, Flag, Fraction, NonNegative, TensorInputs, register

Tensor = torch.Tensor


def revert_lowest(t: TensorInputs, score: Tensor, k: float, per_row: bool) -> Tensor:
    """Revert to w_pt the fraction k of entries with the lowest `score`; keep w_ft elsewhere."""
    cgm.check_hyperparameters(0.0, k)
    return torch.where(cgm.select_lowest(score, k, per_row), t.w_pt.to(t.w_ft.dtype), t.w_ft)


def delta_sq(t: TensorInputs) -> Tensor:
    """delta^2 = (w_pt - w_ft)^2, with the difference taken in float32 (float64)."""
    return (t.w_pt.to(t.dtype) - t.w_ft.to(t.dtype)) ** 2


@register("magnitude", "reversion", "revert the smallest |w_ft - w_pt| (the paper's Magnitude)",
          rule="revert the fraction k with the smallest |delta|")
def magnitude(t: TensorInputs, k: Fraction, per_row: Flag = True):
    return revert_lowest(t, delta_sq(t), k, per_row)


@register("random_revert", "reversion", "random reversion: the control every selective method must beat",
          rule="revert a uniformly random fraction k of the entries")
def random_revert(t: TensorInputs, k: Fraction, seed: Count = 0, per_row: Flag = True):
    """Exactly round(k * n) entries (per row, or per tensor) chosen uniformly at random, seeded by
    (seed, tensor name)."""
    score = torch.rand(t.w_ft.shape, generator=t.generator(seed))
    return revert_lowest(t, score, k, per_row)


def wanda_score(t: TensorInputs) -> Tensor:
    """|delta_ij| * ||X_j||_2 for a linear weight with activation statistics (X: the weight's inputs on the
    calibration tokens); |delta| for tensors without them (biases, norms)."""
    if t.act is None or t.w_ft.dim() != 2:
        return delta_sq(t).sqrt()
    if t.act.col_sq.shape != (t.w_ft.shape[1],):
        raise ValueError(f"{t.name}: activation statistics for {tuple(t.act.col_sq.shape)} inputs, but the "
                         f"weight has {t.w_ft.shape[1]} input columns")
    return delta_sq(t).sqrt() * t.act.col_sq.to(t.dtype).sqrt()[None, :]


@register("wanda", "reversion", "Wanda's score applied to the task vector (Sun et al. 2024)",
          needs=("activations",), rule="revert the fraction k with the smallest |delta_ij| ||X_j||, per row")
def wanda(t: TensorInputs, k: Fraction, per_row: Flag = True):
    """Wanda prunes the weights with the smallest |W_ij| ||X_j||_2 within each output row; applied to the
    reversion vector, it reverts the entries of delta whose effect on the layer's output is smallest."""
    return revert_lowest(t, wanda_score(t), k, per_row)


@register("score_ft_magnitude", "reversion", "Table 5 row 2: score h_ft * delta^2 (Yang et al. 2026)",
          needs=("curvature",), rule="revert the fraction k with the smallest h_ft delta^2")
def score_ft_magnitude(t: TensorInputs, k: Fraction, per_row: Flag = True):
    return revert_lowest(t, t.h_ft.to(t.dtype) * delta_sq(t), k, per_row)


@register("score_pt_magnitude", "reversion", "Table 5 row 3: score -alpha * h_pt * delta^2 (Yang et al. 2026)",
          needs=("curvature",), rule="revert the fraction k with the largest alpha h_pt delta^2")
def score_pt_magnitude(t: TensorInputs, alpha: NonNegative, k: Fraction, per_row: Flag = True):
    return revert_lowest(t, -alpha * t.h_pt.to(t.dtype) * delta_sq(t), k, per_row)
