"""Input statistics of a model's linear weights on calibration data, for the methods that weigh the task
vector by how strongly each input column is used (Wanda: ||X_j||_2; Model Tailor: H = X^T X)."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from . import ActivationStats


@torch.no_grad()
def activation_stats(model: torch.nn.Module, batches: Iterable[Mapping], names: Sequence[str],
                     gram: bool = True) -> dict[str, ActivationStats]:
    """ActivationStats of every `names` entry that is the weight of an nn.Linear (other names are skipped),
    over all tokens of `batches` that the layer sees (padding positions excluded where the layer's input is
    the token sequence; image features for a connector). Accumulated in float64, returned in float32."""
    modules = dict(model.named_modules())
    targets = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        if leaf == "weight" and isinstance(modules.get(owner), torch.nn.Linear):
            targets[owner] = n
    sums = {n: [None, None, 0] for n in targets.values()}
    mask_now = {}

    def hook(owner):
        def fn(module, args):
            x = args[0].detach()
            m = mask_now.get("mask")
            if m is not None and x.dim() == 3 and x.shape[:2] == m.shape:
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            acc = sums[targets[owner]]
            acc[0] = x.pow(2).sum(0) if acc[0] is None else acc[0] + x.pow(2).sum(0)
            if gram:
                acc[1] = x.T @ x if acc[1] is None else acc[1] + x.T @ x
            acc[2] += x.shape[0]
        return fn

    handles = [modules[o].register_forward_pre_hook(hook(o)) for o in targets]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            mask_now["mask"] = b.get("attention_mask")
            model(**b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, acc in sums.items() if acc[2] == 0]
    if missing:
        raise ValueError(f"activation_stats: no input reached {missing[:3]}")
    return {n: ActivationStats(acc[0].float(), acc[1].float() if gram else None, int(acc[2]))
            for n, acc in sums.items()}
