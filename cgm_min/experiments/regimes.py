"""The regime study, decided before any merge was run: which knobs are turned, what is compared, and which
of the paper's claims each comparison tests.

A regime is a set of fine-tuning knobs (RunSpec fields) changed from the default, the paper's set-up in
miniature. The curvature kind (and the number of calibration samples for h_pt) is a knob of the merge, not
of the run: it is studied on the default runs (`runs.CURVATURE_KINDS`).

The comparison, in every regime and for every family, target and seed:
  * each method's hyperparameters are chosen on the validation split (best Hscore) and the chosen merge is
    reported on the held-out split;
  * CGM and CGM-dagger are compared with the best baseline (the baseline with the best mean validation
    Hscore over seeds) by the paired held-out difference, with a bootstrap interval over held-out samples
    and seeds;
  * the selection-free comparison is the area each method's grid dominates in the (Target, Pre-Avg) plane;
  * a difference counts as a separation when its 95% interval excludes zero; otherwise the methods are
    not told apart.
"""
from __future__ import annotations

from dataclasses import replace

from .runs import RunSpec

REGIMES = {
    "default": {"knobs": {}, "what": "the paper's set-up in miniature: the last half of the decoder layers and "
                "the connector, 200 steps at learning rate 5e-4"},
    "long": {"knobs": {"steps": 400, "lr": 1e-3}, "what": "stronger fine-tuning: 400 steps at 1e-3, twice the "
             "steps at twice the rate"},
    "whole": {"knobs": {"n_layers": 4}, "what": "the whole decoder and the connector fine-tuned and merged, where "
              "post-hoc merging is reported to degrade"},
    "wide": {"knobs": {"size": "wide"}, "what": "a wider base: decoder hidden size 256 instead of 128 "
             "(about 4 M parameters instead of 1.4 M)"},
}


def spec_for(regime: str, family: str, target: str, seed: int) -> RunSpec:
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {list(REGIMES)}")
    return replace(RunSpec(family, target, seed), **REGIMES[regime]["knobs"])


# The paper's claims (Yang et al. 2026) that the miniature world can test, each with the comparison that
# tests it. The chapter marks each one reproduced in miniature / not reproduced / not testable here, with
# the evidence next to it, whatever the evidence says.
CLAIMS = [
    {"id": "mitigates", "claim": "CGM and CGM-dagger mitigate forgetting: merged models keep most of the "
     "target gain and recover general skills (Tables 1-4)",
     "test": "held-out Pre-Avg of the chosen merge above the fine-tuned model's, target within 10 points"},
    {"id": "beats_comparators", "claim": "CGM-dagger has the best Hscore among the paper's comparators "
     "(Model Tailor, DARE, Grafting, Magnitude, Wanda) (Tables 1-4)",
     "test": "paired held-out Hscore of CGM-dagger minus the best of those comparators"},
    {"id": "beats_interpolation", "claim": "(not in the paper) curvature guidance beats plain weight "
     "interpolation (WiSE-FT), the first baseline a reader asks for",
     "test": "paired held-out Hscore of CGM and of CGM-dagger minus linear interpolation"},
    {"id": "score_ablation", "claim": "the full Eq. 12 score beats magnitude alone; the pre-training term "
     "carries most of the gain, the fine-tuning term alone does not help (Table 5)",
     "test": "held-out Hscore of the four scores at their validation-chosen k"},
    {"id": "hutchinson", "claim": "a Hutchinson estimate of the Hessian diagonal is stronger than the "
     "empirical Fisher (stated, no numbers)",
     "test": "paired held-out Hscore of CGM / CGM-dagger with Hutchinson minus with Fisher"},
    {"id": "k_flat", "claim": "Pre-Avg is nearly flat in K and the best K is about 10% (Fig. 4)",
     "test": "validation Pre-Avg and Hscore of CGM-dagger against k"},
    {"id": "depth", "claim": "(Model-Dowser, cited in the issue) post-hoc merging degrades when fine-tuning "
     "reaches the whole decoder",
     "test": "Hscore gain of the best merge over the fine-tuned model, default vs whole-decoder regime"},
    {"id": "fisher_merging", "claim": "Fisher merging is a special case of CGM (Sec. 3.2)",
     "test": "the two registry methods on the same inputs, alpha = lam_pt / (1 - lam_pt)"},
    {"id": "overhead", "claim": "estimating the Fisher during fine-tuning costs about 8% throughput",
     "test": "fine-tuning time with and without h_ft accumulation (benchmarks/mini_world.py)"},
    {"id": "bands", "claim": "CGM-dagger's masks form column bands (Figs. 5, 6)",
     "test": "drawn by the figure chapter; no band claim is tested here"},
]
