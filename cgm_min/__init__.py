"""cgm_min: Curvature-Guided Mixing (CGM, CGM-dagger) in one readable module, `cgm_min.cgm`,
and the small world around it (merge-method registry, notebook pipeline, report helpers)."""
from .cgm import (alpha_from_normalised, cgm_merge, closed_form, curvature_scale_ratio, diag_fisher, hard_mix,
                  hard_mix_score, hutchinson_diag_hessian, revert_ratio, soft_mix)

__all__ = ["revert_ratio", "soft_mix", "hard_mix_score", "hard_mix", "closed_form", "cgm_merge",
           "curvature_scale_ratio", "alpha_from_normalised", "diag_fisher", "hutchinson_diag_hessian"]
__version__ = "0.1.0"
