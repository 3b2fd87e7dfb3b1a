"""evaluate.fast.FastScorer (the sweep's precomputed teacher-forced score) against the slow reference path
(decoding.teacher_forced, and each sample's own model(**sample).loss), before and after merge-set changes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cgm_min.evaluate import decoding as dec
from cgm_min.evaluate.fast import FastScorer
from cgm_min.world import models as mm
from cgm_min.world import tasks as mt


@pytest.mark.parametrize("family", mm.FAMILIES)
def test_fast_scorer_equals_teacher_forcing(family, processors, models):
    model = copy.deepcopy(models[family])
    sets = mt.eval_set(("colour", "count", "corners"), "validation", 9)
    scorer = FastScorer(copy.deepcopy(model), processors[family], sets, batch_size=4)
    enc = mm.Encoder(processors[family])
    names = mm.merge_param_names(model)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        if step:      # a "merged" model: every merge-set tensor changed
            state = {n: p.detach() + 0.2 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
                     if n in names}
            scorer.load(state)
            model.load_state_dict(state, strict=False)
        got = scorer.score()
        for task, samples in sets.items():
            exact, relaxed = dec.teacher_forced(model, enc, samples, batch_size=5)
            assert np.array_equal(got[task]["exact"], exact) and np.array_equal(got[task]["relaxed"], relaxed)
            with torch.no_grad():
                losses = [model(**enc.batch([s])).loss.item() for s in samples]
            np.testing.assert_allclose(got[task]["loss"], losses, rtol=1e-4, atol=1e-6)


def test_fast_scorer_refuses_changes_it_cannot_see(processors, models):
    model = copy.deepcopy(models["llava"])
    scorer = FastScorer(model, processors["llava"], mt.eval_set(("colour",), "validation", 2))
    emb = "model.language_model.embed_tokens.weight"
    state = {emb: model.state_dict()[emb] + 1.0}
    with pytest.raises(ValueError, match=r"embed_tokens\.weight is upstream of the connector"):
        scorer.load(state)
    scorer.load({emb: model.state_dict()[emb].clone()})        # unchanged: nothing to see, accepted
