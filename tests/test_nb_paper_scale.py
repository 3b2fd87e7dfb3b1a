"""Checks on notebooks/07_paper_scale.md (the paper at its own scale) executed at preset tiny: it runs the
tiny recipes' chains, its results table is theirs, its scores and findings are computed from that table,
each chain stands beside the paper's table of its setting, and the cost estimates are the cost model's."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cgm_min.experiments import results
from cgm_min.reproduce import chain, costs, plan

NB = "07_paper_scale"


@pytest.fixture(scope="module")
def m(notebook_metrics):
    return notebook_metrics(NB)


@pytest.fixture(scope="module")
def table(tiny_run):
    return results.read_table(tiny_run / "results" / NB / "results.parquet")


def chain_folder(tiny_run, name):
    return tiny_run / "cache" / "chains" / name


def test_it_ran_the_tiny_recipes_chains(tiny_run, m):
    expected = [f.stem for f in plan.recipe_files("tiny")]
    assert m["recipes"] == expected
    for name in expected:
        assert m["ran"][name] == list(chain.STEPS)               # a fresh cache: every step ran
        for step in chain.STEPS:
            done = json.loads((chain_folder(tiny_run, name) / step / chain.DONE).read_text())
            assert done["recipe"] == name
            assert m["seconds"][name][step] == pytest.approx(done["seconds"], abs=0.051)   # shown to 0.1 s


def test_its_table_is_the_chains_tables(tiny_run, m, table):
    parts = [results.read_table(chain_folder(tiny_run, n) / "results" / "results.parquet") for n in m["recipes"]]
    pd.testing.assert_frame_equal(table, pd.concat(parts, ignore_index=True))
    assert m["rows"] == len(table) == 4 * len(m["recipes"])      # pre-trained, fine-tuned, CGM, CGM†
    assert set(table["regime"]) == {chain.REGIME} and set(table["run"]) == set(m["recipes"])


def test_scores_and_gains_are_the_tables(m, table):
    for name, scores in m["scores"].items():
        rows = table[table["run"] == name].set_index("variant")
        assert scores["CGM†"]["Hscore"] == pytest.approx(round(100 * rows.loc["cgm_dagger", "hscore"], 1))
        assert scores["Fine-tuned"]["Pre-Avg"] == pytest.approx(round(100 * rows.loc["fine_tuned", "pre_avg"], 1))
        for variant, gain in m["hscore_gain"][name].items():
            assert gain == pytest.approx(100 * (rows.loc[variant, "hscore"] - rows.loc["fine_tuned", "hscore"]),
                                         abs=1e-3)


def test_each_chain_stands_beside_its_papers_table(m):
    assert m["pairs"] == {"tiny-llava-corners": 1, "tiny-qwen-caption": 3}


def test_cost_estimates_are_the_cost_models(m):
    df = costs.cost_table(costs.shipped_recipes())
    expected = df.groupby("recipe")["GPU-hours"].sum()
    assert set(m["estimated_gpu_hours"]) == set(expected.index) and len(expected) == 4
    for name, hours in m["estimated_gpu_hours"].items():
        assert hours == pytest.approx(expected[name], abs=1e-3)
        assert np.isfinite(hours) and hours > 0


def test_figures_are_written(tiny_run, m):
    assert m["figures"] == ["fig-paper-scale-bars", "fig-paper-scale-radar"]
    for name in m["figures"]:
        for ext in ("png", "svg", "pdf"):
            assert (tiny_run / "results" / NB / f"{name}.{ext}").stat().st_size > 10_000, (name, ext)
