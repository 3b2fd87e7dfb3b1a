"""Model Tailor (Zhu et al., ICML 2024, arXiv:2402.12048): keep w_pt, graft back a sparse "model patch" of
fine-tuned entries chosen by fusing a salience and a sensitivity score, then "decorate" the patch: adjust
the kept entries so that the layer's output on calibration inputs moves as little as possible (the
Optimal-Brain-Surgeon / SparseGPT update with the inverse Hessian of the layer-wise squared error).

What the authors' code does (github.com/didizhu-zju/Model-Tailor, commit e24dafe, `main_model_tailor.py`
with `llava/train/sparsegpt.py`), and what we do, for one linear weight W (out x in) with inputs X
(n tokens x in) collected on the target data:

    H       = 2/n X^T X; columns that never see an input get H_jj = 1; damping 1 % of mean(diag H)
    U       = upper Cholesky factor of H^-1 (U_jj^2 is [H^-1]_jj given the columns left of j are fixed)
    blocks  of 128 input columns, left to right; in each block, per output row, z-scores over the block:
    salience     |w_ft - w_pt|                          (the change made by fine-tuning)
    sensitivity  W_ij^2 / U_jj^2, W = the current weight (w_ft, compensated by the blocks to the left)
    importance   0.8 z(salience) + 0.2 z(sensitivity)
    patch   the entries of the block with the highest importance are kept, the rest reverted to w_pt
    decorate     column by column: err = (W_:,j - w_pt_:,j) / U_jj on reverted entries, and
                 W_:,j: <- W_:,j: - err U_j,j:  (the OBS update of the columns right of j)

Where we depart from that code, and why:
  * the sign of the compensation. The code adds err U_j,j: where SparseGPT (and OBS) subtracts it. With
    the code's sign the "compensation" moves the kept entries away from the optimum: in a check on
    correlated inputs it raised ||(W - W_ft) X^T||^2 to 2.4 times that of plain reversion, where the OBS
    sign halved it. We use the OBS sign: each reverted column's error is then minimised over the entries
    to its right.
  * the budget. The code reverts the entries at or below the int(k n)-th smallest importance of each block
    (one more than k n, plus ties; k = 0 still reverts one entry per block). We revert exactly round(k n)
    per block (`cgm.select_lowest`, ties by index), so k = 0 gives w_ft and k = 1 gives w_pt exactly.
  * a row whose block scores are all equal has std 0: the code divides by it (NaN); we give it z = 0.
  * calibration inputs. The code runs its layers in order and feeds each layer the outputs of the already
    tailored layers below; here every weight gets the statistics collected at w_ft (ActivationStats), so
    layers are independent (the merge is per tensor).
  * the merge set. The code tailors the linear weights of the fine-tuned decoder layers (20-31 of 32), leaves
    their norms at w_ft and sets the projector's linear weights to w_pt; here every tensor of the caller's
    merge set is tailored (the fallback below for tensors without inputs).
  * the two copies of sparsegpt.py in the authors' repository fuse 0.8/0.2 (the one main_model_tailor.py
    imports) and 0.5/0.5 (llava/sparsegpt.py); `salience_weight` (default 0.8) covers both.
Paper versus code: the sensitivity in the code is the SparseGPT pruning score of the *weight* (w^2 / [H^-1]_jj,
the error of setting the entry to zero), not of the change that reversion undoes (delta^2 / [H^-1]_jj); we
follow the code. The paper's own equations could not be read (only its abstract was available).

Tensors without activation statistics (biases, norms, any 1-D tensor, weights outside the statistics):
the part of the method that needs no inputs: importance = z(salience) in the same blocks (rows of a 1-D
tensor: one), no decoration. Up to the per-row z-scores this is magnitude reversion.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import cgm
from . import ActivationStats, Flag, Fraction, TensorInputs, register

Tensor = torch.Tensor

BLOCK = 128           # input columns per selection block (the authors' `blocksize`)
DAMPING = 0.01        # fraction of mean(diag H) added to the diagonal (the authors' `percdamp`)


def damped_hessian(act: ActivationStats, name: str = "tensor") -> Tensor:
    """H = 2/n X^T X + DAMPING mean(diag) I in float64, with H_jj = 1 for input columns that never saw a
    non-zero input (before damping), as the authors' code (from SparseGPT) does."""
    if act.gram is None:
        raise ValueError(f"{name}: model_tailor needs the Gram matrix X^T X of the inputs; collect the "
                         "activation statistics with gram=True")
    if act.n <= 0:
        raise ValueError(f"{name}: activation statistics over {act.n} tokens")
    H = act.gram.double() * (2.0 / act.n)
    H = (H + H.T) / 2
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H += DAMPING * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return H


def inverse_hessian_factor(H: Tensor, name: str = "tensor") -> Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U). U_jj^2 is the inverse-Hessian diagonal of column j
    once the columns left of j are fixed, and U_j,j: / U_jj is the OBS update of the columns right of j."""
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise ValueError(f"{name}: the damped Hessian 2/n X^T X is not positive definite")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def row_zscore(x: Tensor) -> Tensor:
    """(x - mean) / std along each row (unbiased std, as torch.std); rows with std 0 (or one column) give 0."""
    if x.shape[1] < 2:
        return torch.zeros_like(x)
    std = x.std(dim=1, keepdim=True)
    z = (x - x.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, z, torch.zeros_like(z))


def obs_revert(w_ft: Tensor, w_pt: Tensor, U: Tensor | None,
               choose: Callable[[Tensor, slice], Tensor], block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Revert, block by block of input columns, the entries `choose(W_block, columns)` marks (a boolean
    (rows, block columns) mask, given the block's current weights), and with U (the upper Cholesky factor
    of H^-1) compensate each reverted column on the columns to its right: the OBS update, in the order of
    the columns, of SparseGPT. Returns (W, reverted); W's reverted entries are exactly w_pt.

    w_ft, w_pt: (rows, cols) in the dtype of the math; U: (cols, cols) or None (no compensation)."""
    W = w_ft.clone()
    cols = W.shape[1]
    reverted = torch.zeros(W.shape, dtype=torch.bool)
    if U is not None:
        U = U.to(W.dtype)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        sl = slice(b0, b1)
        mask = choose(W[:, sl], sl)
        reverted[:, sl] = mask
        if U is None or not mask.any():
            continue
        Wb, Ub = W[:, sl].clone(), U[sl, sl]
        err = torch.zeros_like(Wb)
        for i in range(b1 - b0):
            e = torch.where(mask[:, i], (Wb[:, i] - w_pt[:, b0 + i]) / Ub[i, i], torch.zeros_like(Wb[:, i]))
            Wb[:, i:] -= e[:, None] * Ub[i, i:][None, :]
            err[:, i] = e
        W[:, sl] = Wb
        W[:, b1:] -= err @ U[sl, b1:]
    return torch.where(reverted, w_pt, W), reverted


@register("model_tailor", "reversion", "Model Tailor, salience + sensitivity patch with OBS decoration "
          "(Zhu et al., ICML 2024); as the authors' code, with the OBS sign of the compensation",
          needs=("activations",),
          rule="keep the fraction 1-k with the highest 0.8 z(|delta|) + 0.2 z(w^2/[H^-1]_jj) per 128 input "
               "columns; compensate the kept entries with H^-1, H = X^T X")
def model_tailor(t: TensorInputs, k: Fraction, salience_weight: Fraction = 0.8, compensate: Flag = True):
    """Exactly round(k n) entries of every block of 128 input columns reverted to w_pt (before the
    compensation, which changes only kept entries). See the module docstring for the formulas and for
    where this departs from the authors' code."""
    cgm.check_hyperparameters(0.0, k)
    dt = t.dtype
    shape = t.w_ft.shape
    rows = shape[0] if t.w_ft.dim() > 1 else 1
    w_ft = t.w_ft.to(dt).reshape(rows, -1)
    w_pt = t.w_pt.to(dt).reshape(rows, -1)
    salience = (w_ft - w_pt).abs()
    U = None
    if t.act is not None and t.w_ft.dim() == 2:
        if t.act.gram is not None and t.act.gram.shape != (shape[1], shape[1]):
            raise ValueError(f"{t.name}: activation statistics with a {tuple(t.act.gram.shape)} Gram matrix, but "
                             f"the weight has {shape[1]} input columns")
        U = inverse_hessian_factor(damped_hessian(t.act, t.name), t.name)
    d = U.diagonal().to(dt) if U is not None else None

    def choose(w_block: Tensor, sl: slice) -> Tensor:
        score = salience_weight * row_zscore(salience[:, sl])
        if d is not None:
            score = score + (1.0 - salience_weight) * row_zscore(w_block ** 2 / d[sl][None, :] ** 2)
        return cgm.select_lowest(score, k, per_row=False)

    W, reverted = obs_revert(w_ft, w_pt, U if compensate else None, choose)
    out = torch.where(reverted, t.w_pt.to(t.w_ft.dtype).reshape(rows, -1), W.to(t.w_ft.dtype))
    return out.reshape(shape)
