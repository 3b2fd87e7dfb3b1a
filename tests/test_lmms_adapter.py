"""Evaluation through lmms-eval: the miniature tasks built as lmms-eval tasks, the `cgm_mini` model class, and
the paper's score table. Uses `test`-size random models (a few thousand parameters) and a few documents per
task, so the file runs in well under a minute on 2 cores."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the project's set-up installs lmms-eval 0.7.3)")

from cgm_min.evaluate import lmms_adapter as la  # noqa: E402
from cgm_min.world import models as mm  # noqa: E402
from cgm_min.world import tasks as mt  # noqa: E402
from cgm_min import pipeline  # noqa: E402
from cgm_min.evaluate import decoding as dec  # noqa: E402
from cgm_min.evaluate import scores as sc  # noqa: E402
from cgm_min.world import training as tr  # noqa: E402

TASKS = ["colour", "count", "caption"]        # two general tasks and one target (the longest answers)
N = 10                                         # held-out documents per task
BATCH = 4                                      # several batches per task, the last one partial


bmd = pipeline.load_data_script("build_mini_data")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and on a shared 2-core machine two threads that
    wait for each other make the file several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return bmd.build(tmp_path_factory.mktemp("lmms") / "mini_data", n_heldout=N, n_calibration=3, tasks=TASKS,
                     verbose=False)


def _file_hashes(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# The data sets and YAMLs.

def test_built_data_are_the_mini_tasks_samples(data_dir):
    import datasets
    man = json.loads((data_dir / "manifest.json").read_text())
    assert list(man["tasks"]) == TASKS
    assert man["groups"] == {"mini_general": ["colour", "count"], "mini_targets": ["caption"]}
    for task in TASKS:
        for split, n in (("heldout", N), ("calibration", 3)):
            ds = datasets.load_dataset("parquet", data_files=str(data_dir / f"data/{task}/{split}.parquet"),
                                       split="train")
            samples = mt.make_samples(task, split, n)
            assert len(ds) == n
            for row, s in zip(ds, samples):
                assert (row["question"], row["answer"], row["index"]) == (s.question, s.answer, s.index)
                assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(s.image))
        y = (data_dir / f"mini_{task}.yaml").read_text()
        assert f"max_new_tokens: {bmd.max_new_tokens(task)}" in y and f"data/{task}/heldout.parquet" in y
    # the prompt is the question as-is and both scores are evaluate.scores' own
    spec = importlib.util.spec_from_file_location("mini_utils", data_dir / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"question": "What colour is the object?", "answer": "red"}
    assert utils.doc_to_text(doc) == doc["question"]
    assert utils.process_results(doc, ["red"]) == {"exact_match": 1.0, "relaxed_match": 1.0}
    assert utils.process_results(doc, ["red square"]) == {"exact_match": 0.0, "relaxed_match": 1.0}
    assert utils.process_results(doc, ["blue"]) == {"exact_match": 0.0, "relaxed_match": 0.0}


def test_build_is_deterministic_atomic_and_guarded(data_dir, tmp_path, capsys):
    before = _file_hashes(data_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")}
    bmd.build(data_dir, n_heldout=N, n_calibration=3, tasks=TASKS)           # same arguments: left alone
    assert "up to date" in capsys.readouterr().out
    assert _file_hashes(data_dir) == before and {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")} == mtimes
    other = bmd.build(tmp_path / "again", n_heldout=N, n_calibration=3, tasks=TASKS, verbose=False)
    assert _file_hashes(other) == before                                        # byte-identical rebuild
    with pytest.raises(FileExistsError, match="params.n"):
        bmd.build(other, n_heldout=N + 1, n_calibration=3, tasks=TASKS, verbose=False)
    assert _file_hashes(other) == before                                        # refused: untouched
    assert bmd.main(["--out", str(other), "--n-heldout", "5", "--n-calibration", "0", "--tasks", "count"]) == 2
    assert bmd.main(["--out", str(other), "--n-heldout", "5", "--n-calibration", "0", "--tasks", "count",
                     "--force"]) == 0
    assert sorted(json.loads((other / "manifest.json").read_text())["tasks"]) == ["count"]
    assert not (other / "data" / "colour").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no manifest"):
        bmd.build(foreign, n_heldout=2, n_calibration=0, tasks=["count"], verbose=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]   # no leftovers


# ----------------------------------------------------------------------------------------------
# The model class, through lmms-eval's evaluator.

@pytest.mark.parametrize("fam", mm.FAMILIES)
def test_lmms_scores_equal_the_projects_scoring(fam, processors, models, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # the YAMLs' data paths must not depend on the working directory
    model, proc = models[fam], processors[fam]
    lm = la.CGMMini(model=model, processor=proc, batch_size=BATCH)
    df = la.evaluate_lmms(lm, include_path=data_dir)
    assert set(df["task"]) == set(TASKS) and set(df["metric"]) == set(la.METRICS) and (df["n"] == N).all()
    enc = mm.Encoder(proc)
    for task in TASKS:
        samples = mt.make_samples(task, "heldout", N)
        ours = dec.generate(model, enc, samples, max_new_tokens=bmd.max_new_tokens(task), batch_size=BATCH)
        theirs = [lm.last_generations[("mini_" + task, i)] for i in range(N)]
        assert theirs == ours, task
        for metric, fn in (("exact_match", sc.exact_match), ("relaxed_match", sc.relaxed_match)):
            got = df.query("task == @task and metric == @metric")["score"].item()
            assert got == float(np.mean([fn(g, s.answer) for g, s in zip(ours, samples)]))


class Scripted(la.CGMMini):
    """Answers right (doc 0, 3, ...), right then more words (1, 4, ...) or wrong (2, 5, ...)."""

    def generate_until(self, requests):
        out = []
        for r in requests:
            _, _, _, doc_id, task, split = r.args
            answer = self.task_dict[task][split][doc_id]["answer"]
            out.append([answer, answer + " and more", "zzz"][doc_id % 3])
        return out


def test_scores_and_paper_table_from_scripted_answers(processors, models, data_dir):
    lm = Scripted(model=models["llava"], processor=processors["llava"])
    df = la.evaluate_lmms(lm, include_path=data_dir)
    exact = {t: float(np.mean([i % 3 == 0 for i in range(N)])) for t in TASKS}
    relaxed = {t: float(np.mean([i % 3 < 2 for i in range(N)])) for t in TASKS}
    for t in TASKS:
        assert df.query("task == @t and metric == 'exact_match'")["score"].item() == exact[t]
        assert df.query("task == @t and metric == 'relaxed_match'")["score"].item() == relaxed[t]
    table = la.paper_scores(df, target="caption")
    assert list(table.index) == ["exact_match", "relaxed_match"]
    row = table.loc["relaxed_match"]
    pre = 100 * np.mean([relaxed["colour"], relaxed["count"]])
    assert row["Pre-Avg"] == pytest.approx(pre) and row["Target (caption)"] == pytest.approx(100 * relaxed["caption"])
    assert row["Hscore"] == pytest.approx(2 * pre * row["Target (caption)"] / (pre + row["Target (caption)"]))
    assert row["Avg"] == pytest.approx((row["Target (caption)"] + 2 * pre) / 3)
    # several models at once: one row per (model, metric)
    two = la.paper_scores(__import__("pandas").concat([df.assign(model="a"), df.assign(model="b")]), "caption")
    assert two.shape[0] == 4 and two.loc[("b", "exact_match"), "Pre-Avg"] == table.loc["exact_match", "Pre-Avg"]
    with pytest.raises(KeyError, match="target"):
        la.paper_scores(df, target="corners")
    # groups and names resolve to the built miniature tasks
    assert la.resolve_tasks("mini_general", data_dir) == ["colour", "count"]
    assert la.resolve_tasks(["mini_caption", "count"], data_dir) == ["caption", "count"]
    with pytest.raises(KeyError, match="not built"):
        la.resolve_tasks(["digit"], data_dir)


@pytest.mark.parametrize("fam", mm.FAMILIES)
def test_swap_weights_changes_and_restores_the_outputs(fam, processors, models, data_dir):
    proc = processors[fam]
    model = mm.build_model(fam, proc, size="test", seed=0)      # a private copy: its weights are swapped
    lm = la.CGMMini(model=model, processor=proc, batch_size=BATCH)

    def outputs():
        la.evaluate_lmms(lm, tasks=["caption"], include_path=data_dir)
        return [lm.last_generations[("mini_caption", i)] for i in range(N)]

    original, state0 = outputs(), lm.state_dict()
    other = mm.build_model(fam, proc, size="test", seed=1).state_dict()
    assert sorted(lm.swap_weights(other, strict=True)) == sorted(other)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.items())
    assert outputs() != original
    lm.swap_weights(state0)
    assert outputs() == original
    # a subset is fine; wrong names or shapes are refused before anything is copied
    name = mm.merge_param_names(model)[0]
    lm.swap_weights({name: other[name]})
    assert torch.equal(model.state_dict()[name], other[name])
    lm.swap_weights({name: state0[name]})
    with pytest.raises(ValueError, match="shape mismatch"):
        lm.swap_weights({name: other[name], next(iter(other)): torch.zeros(3)})
    assert torch.equal(model.state_dict()[name], state0[name])
    with pytest.raises(KeyError, match="not in the model"):
        lm.swap_weights({"no.such.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing"):
        lm.swap_weights({name: state0[name]}, strict=True)


def test_unsupported_requests_raise(processors, models):
    lm = la.CGMMini(model=models["qwen"], processor=processors["qwen"])
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.raises(ValueError, match="greedy"):
        lm._check_gen_kwargs({"do_sample": True, "max_new_tokens": 4})


def test_pretrained_path_and_lmms_eval_registry(processors, models, data_dir, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    assert get_model("cgm_mini") is la.CGMMini
    model, proc = models["qwen"], processors["qwen"]
    path = mm.save_family(model, proc, tmp_path / "ckpt")
    in_memory = la.evaluate_lmms((model, proc), tasks=["count"], include_path=data_dir, batch_size=BATCH)
    from_disk = la.evaluate_lmms(str(path), tasks=["count"], include_path=data_dir, batch_size=BATCH)
    assert from_disk.equals(in_memory)
    # by name, as lmms-eval's command line would construct it
    tm, task_objs = la._task_objects(data_dir, ["count"], "WARNING")
    res = simple_evaluate(model="cgm_mini", model_args=f"pretrained={path},batch_size={BATCH}", tasks=task_objs,
                          task_manager=tm, limit=4, bootstrap_iters=0, log_samples=False, verbosity="WARNING",
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    assert res["n-samples"]["mini_count"]["effective"] == 4
    assert "exact_match,none" in res["results"]["mini_count"]


def test_bad_model_arguments_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        la.CGMMini(pretrained=tmp_path / "does_not_exist")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a LLaVA or Qwen2.5-VL"):
        la.CGMMini(pretrained=tmp_path / "bert")
    with pytest.raises(ValueError, match="exactly one"):
        la.CGMMini()
    with pytest.raises(TypeError, match="unknown model_args"):
        la.CGMMini(pretrained=tmp_path / "bert", max_pixels=4096)
    with pytest.raises(FileNotFoundError, match="build_mini_data"):
        la.resolve_tasks(None, tmp_path)


def test_lmms_eval_command_line_finds_the_model_through_the_entry_point(processors, models, data_dir, tmp_path):
    """`python -m lmms_eval --model cgm_mini` in a fresh process: the class comes from the package's entry
    point (group lmms_eval.models), not from an import in the test."""
    import subprocess
    import sys
    path = mm.save_family(models["llava"], processors["llava"], tmp_path / "ckpt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "cgm_mini", "--model_args", f"pretrained={path}",
           "--tasks", "mini_count", "--include_path", str(data_dir), "--batch_size", str(BATCH), "--limit", "6",
           "--output_path", str(out), "--verbosity", "WARNING"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*results*.json")]
    assert results, f"no results file under {out}: {sorted(str(p) for p in out.rglob('*'))}"
    r = results[0]["results"]["mini_count"]
    assert "exact_match,none" in r and 0.0 <= r["exact_match,none"] <= 1.0
    assert results[0]["n-samples"]["mini_count"]["effective"] == 6
