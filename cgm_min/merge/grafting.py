"""Grafting (Panigrahi et al., ICML 2023, arXiv:2302.06600, "Task-Specific Skill Localization in Fine-tuned
Language Models"): learn which few entries of the task vector tau = w_ft - w_pt carry the target skill, by
gradient steps on a relaxed mask, and graft exactly those onto w_pt.

What the authors' code does (github.com/abhishekpanigrahi1996/Skill-Localization-by-grafting, commit
76f4aa8, `src/graft_trainer.py`, `run_graft_task.sh`), and what we do:

    base patch   gamma_b = 1 on the largest |tau| over all grafted tensors together, 0 elsewhere
    relaxed mask gamma = gamma_b + (1 - 2 gamma_b) sigmoid(S - 10),  S ~ U[0, 1) (torch.rand_like)
                 so gamma starts within 1.2e-4 of gamma_b; the model is w_pt + gamma * tau
    loss         the target loss alone (no sparsity penalty; the bias 10 keeps gamma near gamma_b)
    optimiser    plain gradient descent on S: S <- S - lr dL/dS, one full-batch gradient per step (the
                 code averages the per-batch gradients of the whole few-shot training set), lr = 1e7,
                 10 steps (`num_train_epochs`; 100 in the README's example)
    selection    after every step the rounded mask (gamma >= 0.5) is scored and the best one kept (the code:
                 train + validation accuracy; the mask of step 0, the base patch, is never a candidate)
    binarise     round(gamma): the grafted fraction is the base patch's, plus or minus what the steps flipped

Here: the base patch keeps exactly 1 - k of all merged entries (k is the fraction reverted, as for every
reversion method), and a mask is binarised at the same exact budget over all merged tensors together: the
code's rounding (gamma >= 0.5), trimmed or filled to the budget (`binary_score`: entries the steps brought
into the patch first, then the base patch's by |tau|; to fill, the entries out with the highest gamma), so
that grafting compares with the other methods at equal k. The best step is the one whose binarised graft
has the lowest target loss (TargetData holds batches, no accuracy and no validation set); as in the code,
the base patch itself is a candidate only when there are no steps.
The step rule, the sigmoid bias, lr = 1e7 and 10 steps are the code's. They suit the miniatures: on the
shipped LLaVA fine-tuned 100 steps on `corners` (k = 0.9, 16 target samples), 10 steps at lr = 1e7 swap
7,663 of the 42,266 entries of the base patch and lower the held-out target loss from 1.61 (base patch) to
0.78; lr = 1e6 swaps 9 (1.61), lr = 1e8 swaps 20,280 (0.95).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .. import cgm
from . import Count, Fraction, MergeInputs, NonNegative, register

Tensor = torch.Tensor

SIGMOID_BIAS = 10.0   # the code's `sigmoid_bias`: gamma starts within 1.2e-4 of the base patch
STEPS = 10            # the code's `num_train_epochs` (run_graft_task.sh)
LR = 1e7              # the code's learning rate (run_graft_task.sh)


def relaxed_mask(base: Tensor, S: Tensor) -> Tensor:
    """gamma = gamma_b + (1 - 2 gamma_b) sigmoid(S - 10): near 1 on the base patch, near 0 off it."""
    return base + (1.0 - 2.0 * base) * torch.sigmoid(S - SIGMOID_BIAS)


def keep_highest(scores: Mapping[str, Tensor], k: float) -> dict[str, Tensor]:
    """Boolean masks of the entries kept (grafted): all but the round(k n) lowest scores over all tensors
    together (ties: lowest index first, in the order of `scores`)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    kept = ~cgm.select_lowest(flat, k, per_row=False)
    out, i = {}, 0
    for n, s in scores.items():
        out[n] = kept[i:i + s.numel()].reshape(s.shape)
        i += s.numel()
    return out


def binary_score(S: Tensor, base: Tensor, prior: Tensor) -> Tensor:
    """Order of the entries for a binary mask at the budget, from the logit l of gamma (l = S - 10 off the base
    patch, 10 - S on it; gamma >= 0.5 iff l >= 0): the code's rounding first (l >= 0 is in); among the entries
    in, those the steps brought in from outside the base patch, by l; then the base patch's, by |tau| (prior
    in [0, 1], the base patch's own order); the entries out by l. In float64 (gamma itself saturates)."""
    logit = (S.double() - SIGMOID_BIAS) * (1.0 - 2.0 * base.double())
    squashed = logit / (1.0 + logit.abs())
    return torch.where(logit >= 0, torch.where(base == 0, 4.0 + squashed, 2.0 + prior), squashed)


@register("grafting", "reversion", "Grafting, a mask learned on the target loss (Panigrahi et al., ICML 2023)",
          needs=("target",), level="model",
          rule="graft onto w_pt the fraction 1-k of tau whose sigmoid-relaxed mask, started at the largest "
               "|tau|, is highest after gradient steps on the target loss")
def grafting(state_pt: Mapping[str, Tensor], state_ft: Mapping[str, Tensor], names: Sequence[str],
             inputs: MergeInputs, k: Fraction, steps: Count = STEPS, lr: NonNegative = LR, seed: Count = 0):
    """w_pt + m * tau with a binary mask m of exactly round((1 - k) n) entries over all `names` together.
    S is drawn from U[0, 1) by a generator seeded by (seed, tensor name); the result is the same for the
    same seed. steps = 0 (or lr = 0) gives the base patch: the largest |tau| over the merge set."""
    from ..world.tasks import stable_hash
    cgm.check_hyperparameters(0.0, k)
    target = inputs.target
    dts = {n: torch.promote_types(state_ft[n].dtype, torch.float32) for n in names}
    w_pt = {n: state_pt[n].to(dts[n]) for n in names}
    tau = {n: state_ft[n].to(dts[n]) - w_pt[n] for n in names}
    base = {n: m.to(dts[n]) for n, m in keep_highest({n: t.abs() for n, t in tau.items()}, k).items()}
    top = max((float(t.abs().max()) for t in tau.values() if t.numel()), default=0.0) or 1.0
    prior = {n: t.abs().double() / top for n, t in tau.items()}
    S = {n: torch.rand(tau[n].shape, generator=torch.Generator().manual_seed(stable_hash(seed, n)), dtype=dts[n])
         .requires_grad_(True) for n in names}

    model = target.model
    own = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    own |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    fixed = {n: t.detach() for n, t in state_ft.items() if n in own and n not in tau}     # the rest: w_ft

    def loss_at(masks: Mapping[str, Tensor]) -> Tensor:
        return target.loss({**fixed, **{n: w_pt[n] + masks[n] * tau[n] for n in names}})

    best, best_loss = base, None
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            gamma = {n: relaxed_mask(base[n], S[n]) for n in names}
            grads = torch.autograd.grad(loss_at(gamma), [S[n] for n in names], allow_unused=True)
            with torch.no_grad():
                for n, g in zip(names, grads):
                    if g is not None:
                        S[n] -= lr * g
                order = {n: binary_score(S[n], base[n], prior[n]) for n in names}
                masks = {n: m.to(dts[n]) for n, m in keep_highest(order, k).items()}
                loss = float(loss_at(masks))
            if best_loss is None or loss < best_loss:
                best, best_loss = masks, loss
    finally:
        model.train(was_training)
    return {n: torch.where(best[n].bool(), state_ft[n], state_pt[n].to(state_ft[n].dtype)) for n in names}
