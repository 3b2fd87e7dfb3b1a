"""The merge-experiment engine (cgm_min.experiments): the results-table schema and statistics against
hand-computed cases, and one end-to-end run on a shipped miniature (a few fine-tuning steps, the tiny grid)
whose selection, held-out rows, controls and cache are checked."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cgm_min.experiments import engine, results, runs, sweep
from cgm_min.world import tasks as mt


# ----------------------------------------------------------------------------------------------
# statistics on hand-made tables

def test_front_area_of_known_shapes():
    assert results.front_area([(0.5, 0.5)]) == pytest.approx(0.25)
    # two rectangles [0,1]x[0,.5] and [0,.5]x[0,1]: union 0.5 + 0.25
    assert results.front_area([(1.0, 0.5), (0.5, 1.0)]) == pytest.approx(0.75)
    # a dominated point adds nothing; the order of the points does not matter
    assert results.front_area([(0.5, 1.0), (0.4, 0.4), (1.0, 0.5)]) == pytest.approx(0.75)
    assert results.front_area([]) == 0.0


def _row(**kw):
    base = {c: 0 for c in results.COLUMNS}
    base.update({"family": "llava", "size": "small", "target": "corners", "seed": 0, "steps": 200, "lr": 5e-4,
                 "n_layers": -1, "regime": "default", "curvature": "fisher_during", "run": "r", "method": "linear",
                 "variant": "linear", "hyperparameters": "{}", "split": "validation", "control": "",
                 "selected": False, "pre_avg": 0.5, "target_score": 0.5, "hscore": 0.5, "avg": 0.5,
                 "task:colour": 0.5, "task:corners": 0.5, "exact_bits": ""})
    base.update(kw)
    return base


def test_schema_errors_name_the_problem():
    good = pd.DataFrame([_row()])
    results.check_schema(good)
    with pytest.raises(ValueError, match=r"missing column 'hscore'"):
        results.check_schema(good.drop(columns=["hscore"]))
    with pytest.raises(ValueError, match=r"unknown split 'test'"):
        results.check_schema(pd.DataFrame([_row(split="test")]))
    with pytest.raises(ValueError, match=r"column 'task:colour' must hold scores in \[0, 1\]"):
        results.check_schema(pd.DataFrame([_row(**{"task:colour": 1.5})]))
    with pytest.raises(ValueError, match=r"no per-task score columns"):
        results.check_schema(good.drop(columns=["task:colour", "task:corners"]))
    # two targets: each row has its own target's score, the other target's column is empty
    two = pd.DataFrame([_row(), _row(target="colour_code", **{"task:colour_code": 0.7, "task:corners": None})])
    results.check_schema(two)
    with pytest.raises(ValueError, match=r"rows with target 'colour_code' need its score in column 'task:colour_code'"):
        results.check_schema(two.assign(**{"task:colour_code": [None, None]}))


def test_selection_takes_the_best_validation_row_first_in_grid_order():
    rows = [_row(hyperparameters='{"lam": 0.1}', hscore=0.6), _row(hyperparameters='{"lam": 0.2}', hscore=0.8),
            _row(hyperparameters='{"lam": 0.3}', hscore=0.8), _row(variant="magnitude", hscore=0.1),
            _row(hyperparameters='{"lam": 0.9}', hscore=0.99, split="heldout")]
    chosen = results.select_on_validation(pd.DataFrame(rows))
    assert sorted(chosen["hyperparameters"]) == ['{"lam": 0.2}', "{}"]       # never a held-out row


def _bits_row(variant, seed, bits, target_bits):
    s = {"colour": bits, "corners": target_bits}
    score = {t: np.mean([c == "1" for c in b]) for t, b in s.items()}
    h = 2 * score["colour"] * score["corners"] / (score["colour"] + score["corners"])
    return _row(variant=variant, method=variant, seed=seed, split="heldout", selected=True,
                exact_bits=json.dumps(s), **{"task:colour": score["colour"], "task:corners": score["corners"]},
                pre_avg=score["colour"], target_score=score["corners"], hscore=h)


def test_paired_difference_sees_a_real_gain_and_no_gain():
    rows = []
    for seed in range(3):
        rows.append(_bits_row("cgm", seed, "1" * 90 + "0" * 10, "1" * 95 + "0" * 5))
        rows.append(_bits_row("linear", seed, "1" * 60 + "0" * 40, "1" * 95 + "0" * 5))
        rows.append(_bits_row("twin", seed, "1" * 60 + "0" * 40, "1" * 95 + "0" * 5))
    df = pd.DataFrame(rows)
    gain = results.paired_difference(df, "cgm", "linear", n_boot=300)
    assert gain["mean"] > 0.1 and gain["ci_low"] > 0.05 and len(gain["per_seed"]) == 3
    same = results.paired_difference(df, "twin", "linear", n_boot=300)
    assert same["mean"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    with pytest.raises(ValueError, match="no common held-out runs"):
        results.paired_difference(df, "cgm", "ghost")


# ----------------------------------------------------------------------------------------------
# run specs and grids

def test_run_spec_refuses_bad_knobs():
    with pytest.raises(ValueError, match="family must be one of"):
        runs.RunSpec("gpt2", "corners")
    with pytest.raises(ValueError, match="must be a target task"):
        runs.RunSpec("llava", "colour")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        runs.RunSpec("llava", "corners", steps=0)
    with pytest.raises(ValueError, match="no shipped qwen base of size 'wide'"):
        runs.RunSpec("qwen", "corners", size="wide")
    a, b = runs.RunSpec("llava", "corners", seed=0), runs.RunSpec("llava", "corners", seed=1)
    assert a.key() != b.key() and a.key() == runs.RunSpec("llava", "corners", seed=0).key()


def test_grids():
    full, small, tiny = (sweep.grid(s) for s in ("full", "small", "tiny"))
    assert len(full) > len(small) > len(tiny)
    assert {p.method for p in full} >= {"linear", "random_revert", "cgm", "cgm_dagger", "magnitude", "ties"}
    assert all(len(set(p.hp)) == len(p.hp) for p in full)
    with pytest.raises(ValueError, match=r"no grid for methods \['fisher_merging'\]"):
        sweep.grid("small", ["fisher_merging"])
    with pytest.raises(ValueError, match="unknown grid size 'huge'"):
        sweep.grid("huge")


# ----------------------------------------------------------------------------------------------
# one run end to end

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    spec = runs.RunSpec("llava", "corners", seed=0, steps=6)
    cfg = sweep.SweepConfig(n_validation=6, n_heldout=10)
    methods = ["linear", "random_revert", "dare", "magnitude", "cgm", "cgm_dagger"]
    job = engine.Job(spec, grid="tiny", kinds=("fisher_during", "fisher_at_ft"))
    table = engine.run_jobs([job], cache, cfg, workers=1, methods=methods, progress=False)
    return cache, spec, cfg, job, methods, table


def test_the_sweep_writes_a_valid_table(small_run):
    _, spec, cfg, _, methods, table = small_run
    results.check_schema(table)
    val = table[(table["split"] == "validation") & (table["curvature"] == "fisher_during")]
    assert set(val["method"]) == set(methods) | {"pre_trained", "fine_tuned"}
    assert (val["n_per_task"] == cfg.n_validation).all()
    assert set(table[table["curvature"] == "fisher_at_ft"]["method"]) <= {"cgm", "cgm_dagger", "pre_trained", "fine_tuned"}
    assert (table[["quad_pt", "quad_ft"]] >= 0).all().all()
    # the endpoints are what they say: pre_trained has no distance to w_pt, fine_tuned none to w_ft
    ends = val.set_index("method")
    assert ends.loc["pre_trained", "quad_pt"] == 0 and ends.loc["fine_tuned", "quad_ft"] == 0
    assert ends.loc["pre_trained", "target_score"] <= 0.2          # the base never learned the target


def test_heldout_rows_are_the_validation_choices(small_run):
    table = small_run[-1]
    for kind, d in table.groupby("curvature"):
        val, held = d[d["split"] == "validation"], d[(d["split"] == "heldout") & (d["control"] == "")]
        for variant, g in val.groupby("variant"):
            best = g.loc[g["hscore"].idxmax(), "hyperparameters"]
            assert held[held["variant"] == variant]["hyperparameters"].tolist() == [best], (kind, variant)
            assert g["selected"].sum() == 1
        assert (held["exact_bits"] != "").all()


def test_negative_controls_rerun_the_random_methods_with_other_seeds(small_run):
    table = small_run[-1]
    neg = table[table["control"].str.startswith("negative")]
    assert set(neg["variant"]) == {"random_revert", "dare"} and (neg["split"] == "heldout").all()
    for _, r in neg.iterrows():
        assert json.loads(r["hyperparameters"])["seed"] == int(r["control"].rsplit(" ", 1)[1])


def test_a_warm_cache_recomputes_nothing(small_run):
    cache, spec, cfg, job, methods, table = small_run
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    again = engine.run_jobs([job], cache, cfg, workers=1, methods=methods, progress=False)
    pd.testing.assert_frame_equal(again.drop(columns=["seconds"]), table.drop(columns=["seconds"]))
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files


def test_a_row_rebuilds_to_the_same_scores(small_run):
    """rebuild_merge (used by the lmms-eval re-scoring) gives the merge that was scored."""
    from cgm_min.evaluate.fast import FastScorer
    cache, spec, cfg, _, _, table = small_run
    row = table[(table["split"] == "heldout") & (table["variant"] == "cgm_dagger")
                & (table["curvature"] == "fisher_during")].iloc[0]
    base, processor = runs.load_base(spec)
    scorer = FastScorer(base, processor, mt.eval_set((*mt.GENERAL, spec.target), "heldout", cfg.n_heldout))
    scorer.load(sweep.rebuild_merge(row, cache))
    means = scorer.means()
    assert all(means[t]["exact"] == row[f"task:{t}"] for t in means)


def test_front_indices_keep_exactly_the_non_dominated_points():
    from cgm_min.experiments.figures import front_indices
    t = np.array([0.1, 0.5, 0.5, 0.9, 0.3])
    p = np.array([0.9, 0.8, 0.6, 0.2, 0.5])
    assert front_indices(t, p).tolist() == [0, 1, 3]        # (0.5, 0.6) and (0.3, 0.5) are dominated
    rng = np.random.default_rng(0)
    t, p = rng.random(40), rng.random(40)
    keep = set(front_indices(t, p).tolist())
    for i in range(40):
        dominated = any((t[j] >= t[i]) and (p[j] >= p[i]) and (t[j] > t[i] or p[j] > p[i]) for j in range(40))
        assert (i in keep) == (not dominated)
