"""Curvature-Guided Mixing (CGM, CGM-dagger) on one page.

Reference: J. Yang, J. He, W. Huang, Z. Zhuang, J. Zhang, "Curvature-Guided Mixing for MLLM
Adaptation", arXiv:2606.24963 (2026). Equation numbers below are the paper's.

Notation (the book's notation page uses the same names):
    w_pt, w_ft   pre-trained and fine-tuned weights of one tensor
    delta        w_pt - w_ft, the reversion vector (it points from w_ft back to w_pt)
    h_pt, h_ft   diagonal curvature of the pre-training loss at w_pt and of the fine-tuning loss at w_ft
    alpha        weight of the pre-training loss in the joint objective (Eq. 5)
    lam          per-entry reversion ratio (Eq. 8): merged w = w_ft + lam * delta
    k            CGM-dagger budget: the fraction of entries reverted to w_pt (the authors' code calls
                 1 - k its `sparse_level`)
    score        the Eq. 12 coefficient c_i; the k lowest-scoring entries are reverted

The page has two halves that never mix: *mixing* (pure tensor functions, Eq. 5-13) and
*measurement* (the diagonal curvature of a model's loss, by empirical Fisher or by Hutchinson).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Input checks: every mixing function refuses what would silently give a wrong merge.

def check_hyperparameters(alpha: float, k: float | None = None) -> None:
    """`alpha` must be finite and >= 0; `k`, when given, must lie in [0, 1]."""
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if k is not None and (not isinstance(k, (int, float)) or not 0.0 <= k <= 1.0):
        raise ValueError(f"k (fraction of entries reverted) must lie in [0, 1], got {k!r}")


def check_mix_inputs(w_pt: Tensor, w_ft: Tensor, h_pt: Tensor, h_ft: Tensor, name: str = "tensor") -> None:
    """Same shapes, finite values, non-negative curvature, and curvature that is not zero everywhere."""
    for label, t in (("w_pt", w_pt), ("w_ft", w_ft), ("h_pt", h_pt), ("h_ft", h_ft)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != w_ft.shape:
            raise ValueError(f"{name}: shape mismatch, {label} has {tuple(t.shape)} but w_ft has {tuple(w_ft.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: {label} contains NaN or Inf")
    for label, h in (("h_pt", h_pt), ("h_ft", h_ft)):
        if (h < 0).any():
            raise ValueError(f"{name}: {label} has negative entries (min {h.min().item():.3g}); "
                             "a diagonal curvature estimate must be >= 0")
        if h.numel() > 0 and not h.any():
            raise ValueError(f"{name}: {label} is zero everywhere; such a curvature carries no information "
                             "(a Fisher that was never accumulated?) and would silently decide the merge")


# ----------------------------------------------------------------------------------------------
# Soft mixing (CGM): Eq. 5-8.

def revert_ratio(h_pt: Tensor, h_ft: Tensor, alpha: float) -> Tensor:
    """Eq. 8: lam = alpha*h_pt / (h_ft + alpha*h_pt), the minimiser of the per-entry objective (Eq. 7)

        l(lam) = 1/2 delta^2 [h_ft lam^2 + alpha h_pt (lam - 1)^2].

    lam is in [0, 1]: 0 keeps w_ft, 1 reverts to w_pt.

    Rule for entries where h_ft + alpha*h_pt == 0 (no curvature information, l is flat): we take the
    limit of equal vanishing curvatures, h_pt = h_ft = eps -> 0, which gives lam = alpha / (1 + alpha),
    i.e. plain weighted interpolation. The rule is continuous under adding the same small damping to
    both curvatures, and it neither trusts w_ft nor w_pt more than alpha says.
    """
    num = alpha * h_pt
    den = h_ft + num
    fallback = torch.full_like(den, alpha / (1.0 + alpha))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), fallback)


def soft_mix(w_pt: Tensor, w_ft: Tensor, h_pt: Tensor, h_ft: Tensor, alpha: float, name: str = "tensor") -> Tensor:
    """CGM: w = w_ft + lam * (w_pt - w_ft), entry by entry, with lam from Eq. 8.

    Computed in float32 (float64 if the weights are float64) and returned in w_ft's dtype. torch.lerp
    evaluates the same formula but is exact at the ends: lam = 0 gives w_ft and lam = 1 gives w_pt
    bit for bit (w_ft + (w_pt - w_ft) is not always w_pt in floating point).
    """
    check_hyperparameters(alpha)
    check_mix_inputs(w_pt, w_ft, h_pt, h_ft, name)
    dt = torch.promote_types(w_ft.dtype, torch.float32)
    lam = revert_ratio(h_pt.to(dt), h_ft.to(dt), alpha)
    return torch.lerp(w_ft.to(dt), w_pt.to(dt), lam).to(w_ft.dtype)


def closed_form(w_pt: Tensor, w_ft: Tensor, H_pt: Tensor, H_ft: Tensor, alpha: float) -> Tensor:
    """Minimiser of the joint quadratic (Eq. 5) with full Hessians, for the toy chapters:

        argmin_w 1/2 (w - w_ft)^T H_ft (w - w_ft) + alpha/2 (w - w_pt)^T H_pt (w - w_pt)
          = (H_ft + alpha H_pt)^{-1} (H_ft w_ft + alpha H_pt w_pt).

    `w_*` are vectors (d,). `H_*` are (d, d) matrices, or (d,) vectors meaning diagonal matrices; the
    diagonal case is exactly `soft_mix` (the same rule for entries without curvature). Only the symmetric
    part of a matrix enters a quadratic form, so (H + H^T)/2 is used.
    """
    check_hyperparameters(alpha)
    if w_pt.shape != w_ft.shape or w_ft.dim() != 1:
        raise ValueError(f"closed_form: w_pt and w_ft must be vectors of one shape, got {tuple(w_pt.shape)} "
                         f"and {tuple(w_ft.shape)}")
    if H_pt.dim() == 1 and H_ft.dim() == 1:
        return soft_mix(w_pt, w_ft, H_pt, H_ft, alpha, name="closed_form")
    d = w_ft.shape[0]
    for label, H in (("H_pt", H_pt), ("H_ft", H_ft)):
        if H.shape != (d, d):
            raise ValueError(f"closed_form: {label} must be ({d}, {d}) (or both H_pt and H_ft ({d},) vectors), "
                             f"got {tuple(H.shape)}")
    for label, t in (("w_pt", w_pt), ("w_ft", w_ft), ("H_pt", H_pt), ("H_ft", H_ft)):
        if not torch.isfinite(t).all():
            raise ValueError(f"closed_form: {label} contains NaN or Inf")
    H_pt, H_ft = (H_pt + H_pt.mT) / 2, (H_ft + H_ft.mT) / 2
    A = H_ft + alpha * H_pt
    b = H_ft @ w_ft + alpha * (H_pt @ w_pt)
    if torch.linalg.matrix_rank(A, hermitian=True) < d or torch.linalg.cholesky_ex(A).info != 0:
        raise ValueError("closed_form: H_ft + alpha*H_pt is not positive definite (singular or with negative "
                         "curvature), the joint quadratic has no unique minimiser")
    return torch.linalg.solve(A, b)


# ----------------------------------------------------------------------------------------------
# Hard mixing (CGM-dagger): Eq. 9-13.

def hard_mix_score(w_pt: Tensor, w_ft: Tensor, h_pt: Tensor, h_ft: Tensor, alpha: float) -> Tensor:
    """Eq. 12: c = 1/2 (h_ft - alpha*h_pt) * delta^2, the change of the joint loss when one entry is
    reverted (m_i: 0 -> 1). Negative scores lower the joint loss; the lowest are reverted first.
    Computed in float32, or float64 if the weights are float64."""
    dt = torch.promote_types(w_ft.dtype, torch.float32)
    delta = w_pt.to(dt) - w_ft.to(dt)
    return 0.5 * (h_ft.to(dt) - alpha * h_pt.to(dt)) * delta ** 2


def revert_count(n: int, k: float) -> int:
    """How many of n entries a budget k reverts: round(k * n), halves rounded up."""
    return min(n, int(math.floor(k * n + 0.5)))


def select_lowest(score: Tensor, k: float, per_row: bool = True) -> Tensor:
    """Boolean mask of the `revert_count(n, k)` lowest scores, per output row (`per_row=True`, rows =
    first dimension, every other dimension flattened into columns) or over the whole tensor (Eq. 13).

    O(n) selection: the m-th smallest value of each row is the threshold (a partial selection, `kth_smallest`);
    entries below it are taken and ties at it are taken in index order (lowest index first), so the mask is
    deterministic and equals a stable sort's first m.
    """
    if score.numel() == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    rows = score.reshape(score.shape[0], -1) if (per_row and score.dim() > 1) else score.reshape(1, -1)
    m = revert_count(rows.shape[1], k)
    if m == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = kth_smallest(rows, m)                                      # (rows, 1)
    mask = rows <= thresh
    over = mask.sum(dim=1) > m                                          # rows with more ties than budget left
    if over.any():
        r, t = rows[over], thresh[over]
        below, ties = r < t, r == t
        need = m - below.sum(dim=1, keepdim=True)                      # ties still to take, per row
        mask[over] = below | (ties & (ties.cumsum(dim=1) <= need))
    return mask.reshape(score.shape)


def kth_smallest(rows: Tensor, m: int) -> Tensor:
    """(rows, 1): the m-th smallest value of each row (1 <= m <= n), by a partial selection of the m smallest
    or of the n - m + 1 largest, whichever is fewer (torch.topk: several times faster than kthvalue or a
    sort on CPU)."""
    n = rows.shape[1]
    if m <= n - m + 1:
        return torch.topk(rows, m, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    return torch.topk(rows, n - m + 1, dim=1, largest=True, sorted=False).values.amin(dim=1, keepdim=True)


def hard_mix(w_pt: Tensor, w_ft: Tensor, h_pt: Tensor, h_ft: Tensor, alpha: float, k: float,
             per_row: bool = True, name: str = "tensor") -> Tensor:
    """CGM-dagger: revert to w_pt the fraction k of entries with the lowest Eq. 12 score, keep w_ft elsewhere.

    per_row=True applies the budget within each output row (what the authors ran); per_row=False applies
    one budget over the whole tensor (Eq. 13 as written). A 1-D tensor is one row.
    """
    check_hyperparameters(alpha, k)
    check_mix_inputs(w_pt, w_ft, h_pt, h_ft, name)
    mask = select_lowest(hard_mix_score(w_pt, w_ft, h_pt, h_ft, alpha), k, per_row)
    return torch.where(mask, w_pt.to(w_ft.dtype), w_ft)


# ----------------------------------------------------------------------------------------------
# Whole models: merge two state dicts with a curvature dict each.

def check_state_dicts(state_pt: Mapping[str, Tensor], state_ft: Mapping[str, Tensor],
                      curv_pt: Mapping[str, Tensor], curv_ft: Mapping[str, Tensor]) -> None:
    """The two checkpoints have the same tensor names and shapes; both curvature dicts name the same
    tensors, all of them in the checkpoints."""
    if set(state_pt) != set(state_ft):
        only_pt, only_ft = sorted(set(state_pt) - set(state_ft)), sorted(set(state_ft) - set(state_pt))
        raise ValueError(f"state dicts have different tensor names: only in state_pt {only_pt[:5]}, "
                         f"only in state_ft {only_ft[:5]}")
    for name in state_ft:
        if state_pt[name].shape != state_ft[name].shape:
            raise ValueError(f"{name}: shape mismatch, state_pt has {tuple(state_pt[name].shape)} but state_ft "
                             f"has {tuple(state_ft[name].shape)} (are these the same architecture?)")
    if set(curv_pt) != set(curv_ft):
        raise ValueError(f"curv_pt and curv_ft name different tensors: "
                         f"{sorted(set(curv_pt) ^ set(curv_ft))[:5]}")
    unknown = sorted(set(curv_ft) - set(state_ft))
    if unknown:
        raise ValueError(f"curvature given for tensors that are not in the state dicts: {unknown[:5]}")


def cgm_merge(state_pt: Mapping[str, Tensor], state_ft: Mapping[str, Tensor], curv_pt: Mapping[str, Tensor],
              curv_ft: Mapping[str, Tensor], alpha: float, k: float | None = None,
              per_row: bool = True) -> dict[str, Tensor]:
    """Merge every tensor that has curvature (soft mixing if k is None, else hard mixing with budget k);
    every other tensor is taken from state_ft unchanged (the same tensor object, not a copy).
    The inputs are never modified; a new dict is returned."""
    check_hyperparameters(alpha, k)
    check_state_dicts(state_pt, state_ft, curv_pt, curv_ft)
    merged = dict(state_ft)
    for name in curv_ft:
        args = (state_pt[name], state_ft[name], curv_pt[name], curv_ft[name], alpha)
        merged[name] = soft_mix(*args, name=name) if k is None else hard_mix(*args, k, per_row, name=name)
    return merged


def total_curvature(curv: Mapping[str, Tensor]) -> float:
    """sum of every entry of every tensor of a curvature dict, accumulated in float64."""
    return sum(float(h.double().sum()) for h in curv.values())


def curvature_scale_ratio(curv_pt: Mapping[str, Tensor], curv_ft: Mapping[str, Tensor]) -> float:
    """sum(h_ft) / sum(h_pt) over all tensors. alpha * this ratio is the alpha that weighs the two losses
    equally in total curvature: report it with every alpha, since on a saturated base h_pt can be
    orders of magnitude smaller than h_ft."""
    s_pt, s_ft = total_curvature(curv_pt), total_curvature(curv_ft)
    if s_pt <= 0:
        raise ValueError("curvature_scale_ratio: h_pt sums to zero")
    return s_ft / s_pt


def alpha_from_normalised(alpha_norm: float, curv_pt: Mapping[str, Tensor], curv_ft: Mapping[str, Tensor]) -> float:
    """The alpha of Eq. 8 for a normalised alpha: alpha = alpha_norm * sum(h_ft) / sum(h_pt).

    alpha_norm = 1 gives the two curvatures the same total weight, whatever their scales; the normalised
    value is comparable across models, curvature estimators and numbers of calibration samples."""
    check_hyperparameters(alpha_norm)
    return alpha_norm * curvature_scale_ratio(curv_pt, curv_ft)


# ----------------------------------------------------------------------------------------------
# Measurement: the diagonal curvature of a model's loss.

def split_samples(batch: Mapping[str, object]) -> Iterator[dict]:
    """Yield one-sample dicts from a batch of model inputs whose leading dimension is samples.

    `labels` gives the number of samples. Qwen2-VL style `pixel_values` (patches of all images stacked,
    with `image_grid_thw` rows per image) are split by image; any other non-tensor or non-batched value
    is passed through unchanged.
    """
    n = batch["labels"].shape[0]
    grid = batch.get("image_grid_thw")
    if grid is not None and "pixel_values" in batch and batch["pixel_values"].shape[0] != n:
        if grid.shape[0] != n:
            raise ValueError("split_samples: image_grid_thw must have one row per sample "
                             f"({grid.shape[0]} rows for {n} samples)")
        bounds = [0] + grid.prod(dim=1).cumsum(0).tolist()
    for i in range(n):
        one = {}
        for key, v in batch.items():
            if key == "pixel_values" and grid is not None and v.shape[0] != n:
                one[key] = v[bounds[i]:bounds[i + 1]]
            elif isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
                one[key] = v[i:i + 1]
            else:
                one[key] = v
        yield one


def _selected_parameters(model: torch.nn.Module, param_names: Iterable[str] | None) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    if param_names is None:
        return params
    names = list(param_names)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"param_names not found in the model: {missing[:5]}")
    return {n: params[n] for n in names}


class _GradientsOnly:
    """Context: eval mode, gradients enabled exactly on the chosen parameters (also when the caller runs
    under torch.no_grad()), everything restored after."""

    def __init__(self, model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter]):
        self.model, self.chosen = model, {id(p) for p in params.values()}
        self.grad_mode = torch.enable_grad()

    def __enter__(self):
        self.grad_mode.__enter__()
        self.training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.chosen)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)
        self.grad_mode.__exit__(*exc)


def diag_fisher(model: torch.nn.Module, batches: Iterable[Mapping], param_names: Iterable[str] | None = None,
                progress: bool = True) -> dict[str, Tensor]:
    """Empirical Fisher diagonal: F = 1/N sum_n (grad of loss_n)^2, the mean over SAMPLES of the squared
    per-sample gradient, loss_n = model(**sample_n).loss. (Squaring a batch gradient instead gives
    (sum_n g_n)^2 / N^2, which is not this.) Parameters that get no gradient get zeros.

    float32 accumulation for any model dtype; no .grad is left on the model.
    """
    params = _selected_parameters(model, param_names)
    names, tensors = list(params), list(params.values())
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    n_seen = 0
    with _GradientsOnly(model, params):
        bar = tqdm(desc="empirical Fisher", unit="sample", disable=not progress)
        for batch in batches:
            for sample in split_samples(batch):
                loss = model(**sample).loss
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        fisher[n] += g.float() ** 2
                n_seen += 1
                bar.update(1)
        bar.close()
    if n_seen == 0:
        raise ValueError("diag_fisher: no samples in batches")
    return {n: f / n_seen for n, f in fisher.items()}


def hutchinson_diag_hessian(model: torch.nn.Module, batches: Iterable[Mapping], n_probes: int,
                            param_names: Iterable[str] | None = None, seed: int = 0,
                            progress: bool = True) -> dict[str, Tensor]:
    """Hutchinson estimate of the Hessian diagonal: diag(H) = E_v[v * (H v)] for Rademacher v (+-1), with
    H v from a Hessian-vector product (double backward). H is the Hessian of the mean loss over batches,
    each batch's `model(**batch).loss` weighted by its number of samples. Parameters that get no
    gradient get zeros. Unlike the Fisher, entries can be negative away from a minimum.
    """
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
    params = _selected_parameters(model, param_names)
    names, tensors = list(params), list(params.values())
    est = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    n_seen = 0
    from torch.nn.attention import SDPBackend, sdpa_kernel   # the math kernel supports double backward
    with _GradientsOnly(model, params), sdpa_kernel(SDPBackend.MATH):
        bar = tqdm(desc="Hutchinson", unit="probe", disable=not progress)
        for batch in batches:
            n = batch["labels"].shape[0]
            grads = torch.autograd.grad(model(**batch).loss, tensors, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            for _ in range(n_probes):
                vs = [(torch.randint(0, 2, tensors[i].shape, generator=gen) * 2 - 1).to(tensors[i])
                      for i in live]
                hvs = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live], grad_outputs=vs,
                                          retain_graph=True, allow_unused=True)
                for i, v, hv in zip(live, vs, hvs):
                    if hv is not None:
                        est[names[i]] += n * (v * hv).float() / n_probes
                bar.update(1)
            n_seen += n
        bar.close()
    if n_seen == 0:
        raise ValueError("hutchinson_diag_hessian: no samples in batches")
    return {n: e / n_seen for n, e in est.items()}
