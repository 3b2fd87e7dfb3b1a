"""Curvature-weighted methods: CGM soft mixing (Eq. 8), CGM-dagger hard mixing (Eq. 12-13), and Fisher
merging, which for two models is CGM with alpha = lam_pt / (1 - lam_pt)."""
from __future__ import annotations

import torch

from .. import cgm
from . import Flag, Fraction, NonNegative, TensorInputs, register


@register("cgm", "curvature", "CGM soft mixing, Eq. 8 (Yang et al. 2026)", needs=("curvature",),
          rule="w = w_ft + lam delta, lam = alpha h_pt / (h_ft + alpha h_pt)")
def cgm_soft(t: TensorInputs, alpha: NonNegative):
    return cgm.soft_mix(t.w_pt, t.w_ft, t.h_pt, t.h_ft, alpha, name=t.name)


@register("cgm_dagger", "reversion", "CGM-dagger hard mixing, Eq. 12-13 (Yang et al. 2026)", needs=("curvature",),
          rule="revert the fraction k with the lowest (h_ft - alpha h_pt) delta^2")
def cgm_dagger(t: TensorInputs, alpha: NonNegative, k: Fraction, per_row: Flag = True):
    return cgm.hard_mix(t.w_pt, t.w_ft, t.h_pt, t.h_ft, alpha, k, per_row, name=t.name)


@register("fisher_merging", "curvature", "Fisher merging (Matena & Raffel 2022)", needs=("curvature",),
          rule="w = (lam_pt F_pt w_pt + (1-lam_pt) F_ft w_ft) / (lam_pt F_pt + (1-lam_pt) F_ft)")
def fisher_merging(t: TensorInputs, lam_pt: Fraction):
    """The Fisher-weighted average of the two models with model weights lam_pt and 1 - lam_pt, entry by
    entry. Where both Fishers are zero the weighted average lam_pt w_pt + (1 - lam_pt) w_ft is used (the
    limit of equal, vanishing Fishers)."""
    dt = t.dtype
    a, b = lam_pt * t.h_pt.to(dt), (1.0 - lam_pt) * t.h_ft.to(dt)
    den = a + b
    fisher = (a * t.w_pt.to(dt) + b * t.w_ft.to(dt)) / torch.where(den > 0, den, torch.ones_like(den))
    plain = lam_pt * t.w_pt.to(dt) + (1.0 - lam_pt) * t.w_ft.to(dt)
    return torch.where(den > 0, fisher, plain).to(t.w_ft.dtype)
