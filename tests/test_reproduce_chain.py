"""The whole chain at the tiny recipe, through the same command a GPU user runs; resuming skips finished
steps; h_pt (and fine-tuning) over two gloo processes equals one process; the results table is the
miniature experiment's schema."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-llava-corners.yaml"
STEPS = ["data", "finetune", "curvature", "merge", "evaluate", "results"]


def cli(*args, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, sys.executable, "-m", "cgm_min.cli.reproduce", *map(str, args)] if not launcher
                          else [*launcher, "-m", "cgm_min.cli.reproduce", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def two_processes():
    with socket.socket() as s:                 # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port))


@pytest.fixture(scope="module", autouse=True)
def private_hash_cache(tmp_path_factory):
    """The chain's hash cache (cgm-merge's) in this module's own file, never in the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CGM_MERGE_HASH_CACHE", str(tmp_path_factory.mktemp("hashes") / "sha256.json"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "tiny"
    r = cli(RECIPE, "--out", out, "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_whole_chain(chain):
    from cgm_min.experiments import results as rs
    from cgm_min.io.curvature_files import read_curvature_metadata
    out, r = chain
    for step in STEPS:
        assert f"{step}: done in" in r.stdout
        done = json.loads((out / step / "done.json").read_text())
        assert done["step"] == step and done["recipe"] == "tiny-llava-corners"
    assert not list(out.glob(".*.partial"))
    # the tiny data: one verifiable target per task, manifest included (nothing else left in OUT/data)
    from data_scripts.real import verify
    general = ["colour", "shape", "position", "presence", "count", "addition", "choice", "digit"]
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(["corners", "calibration", *general, "done.json"])
    assert verify(out / "data", "corners")["splits"] == {"train": 128, "heldout": 16}
    assert verify(out / "data", "calibration")["splits"] == {"calibration": 4 * 8}
    assert all(verify(out / "data", t)["splits"] == {"heldout": 16} for t in general)
    # the models were hashed for h_pt and h_ft through cgm-merge's cache; the fine-tuned model's hashes
    # followed its folder out of .finetune.partial, where the merge found them
    cache = json.loads(Path(os.environ["CGM_MERGE_HASH_CACHE"]).read_text())
    assert os.path.realpath(out / "finetune" / "model" / "model.safetensors") in cache
    assert not [k for k in cache if ".partial" in k]
    h_ft = read_curvature_metadata(out / "finetune" / "h_ft")
    assert h_ft["kind"] == "h_ft" and h_ft["samples"] == 8 * 16          # every sample of 8 steps of 16
    h_pt = read_curvature_metadata(out / "curvature" / "h_pt")
    assert h_pt["kind"] == "h_pt" and h_pt["samples"] == 8 * 4            # 4 calibration samples x 8 tasks
    merges = json.loads((out / "merge" / "merges.json").read_text())
    assert list(merges) == ["cgm-an1", "cgm_dagger-an1-k0.1"]
    for label in merges:
        assert (out / "merge" / label / "cgm_merge.json").is_file()
    df = rs.read_table(out / "results" / "results.parquet")
    assert list(df["variant"]) == ["pre_trained", "fine_tuned", "cgm", "cgm_dagger"]
    assert set(df["regime"]) == {"reproduce"} and set(df["target"]) == {"corners"}
    ft = df.set_index("variant")
    # fine-tuning learned the target the pre-trained model cannot do
    assert ft.loc["fine_tuned", "target_score"] > ft.loc["pre_trained", "target_score"]
    assert ft.loc["cgm", "alpha_norm"] == 1.0 and ft.loc["cgm", "alpha"] > 0
    assert json.loads(ft.loc["cgm_dagger", "hyperparameters"])["k"] == 0.1


def test_the_figure_chapter_draws_it(chain):
    """The paper-figure functions take the chain's table as they take the miniature experiment's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cgm_min.experiments import paper_figures as pf
    from cgm_min.experiments import results as rs
    df = rs.read_table(chain[0] / "results" / "results.parquet")
    where = {"regime": "reproduce", "family": "llava", "target": "corners"}
    assert pf.setting_tasks(df) == ("corners", ["colour", "shape", "position", "presence", "count", "addition",
                                                "choice", "digit"])
    fig = plt.figure()
    bars = pf.fig1_bars(fig.add_subplot(121), df, where)
    assert list(bars) == ["pre_trained", "fine_tuned", "cgm", "cgm_dagger"]
    heights = [b.get_height() for b in bars["cgm"]]            # Pre-Avg, Target, Hscore in points
    row = df.set_index("variant").loc["cgm"]
    assert heights == pytest.approx([100 * row["pre_avg"], 100 * row["target_score"], 100 * row["hscore"]])
    pf.fig3_radar(fig.add_subplot(122, projection="polar"), df, where)
    plt.close(fig)


def test_resume_skips_finished_steps(chain, tmp_path):
    out, _ = chain
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "results")
    r = cli(RECIPE, "--out", copy)
    assert r.returncode == 0, r.stderr[-2000:]
    for step in STEPS[:-1]:
        assert f"{step}: done, skipped" in r.stdout
    assert "results: done in" in r.stdout
    a = (out / "results" / "results.parquet")
    import pandas as pd
    pd.testing.assert_frame_equal(pd.read_parquet(a).drop(columns="seconds"),
                                  pd.read_parquet(copy / "results" / "results.parquet").drop(columns="seconds"))
    # a folder from another recipe is refused, not mixed
    other = tmp_path / "other.yaml"
    other.write_text(RECIPE.read_text().replace("k: 0.1}", "k: 0.2}").replace("../checkpoints",
                                                                             str(ROOT / "checkpoints")))
    r = cli(other, "--out", copy)
    assert r.returncode == 2 and "was made by another recipe" in r.stderr and r.stderr.count("\n") == 1


def test_two_processes_equal_one(chain, tmp_path):
    """h_pt with two gloo processes (torchrun + accelerate) equals the one-process h_pt: each process sums
    its share of the calibration batches, the sums are all-reduced. Tolerance: float32 addition order,
    1e-5 of each tensor's largest entry. Fine-tuning with two processes (DDP) gives the same losses and h_ft."""
    from cgm_min.world.training import load_curvature
    out, _ = chain
    two = tmp_path / "two"
    two.mkdir()
    shutil.copytree(out / "data", two / "data")
    r = cli(RECIPE, "--out", two, "--step", "curvature", launcher=two_processes())
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(RECIPE, "--out", two, "--step", "finetune", launcher=two_processes())
    assert r.returncode == 0, r.stderr[-3000:]
    for rel in ("curvature/h_pt", "finetune/h_ft"):
        one, _ = load_curvature(out / rel / "model.safetensors")
        got, meta = load_curvature(two / rel / "model.safetensors")
        assert set(one) == set(got)
        if rel.startswith("curvature"):
            assert meta["processes"] == 2
        for n in one:
            torch.testing.assert_close(got[n], one[n], rtol=0, atol=1e-5 * float(one[n].abs().max()))
    a = json.loads((out / "finetune" / "log.json").read_text())
    b = json.loads((two / "finetune" / "log.json").read_text())
    assert b["processes"] == 2 and b["h_ft_samples"] == a["h_ft_samples"]
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)


def test_lmms_scores_from_simple_evaluate():
    """lmms-eval's result dict -> scores in [0, 1]: several metrics averaged (the paper's Flickr30k), percent
    metrics divided by their scale, a missing metric named in one line."""
    from cgm_min.reproduce.evaluate import extract_scores
    from cgm_min.reproduce.recipes import EvalTask
    res = {"results": {"flickr30k_test": {"alias": "flickr30k_test", "flickr_Bleu_1,none": 0.7,
                                          "flickr_CIDEr,none": 0.5},
                       "mmbench_en_dev": {"gpt_eval_score,none": 64.3}}}
    tasks = [EvalTask("Flickr30k", "flickr30k_test", ("flickr_Bleu_1", "flickr_CIDEr")),
             EvalTask("MM-Bench", "mmbench_en_dev", ("gpt_eval_score",), 100.0)]
    assert extract_scores(res, tasks) == pytest.approx({"Flickr30k": 0.6, "MM-Bench": 0.643})
    with pytest.raises(ValueError, match="has no metric 'flickr_METEOR'; it reports flickr_Bleu_1, flickr_CIDEr"):
        extract_scores(res, [EvalTask("Flickr30k", "flickr30k_test", ("flickr_METEOR",))])


def test_paper_recipe_results_sit_beside_the_papers_rows(tmp_path):
    """A paper recipe's results table (from fabricated scores) has the paper's benchmark columns, concatenates
    with the paper's printed rows into one valid table, and the figure code draws both settings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from cgm_min.experiments import paper_figures as pf
    from cgm_min.experiments import results as rs
    from cgm_min.reproduce.evaluate import results_table
    from cgm_min.reproduce.recipes import load_recipe
    recipe = load_recipe(ROOT / "recipes" / "llava-1.5-7b-okvqa.yaml", check_paths=False)
    out = tmp_path / "out"
    labels = [recipe.evaluate.target.label, *recipe.general_labels]
    rng = np.random.default_rng(0)
    models = ["pre_trained", "fine_tuned", *[s.label for s in recipe.merge]]
    for step, name, data in [
            ("evaluate", "scores.json", {"scores": {m: {t: float(rng.uniform(0.3, 0.8)) for t in labels} for m in models},
                                         "seconds": {m: 1.0 for m in models}}),
            ("merge", "merges.json", {s.label: {"method": s.method, "hyperparameters": dict(s.parameters),
                                                "alpha": None} for s in recipe.merge}),
            ("finetune", "log.json", {"optimizer_steps": 141})]:
        (out / step).mkdir(parents=True)
        (out / step / name).write_text(json.dumps(data))
    ours = results_table(recipe, out)
    assert list(ours["variant"]) == ["pre_trained", "fine_tuned", "cgm", "cgm_dagger"]
    assert {f"task:{t}" for t in labels} <= set(ours.columns)
    both = rs.check_schema(pd.concat([pf.paper_results(), ours], ignore_index=True))
    fig, (a, b) = plt.subplots(1, 2)
    paper_bars = pf.fig1_bars(a, both, pf.paper_setting(1))
    our_bars = pf.fig1_bars(b, both, {"regime": "reproduce", "run": recipe.name})
    assert list(our_bars) == ["pre_trained", "fine_tuned", "cgm", "cgm_dagger"] and "cgm_dagger" in paper_bars
    plt.close(fig)


def test_gpu_check_script(tmp_path):
    """benchmarks/gpu_check.py refuses without a GPU in one line; on the CPU it times the chain and both modes."""
    script = ROOT / "benchmarks" / "gpu_check.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no GPU") and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, script, "--device", "cpu", "--steps", "1", "--repeats", "1", "--out",
                        tmp_path / "g.json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    g = json.loads((tmp_path / "g.json").read_text())
    assert set(g["steps"]) == set(STEPS)
    for o in g["h_ft_overhead"].values():
        assert o["steps_each"] == {"plain": 1, "h_ft": 1} and o["median_step_s"]["h_ft"] > 0


def test_a_step_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """run_step through AtomicOutputDir's tree staging: a failing step leaves nothing (an interrupted run's
    hidden folder is cleared first), a finished one appears with its tree and done.json, and is skipped next."""
    from cgm_min.reproduce import chain
    from cgm_min.reproduce.recipes import load_recipe
    recipe = load_recipe(RECIPE)
    out = tmp_path / "out"
    (out / ".data.partial" / "stale").mkdir(parents=True)         # what an interrupted run left

    def failing(recipe, out, tmp):
        assert sorted(os.listdir(tmp)) == []
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")

    def tree(recipe, out, tmp):
        (tmp / "t" / "u").mkdir(parents=True)
        (tmp / "t" / "u" / "f.txt").write_text("1")
        return {"made": 1}
    monkeypatch.setitem(chain.STEP_FUNCS, "data", failing)
    with pytest.raises(RuntimeError, match="boom"):
        chain.run_step(recipe, out, "data", log=lambda *_: None)
    assert os.listdir(out) == []
    (out / ".data.partial").mkdir()
    monkeypatch.setitem(chain.STEP_FUNCS, "data", tree)
    assert chain.run_step(recipe, out, "data", log=lambda *_: None) is True
    assert os.listdir(out) == ["data"] and (out / "data" / "t" / "u" / "f.txt").read_text() == "1"
    done = json.loads((out / "data" / chain.DONE).read_text())
    assert set(done) == {"step", "recipe", "recipe_sha256", "seconds", "summary"} and done["summary"] == {"made": 1}
    assert chain.is_done(out, "data", recipe) and chain.run_step(recipe, out, "data", log=lambda *_: None) is False
