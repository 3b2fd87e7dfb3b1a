"""The command-line tools' error contract: bad input ends in one line "error: ..." on stderr, exit status 2,
no Python traceback, nothing written. Run as real processes, the way a user meets them."""
from __future__ import annotations

import subprocess
import sys

import pytest


import importlib
import pathlib

from cgm_min import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"cgm_min.cli.{module}", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("module, args, message", [
    ("train", ["finetune", "--base", "no/such/folder", "--target", "corners", "--out", "OUT"], "no model folder"),
    ("train", ["finetune", "--base", ".", "--target", "corners", "--out", "OUT"], "has no config.json"),
    ("train", ["finetune", "--base", "checkpoints/mini-llava-1.5", "--target", "colour", "--out", "OUT"],
     "must be a target task"),
    ("train", ["finetune", "--base", "checkpoints/mini-llava-1.5", "--target", "corners", "--lr", "-1",
               "--out", "OUT"], "lr must be a number > 0"),
    ("train", ["curvature", "--model", "checkpoints/mini-llava-1.5", "--tasks", "colr", "--out", "OUT/h.safetensors"],
     "unknown task 'colr'"),
    ("train", ["pretrain", "--family", "llava", "--size", "huge", "--out", "OUT"], "unknown model size 'huge'"),
    ("provenance", ["verify", "no/such/folder"], "no checkpoint folder"),
    ("provenance", ["verify", "cgm_min"], "no manifest.json in cgm_min"),
    ("experiment", ["run", "--family", "llava", "--target", "corners", "--kinds", "fisher", "--out", "OUT/r.parquet"],
     "unknown curvature kind 'fisher'"),
    ("experiment", ["run", "--family", "llava", "--target", "corners", "--methods", "tie", "--out", "OUT/r.parquet"],
     "unknown merge method 'tie'"),
    ("experiment", ["run", "--family", "llava", "--target", "corners", "--regime", "huge", "--out", "OUT/r.parquet"],
     "unknown regime 'huge'"),
    ("experiment", ["summary", "README.md"], "is not a readable Parquet results table"),
])
def test_bad_input_is_one_line_and_exit_2(module, args, message, tmp_path, capsys, monkeypatch):
    """In-process through the tools' own wrapper (cli.run), which is what their console scripts call."""
    monkeypatch.chdir(ROOT)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    assert cli.run(importlib.import_module(f"cgm_min.cli.{module}").main, args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module, args, message", [
    ("train", ["evaluate", "--model", "no/such/folder"], "error: no model folder no/such/folder"),
    ("provenance", ["verify", "no/such/folder"], "error: no checkpoint folder no/such/folder"),
    ("experiment", ["run", "--family", "gpt2", "--target", "corners", "--out", "x.parquet"],
     "error: family must be one of"),
])
def test_as_a_real_process_there_is_no_traceback(module, args, message):
    p = run(module, *args, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().startswith(message), p.stderr


def test_results_table_with_the_wrong_schema_is_named(tmp_path, capsys):
    import pandas as pd
    f = tmp_path / "r.parquet"
    pd.DataFrame({"family": ["llava"]}).to_parquet(f)
    assert cli.run(importlib.import_module("cgm_min.cli.experiment").main, ["summary", str(f)]) == 2
    assert "missing column 'size'" in capsys.readouterr().err
