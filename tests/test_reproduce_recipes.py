"""Recipes: the shipped ones carry the paper's settings; bad recipes fail with one line naming the field;
the dry run plans every paper recipe from the cost model."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cgm_min.reproduce import costs
from cgm_min.reproduce.recipes import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PAPER = ["llava-1.5-7b-okvqa", "llava-1.5-7b-flickr30k", "qwen2.5-vl-3b-flickr30k", "qwen2.5-vl-3b-latex_ocr"]
# the lmms-eval task list
LLAVA_SUITE = ["vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val", "pope", "mmbench_en_dev",
               "mmbench_cn_dev"]
LATEX_SUITE = LLAVA_SUITE[:6] + ["infovqa_val", "ok_vqa_val2014"]


def paper(name):
    return load_recipe(RECIPES / f"{name}.yaml", check_paths=False)


def test_paper_recipes_carry_the_papers_settings():
    for name in PAPER:
        r = paper(name)
        ft = r.finetune
        if r.backbone == "llava-1.5-7b":
            assert (r.merge_set.preset, ft.epochs, ft.lr, ft.global_batch) == ("llava-1.5", 1, 1e-4, 64)
        else:
            assert (r.merge_set.preset, ft.epochs, ft.lr, ft.global_batch) == ("qwen2.5-vl", 3, 1e-5, 64)
        assert r.merge_set.last_layers is None          # the preset's own depth: 12 (LLaVA) / 6 (Qwen)
        assert ft.h_ft and ft.gradient_checkpointing and r.curvature.n_per_task == 8
        suite = LATEX_SUITE if r.target == "latex_ocr" else LLAVA_SUITE
        assert [t.task for t in r.evaluate.general] == suite
    assert paper("llava-1.5-7b-okvqa").evaluate.target.task == "ok_vqa_val2014"
    assert paper("qwen2.5-vl-3b-flickr30k").evaluate.target.task == "flickr30k_test"


def test_labels_match_the_papers_tables():
    """The results-table columns of a paper recipe are the benchmark names of the paper's Tables 1-4."""
    from cgm_min.experiments.paper import load_paper_tables
    t = load_paper_tables()
    for name, table in zip(PAPER, (1, 2, 3, 4)):
        r = paper(name)
        rows = t[t["table"] == table]
        assert set(rows.loc[rows["role"] == "general", "benchmark"]) == set(r.general_labels)
        assert set(rows.loc[rows["role"] == "target", "benchmark"]) == {r.evaluate.target.label}


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def tiny_text():
    return (RECIPES / "tiny-llava-corners.yaml").read_text().replace("../checkpoints", str(ROOT / "checkpoints"))


@pytest.mark.parametrize("change, message", [
    (("finetune:", "finetune:\n  learning_rate: 0.1"), "unknown key 'learning_rate' in finetune"),
    (("name: tiny", "colour: red\nname: tiny"), "unknown key 'colour' in the recipe"),
    (("  lr: 5.0e-4", "  lr: -1"), "finetune.lr must be > 0"),
    (("  global_batch: 16", "  global_batch: 0"), "finetune.global_batch must be >= 1"),
    (("  micro_batch: 4", "  micro_batch: 32"), "micro_batch 32 is larger than global_batch 16"),
    (("  estimator: fisher", "  estimator: kfac"), "curvature.estimator must be one of fisher, hutchinson"),
    (("k: 0.1}", "k: 1.5}"), "merge[1]"),
    (("method: cgm,", "method: nonsense,"), "unknown method 'nonsense'"),
    (("backend: local", "backend: vllm"), "evaluate.backend must be one of lmms, local"),
    (("mini-llava-1.5\nmodel", "mini-llava-1.5\nmodel: nowhere/x\nxmodel"), "unknown key 'xmodel'"),
])
def test_recipe_errors_are_one_line(tmp_path, change, message):
    p = write(tmp_path, tiny_text().replace(*change, 1))
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert message in str(err.value) and "\n" not in str(err.value) and str(p) in str(err.value)


def test_missing_paths(tmp_path):
    p = write(tmp_path, tiny_text().replace(str(ROOT / "checkpoints" / "mini-llava-1.5"), "../no-such-model"))
    with pytest.raises(RecipeError, match="model: no such file or folder"):
        load_recipe(p)
    text = (RECIPES / "llava-1.5-7b-okvqa.yaml").read_text()
    p = write(tmp_path, text.replace("llava-hf/llava-1.5-7b-hf", str(ROOT / "checkpoints" / "mini-llava-1.5")))
    with pytest.raises(RecipeError, match="data_dir: no such file or folder"):
        load_recipe(p)
    p = write(tmp_path, text)            # a hub id that is not in the local cache: never downloaded
    with pytest.raises(RecipeError, match="neither a path nor a model in the local Hugging Face cache"):
        load_recipe(p)


def cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "cgm_min.cli.reproduce", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_errors_are_one_line(tmp_path):
    bad = write(tmp_path, tiny_text().replace("  lr: 5.0e-4", "  lr: 2"))
    for args, message in [((bad,), "finetune.lr must be > 0 and <= 1"),
                          ((tmp_path / "none.yaml",), "no recipe file"),
                          ((RECIPES / "tiny-llava-corners.yaml", "--step", "train", "--out", tmp_path / "o"),
                           "unknown step 'train'"),
                          ((RECIPES / "tiny-llava-corners.yaml", "--step", "merge", "--out", tmp_path / "o"),
                           "step merge needs finetune, curvature: run that step first"),
                          ((RECIPES / "llava-1.5-7b-okvqa.yaml",), "neither a path nor a model")]:
        r = cli(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_paper_preflight_before_any_work(tmp_path):
    """A paper recipe with its model but no prepared data (or no GPU) stops before a step starts."""
    model = ROOT / "checkpoints" / "mini-llava-1.5"
    data = tmp_path / "data"
    data.mkdir()
    text = (RECIPES / "llava-1.5-7b-okvqa.yaml").read_text()
    p = write(tmp_path, text.replace("llava-hf/llava-1.5-7b-hf", str(model)).replace("../data/real", str(data)))
    r = cli(p, "--out", tmp_path / "out")
    assert r.returncode == 2 and "is not prepared (no manifest.json)" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    # prepared data (fabricated, in the real format) but no GPU on this machine
    from data_scripts.real.local import Example, write_target
    write_target(data, "okvqa", "fabricated", [("train", Example("q1", "What is it?", ["a cat"]))])
    write_target(data, "calibration", "fabricated", [("calibration", Example("c1", "Q?", ["yes"], task="pope"))])
    r = cli(p, "--out", tmp_path / "out", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "the paper scale needs a GPU" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_every_paper_recipe():
    for name in PAPER:
        r = cli(RECIPES / f"{name}.yaml", "--dry-run")
        assert r.returncode == 0, r.stderr
        plan = costs.plan_text(paper(name))
        assert r.stdout.strip() == plan.strip()
        for step in ("data", "finetune", "curvature", "merge", "evaluate", "results", "assumed:"):
            assert step in r.stdout


def test_cost_model_follows_the_parameter_counts():
    """Fine-tuning FLOPs grow with epochs and samples; the merge set the estimate uses is the real one; the
    guide's table is the cost model's."""
    from cgm_min.real.architectures import parameter_counts
    llava, qwen = paper("llava-1.5-7b-okvqa"), paper("qwen2.5-vl-3b-flickr30k")
    s = costs.real_shapes("llava-1.5-7b")
    assert s.merge_set == parameter_counts("llava-1.5-7b")["merge_set"]
    assert s.image_tokens == 576                               # (336 / 14)^2
    one = costs.step_costs(llava, n_train=1000)[0]
    two = costs.step_costs(llava, n_train=2000)[0]
    assert two.flops == pytest.approx(2 * one.flops)
    # 3 epochs of Qwen cost 3x one epoch of the same data
    once = replace(qwen, finetune=replace(qwen.finetune, epochs=1))
    assert costs.step_costs(qwen, n_train=1000)[0].flops == pytest.approx(3 * costs.step_costs(once, n_train=1000)[0].flops)
    # memory: the trained merge set alone (master weights, gradients, AdamW, h_ft: 20 bytes a parameter)
    assert one.memory_gb * 1e9 > 20 * s.merge_set
    table = costs.markdown_table([paper(n) for n in PAPER])
    assert table.count("\n") == 1 + 4 * len(PAPER)


def test_the_guide_shows_the_cost_models_table():
    text = (ROOT / "book" / "reproducing.md").read_text()
    assert costs.guide_block(costs.shipped_recipes(RECIPES)) in text, \
        "book/reproducing.md's cost table is stale: run python -m cgm_min.reproduce.costs"
    for name in PAPER:
        assert f"recipes/{name}.yaml" in text


def test_invalid_yaml_is_one_line(tmp_path):
    p = write(tmp_path, "name: x\n  bad: [\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert str(err.value).startswith(f"{p}: invalid YAML") and "line 2" in str(err.value) and "\n" not in str(err.value)
