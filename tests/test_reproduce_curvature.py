"""h_pt's per-process sums (cgm_min.reproduce.curvature.process_sums) on a miniature: the Fisher is one
cgm.diag_fisher call over all of a process's batches (one float32 accumulator) and equals the sum of
per-batch calls that the chain made before; two processes' shares add up to one process's sum."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cgm_min import cgm
from cgm_min.reproduce import curvature as cv
from cgm_min.reproduce import finetune as ft
from cgm_min.reproduce.recipes import load_recipe
from cgm_min.world import models as mm
from cgm_min.world import tasks as mt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setting():
    recipe = load_recipe(ROOT / "recipes" / "tiny-llava-corners.yaml")
    model, processor, _ = ft.load_published(recipe.model, cuda=False)
    names = ft.merge_set_names(model, recipe.merge_set)
    samples = mt.make_samples("colour", "calibration", 7)         # batches of 3, 3 and 1 samples
    chunks = [samples[i:i + 3] for i in range(0, len(samples), 3)]
    return recipe, model, mm.Encoder(processor), names, chunks


def close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in a:         # float32: the same squared gradients added in another grouping
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6 * float(b[n].abs().max()))


def test_one_fisher_call_equals_the_per_batch_sum(setting, monkeypatch):
    recipe, model, enc, names, chunks = setting
    conf = replace(recipe.curvature, estimator="fisher")
    old = {n: torch.zeros(dict(model.named_parameters())[n].shape) for n in names}
    for chunk in chunks:                     # what measure_h_pt did: one call per micro batch
        est = cgm.diag_fisher(model, [enc.batch(chunk)], names, progress=False)
        for n in names:
            old[n] += est[n] * len(chunk)
    calls = []
    real = cgm.diag_fisher
    monkeypatch.setattr(cgm, "diag_fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    new = cv.process_sums(model, enc, chunks, range(len(chunks)), names, conf, torch.device("cpu"))
    assert len(calls) == 1                   # one call, so one accumulator
    assert any(float(h.abs().max()) > 0 for h in new.values())
    close(new, old)
    # two processes' shares (batches 0, 2 and batch 1) add up to the whole
    a = cv.process_sums(model, enc, chunks, range(0, 3, 2), names, conf, torch.device("cpu"))
    b = cv.process_sums(model, enc, chunks, range(1, 3, 2), names, conf, torch.device("cpu"))
    close({n: a[n] + b[n] for n in names}, old)
    # a process without a batch contributes zeros
    none = cv.process_sums(model, enc, chunks, range(5, 3, 2), names, conf, torch.device("cpu"))
    assert all(not h.any() for h in none.values())


def test_hutchinson_sums_are_seeded_per_batch(setting):
    """Hutchinson: each batch's probes seeded by the batch's index, so a process's share gives the same
    numbers whichever process computes it."""
    recipe, model, enc, names, chunks = setting
    conf = replace(recipe.curvature, estimator="hutchinson", probes=2)
    whole = cv.process_sums(model, enc, chunks, range(3), names, conf, torch.device("cpu"))
    a = cv.process_sums(model, enc, chunks, range(0, 3, 2), names, conf, torch.device("cpu"))
    b = cv.process_sums(model, enc, chunks, range(1, 3, 2), names, conf, torch.device("cpu"))
    close({n: a[n] + b[n] for n in names}, whole)
