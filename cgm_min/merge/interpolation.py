"""Endpoints and interpolation: the two checkpoints themselves, WiSE-FT's straight line, task arithmetic."""
from __future__ import annotations

import torch

from . import Fraction, NonNegative, TensorInputs, register


@register("pre_trained", "endpoint", "the pre-trained model itself", rule="w = w_pt")
def pre_trained(t: TensorInputs):
    return t.w_pt.to(t.w_ft.dtype)


@register("fine_tuned", "endpoint", "the fine-tuned model itself", rule="w = w_ft")
def fine_tuned(t: TensorInputs):
    return t.w_ft


@register("linear", "interpolation", "weight interpolation (Wortsman et al. 2022, WiSE-FT)",
          rule="w = w_ft + lam (w_pt - w_ft)")
def linear(t: TensorInputs, lam: Fraction):
    """w_ft + lam * (w_pt - w_ft), exact at lam = 0 and 1 (torch.lerp)."""
    return torch.lerp(t.w_ft.to(t.dtype), t.w_pt.to(t.dtype), lam).to(t.w_ft.dtype)


@register("task_arithmetic", "interpolation", "task arithmetic (Ilharco et al. 2023)",
          needs=(), rule="w = w_pt + scale * sum_t tau_t, tau_t = w_ft,t - w_pt")
def task_arithmetic(t: TensorInputs, scale: NonNegative):
    """w_pt + scale * (sum of the task vectors of every fine-tuned copy). With one fine-tuned model this is
    linear interpolation with lam = 1 - scale (for scale <= 1)."""
    return (t.w_pt.to(t.dtype) + scale * torch.stack(t.task_vectors()).sum(0)).to(t.w_ft.dtype)
