"""Provenance of the miniature checkpoints: the manifest written when a run is shipped, and checks that a
shipped checkpoint is the pre-training script's output (file hashes, held-out scores, first losses)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cgm_min.world import models as mm
from cgm_min.world import tasks as mt
from cgm_min.world import provenance as pv
from cgm_min.evaluate import decoding as dec
from cgm_min.world import training as tr
from cgm_min.pipeline import ROOT

SHIPPED = sorted(p.parent for p in (ROOT / "checkpoints").glob("*/manifest.json"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "llava"
    cfg = tr.PretrainConfig(family="llava", size="test", steps=12, eval_every=12, eval_n=5)
    tr.pretrain(cfg, out, progress=False)
    return out


def test_ship_writes_a_complete_manifest(tiny_run, tmp_path):
    dest = pv.ship(tiny_run, tmp_path / "ckpt", command="python -m cgm_min.world.training pretrain ...")
    m = pv.read_manifest(dest)
    assert m["family"] == "llava" and m["seed"] == 0 and m["command"].startswith("python -m cgm_min.world.training")
    assert {"torch", "transformers", "python"} <= set(m["versions"])
    assert m["first_losses"] == json.loads((tiny_run / "log.json").read_text())["losses"][:pv.FIRST_STEPS]
    assert set(m["heldout_scores"]) == set(mt.GENERAL)
    assert "model.safetensors" in m["files"] and len(m["data_sha256"]) == 64
    assert pv.check_files(dest) == []
    model, _ = mm.load_family(dest)
    assert model.config.model_type == "llava"


def test_ship_refuses_to_overwrite_or_ship_unfinished_runs(tiny_run, tmp_path):
    dest = pv.ship(tiny_run, tmp_path / "ckpt", command="x")
    before = (dest / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="exists"):
        pv.ship(tiny_run, dest, command="x")
    assert (dest / "manifest.json").read_text() == before
    partial = tmp_path / "partial"
    tr.pretrain(tr.PretrainConfig(family="llava", size="test", steps=12, eval_every=0), partial,
                stop_after=3, progress=False)
    with pytest.raises(ValueError, match="did not complete"):
        pv.ship(partial, tmp_path / "other", command="x")
    assert not (tmp_path / "other").exists()
    with pytest.raises(FileNotFoundError, match="not a finished pre-training run"):
        pv.ship(tmp_path / "nowhere", tmp_path / "other", command="x")


def test_tampered_files_are_detected(tiny_run, tmp_path):
    dest = pv.ship(tiny_run, tmp_path / "ckpt", command="x")
    with open(dest / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert pv.check_files(dest) == ["model.safetensors"]


def test_first_losses_are_reproduced(tiny_run):
    log = json.loads((tiny_run / "log.json").read_text())
    cfg = pv.config_from_log(log)
    cfg.eval_every = 0
    _, _, again = tr.pretrain(cfg, out=None, stop_after=5, progress=False)
    assert again["losses"] == log["losses"][:5]


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", SHIPPED, ids=[p.name for p in SHIPPED])
class TestShippedCheckpoint:
    def test_files_match_manifest(self, ckpt):
        assert pv.check_files(ckpt) == []

    def test_heldout_scores_reproduce_and_meet_the_bars(self, ckpt):
        m = pv.read_manifest(ckpt)
        model, processor = mm.load_family(ckpt)
        sets = mt.eval_set(mt.GENERAL, "heldout", m["heldout_n_per_task"], m["config"]["world_seed"])
        scores = dec.evaluate(model, mm.Encoder(processor), sets)
        for task, rec in m["heldout_scores"].items():
            assert scores[task]["exact"] == pytest.approx(rec["exact"], abs=1.01 / m["heldout_n_per_task"]), task
        exact = [scores[t]["exact"] for t in mt.GENERAL]
        assert sum(exact) / len(exact) >= 0.85, f"mean held-out exact match {sum(exact) / len(exact):.3f} < 0.85"
        assert min(exact) >= 0.6, f"a general task below 0.6: {dict(zip(mt.GENERAL, exact))}"

    def test_first_steps_reproduce_recorded_losses(self, ckpt):
        want = pv.read_manifest(ckpt)["first_losses"]
        got = pv.rerun_first_losses(ckpt, len(want))
        assert got == pytest.approx(want, rel=1e-5)
