"""The teacher-forced score of `decoding.teacher_forced`, precomputed for merge sweeps.

A sweep scores hundreds of merged models on the same samples, and a merge changes only the merge set: the
connector (LLaVA's multi_modal_projector, Qwen's visual.merger) and decoder layers. Everything upstream of
the connector (the vision tower, the text embeddings, Qwen's M-RoPE position ids) is the same for every
merged model, so `FastScorer` runs it once:

    1. one full forward pass per batch records the connector's input, the language model's keyword
       arguments (inputs_embeds, position ids, attention mask) and where the image features sit;
    2. each `score()` then runs only connector -> decoder layers, and the output head only at the answer
       positions (the argmax and the loss are needed nowhere else).

The result equals `decoding.teacher_forced` sample for sample (tested), plus each sample's loss (mean token
cross-entropy over its answer tokens and end token, the per-sample loss of `cgm.diag_fisher`), which the
merge experiment uses to check the quadratic model behind Eq. 5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..world import models as mm


@dataclass
class _Batch:
    task: str
    x_connector: torch.Tensor          # the connector's input (fixed: the vision tower is not merged)
    perm: torch.Tensor                 # connector output rows -> image-token slots in inputs_embeds
    embeds: torch.Tensor               # inputs_embeds with the image slots to be filled
    image_slots: torch.Tensor          # bool (B, L): where the image features go
    lm_kwargs: dict                    # the language model's other keyword arguments
    rows: torch.Tensor                 # (P,) sample index of each answer position
    cols: torch.Tensor                 # (P,) position whose output predicts the answer token
    target: torch.Tensor               # (P,) the answer token
    is_end: torch.Tensor               # (P,) the target is the end token
    n: int


class FastScorer:
    """Per-sample exact / relaxed match and loss of a model's current weights on fixed sample sets.

        scorer = FastScorer(model, processor, {"colour": samples, ...})
        scorer.load(merged_state)        # copy the merge set's tensors into the model, in place
        result = scorer.score()          # {task: {"exact": array, "relaxed": array, "loss": array}}

    Only tensors of the merge set may change between calls: `load` refuses any other name.
    """

    def __init__(self, model, processor, sets: Mapping[str, Sequence], batch_size: int = 128):
        self.model = model.eval()
        self.family = mm.family_of(model)
        self.connector_prefix = mm.PROJECTOR_PREFIX[self.family]
        self.connector = model.get_submodule(self.connector_prefix.rstrip("."))
        self.lm = model.model.language_model
        self.head = model.lm_head
        self.enc = mm.Encoder(processor, self.family)
        self.params = dict(model.named_parameters())
        self.batches: list[_Batch] = []
        with torch.no_grad():
            for task, samples in sets.items():
                for i in range(0, len(samples), batch_size):
                    self.batches.append(self._record(task, samples[i:i + batch_size]))

    # -- setup ---------------------------------------------------------------------------------
    def _record(self, task: str, samples) -> _Batch:
        b = self.enc.batch(samples)
        seen = {}
        h1 = self.connector.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
        h2 = self.connector.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out))
        h3 = self.lm.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("kw", dict(kw)), with_kwargs=True)
        try:
            self.model(**b)
        finally:
            for h in (h1, h2, h3):
                h.remove()
        kw = seen["kw"]
        embeds = kw.pop("inputs_embeds")
        y = seen["y"].reshape(-1, embeds.shape[-1])
        slots = (b["input_ids"] == self.model.config.image_token_id)
        filled = embeds[slots]
        if filled.shape != y.shape:
            raise RuntimeError(f"{task}: {filled.shape[0]} image slots for {y.shape[0]} connector outputs")
        # the connector output row that fills each image slot (Qwen reorders its windows; LLaVA keeps order)
        dist = torch.cdist(filled.double(), y.double())
        perm = dist.argmin(1)
        if dist.min(1).values.max() > 1e-5 * (1 + filled.abs().max()):
            raise RuntimeError(f"{task}: image features are not a permutation of the connector output")
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
        kw["use_cache"] = False
        labels = b["labels"]
        tgt = labels[:, 1:]
        rows, cols = torch.nonzero(tgt != -100, as_tuple=True)
        target = tgt[rows, cols]
        return _Batch(task, seen["x"].detach(), perm, embeds.detach(), slots, kw, rows, cols, target,
                      target == self.enc.end_id, labels.shape[0])

    # -- weights ---------------------------------------------------------------------------------
    def load(self, state: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> None:
        """Copy `state[name]` into the model for every name in `names` (default: all of `state` that is a
        parameter of the merge set's modules); tensors upstream of the connector are refused."""
        names = list(state) if names is None else list(names)
        for n in names:
            if not (n.startswith(self.connector_prefix) or n.startswith(mm.LAYER_PREFIX)):
                if n in self.params and not torch.equal(self.params[n], state[n]):
                    raise ValueError(f"FastScorer: {n} is upstream of the connector or outside the merge set; "
                                     "its change would not be seen")
                continue
            if n not in self.params:
                raise ValueError(f"FastScorer: the model has no parameter {n}")
            with torch.no_grad():
                self.params[n].copy_(state[n])

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self) -> dict[str, dict[str, np.ndarray]]:
        """{task: {"exact", "relaxed", "loss"}}: one value per sample, in the order given."""
        out: dict[str, dict[str, list]] = {}
        for b in self.batches:
            feats = self.connector(b.x_connector).reshape(-1, b.embeds.shape[-1])[b.perm]
            embeds = b.embeds.clone()
            embeds[b.image_slots] = feats.to(embeds.dtype)
            hidden = self.lm(inputs_embeds=embeds, **b.lm_kwargs).last_hidden_state
            logits = self.head(hidden[b.rows, b.cols]).float()
            logp = torch.log_softmax(logits, -1)
            ok = logits.argmax(-1) == b.target
            nll = -logp.gather(1, b.target[:, None])[:, 0]
            n = b.n
            wrong = torch.zeros(n, dtype=torch.long).index_add_(0, b.rows, (~ok).long())
            wrong_answer = torch.zeros(n, dtype=torch.long).index_add_(0, b.rows, (~ok & ~b.is_end).long())
            count = torch.zeros(n).index_add_(0, b.rows, torch.ones_like(nll))
            loss = torch.zeros(n).index_add_(0, b.rows, nll) / count
            rec = out.setdefault(b.task, {"exact": [], "relaxed": [], "loss": []})
            rec["exact"].append((wrong == 0).double().numpy())
            rec["relaxed"].append((wrong_answer == 0).double().numpy())
            rec["loss"].append(loss.double().numpy())
        return {t: {k: np.concatenate(v) for k, v in rec.items()} for t, rec in out.items()}

    def means(self) -> dict[str, dict[str, float]]:
        """{task: {"exact", "relaxed", "loss"}} averaged over each task's samples."""
        return {t: {k: float(v.mean()) for k, v in rec.items()} for t, rec in self.score().items()}
