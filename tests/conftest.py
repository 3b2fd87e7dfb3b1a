"""Shared fixtures. The notebook runs are expensive, so all notebooks are executed once per test session
at the CI preset (`tiny`) and every notebook test reads the resulting metrics.json files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cgm_min import pipeline
from cgm_min.report import read_metrics


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Output folder of all notebooks executed with papermill at preset `tiny` (see cgm_min.pipeline).

    Set CGM_TINY_RUN to an existing output folder to reuse a previous run while iterating on tests.
    """
    reuse = os.environ.get("CGM_TINY_RUN")
    if reuse:
        return Path(reuse)
    out = tmp_path_factory.mktemp("tiny_run")
    pipeline.execute_all("tiny", out)
    return out


@pytest.fixture(scope="session")
def notebook_metrics(tiny_run):
    """notebook_metrics('01_toy_quadratics') -> that notebook's metrics.json as a dict."""
    return lambda name: read_metrics(tiny_run / "results" / name)


@pytest.fixture(scope="session")
def merge_results(tiny_run):
    """The results table that notebook 05 (the merge experiment) wrote in the tiny run; notebook 06 draws it."""
    from cgm_min.experiments import results
    return results.read_table(tiny_run / "results" / "05_merging_experiment" / "results.parquet")


# Miniature models with random weights, one set per test module (tests may change their weights).
@pytest.fixture(scope="module")
def processors():
    from cgm_min.world import models as mm
    from cgm_min.world import tasks as mt
    corpus = mt.tokenizer_corpus(per_task=60)
    return {f: mm.build_processor(f, corpus) for f in mm.FAMILIES}


@pytest.fixture(scope="module")
def models(processors):
    from cgm_min.world import models as mm
    return {f: mm.build_model(f, processors[f], size="test", seed=0) for f in mm.FAMILIES}


def pytest_collection_modifyitems(items):
    """Tests that read executed notebooks are slow (the first one runs every notebook): mark them, so that
    `-m "not slow"` runs the unit tests alone."""
    for item in items:
        if "notebook_metrics" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
