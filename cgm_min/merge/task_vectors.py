"""Task-vector methods: TIES (trim, elect sign, disjoint mean) and DARE (drop and rescale)."""
from __future__ import annotations

import torch

from .. import cgm
from . import Count, Fraction, NonNegative, Probability, TensorInputs, register


def keep_largest(tau: torch.Tensor, k: float) -> torch.Tensor:
    """tau with all but its round(k * n) largest-magnitude entries set to zero (ties: lowest index kept)."""
    keep = cgm.select_lowest(-tau.abs(), k, per_row=False)
    return torch.where(keep, tau, torch.zeros_like(tau))


@register("ties", "task vectors", "TIES-Merging (Yadav et al. 2023)",
          rule="trim each tau to its top-k |entries|, elect signs, disjoint mean; w = w_pt + scale * tau_m")
def ties(t: TensorInputs, k: Fraction, scale: NonNegative = 1.0):
    """TIES: (1) trim every task vector to its round(k * n) largest magnitudes (k = the fraction KEPT, as
    in the TIES paper); (2) elect each entry's sign as the sign of the sum of the trimmed vectors; (3) average
    the trimmed entries that agree with the elected sign (disjoint mean); w = w_pt + scale * merged."""
    trimmed = torch.stack([keep_largest(tau, k) for tau in t.task_vectors()])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    merged = torch.where(count > 0, (trimmed * agree).sum(0) / count.clamp(min=1), torch.zeros_like(sign))
    return (t.w_pt.to(t.dtype) + scale * merged).to(t.w_ft.dtype)


@register("dare", "task vectors", "DARE, drop and rescale (Yu et al. 2024)",
          rule="drop each tau entry with probability p, rescale the rest by 1/(1-p); w = w_pt + scale * sum")
def dare(t: TensorInputs, p: Probability, seed: Count = 0, scale: NonNegative = 1.0):
    """Each task-vector entry is dropped with probability p (an independent Bernoulli draw per entry, seeded
    by (seed, tensor name)) and the survivors are divided by 1 - p, so the expected task vector is
    unchanged; the rescaled vectors of every fine-tuned copy are added to w_pt (times `scale`)."""
    g = t.generator(seed)
    out = t.w_pt.to(t.dtype).clone()
    for tau in t.task_vectors():
        keep = torch.rand(tau.shape, generator=g) >= p
        out += scale * torch.where(keep, tau / (1.0 - p), torch.zeros_like(tau))
    return out.to(t.w_ft.dtype)
