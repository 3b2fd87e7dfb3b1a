"""The chains a notebook runs at each preset, and the check before any work: every recipe read, its scale
against the preset, and for each chain with steps left the model, the prepared data and a GPU, each problem
one line; a finished chain needs none of them. The last test executes the chapter at preset paper on this
machine (no model, no GPU) and checks that it stops in its first cell with that line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cgm_min import pipeline
from cgm_min.reproduce import chain, plan
from cgm_min.reproduce.recipes import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
OKVQA = RECIPES / "llava-1.5-7b-okvqa.yaml"


def names(files):
    return [Path(f).stem for f in files]


def test_each_preset_has_its_recipes():
    assert names(plan.recipe_files("tiny")) == ["tiny-llava-corners", "tiny-qwen-caption"]
    assert names(plan.recipe_files("cpu")) == ["mini-llava-caption", "mini-llava-corners", "mini-qwen-caption",
                                               "mini-qwen-colour_code"]
    paper = names(plan.recipe_files("paper"))
    assert sorted(paper) == ["llava-1.5-7b-flickr30k", "llava-1.5-7b-okvqa", "qwen2.5-vl-3b-flickr30k",
                             "qwen2.5-vl-3b-latex_ocr"]
    assert all(load_recipe(f, check_paths=False).scale == "paper" for f in plan.recipe_files("paper"))
    # one miniature recipe per paper table at preset cpu, each standing for a different table
    from cgm_min.experiments import paper_figures as pf
    tables = [pf.paper_table_of(r.family, r.evaluate.target.label)
              for r in map(load_recipe, plan.recipe_files("cpu"))]
    assert sorted(tables) == [1, 2, 3, 4]
    assert [pf.paper_table_of(r.family, r.evaluate.target.label)
            for r in (load_recipe(f, check_paths=False) for f in sorted(plan.recipe_files("paper")))] == [2, 1, 3, 4]


def test_recipes_parameter_replaces_the_presets(tmp_path):
    given = f" {RECIPES / 'tiny-qwen-caption.yaml'} ,"
    assert plan.recipe_files("tiny", given) == [RECIPES / "tiny-qwen-caption.yaml"]
    with pytest.raises(FileNotFoundError, match="RECIPES: no recipe file .*none.yaml"):
        plan.recipe_files("tiny", str(tmp_path / "none.yaml"))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        plan.recipe_files("huge")


def test_scale_must_match_the_preset(tmp_path):
    with pytest.raises(ValueError, match="scale 'tiny' cannot run at preset 'paper'"):
        plan.check_runs(plan.recipe_files("tiny"), tmp_path / "runs", "paper")
    with pytest.raises(ValueError, match="scale 'paper' cannot run at preset 'cpu'"):
        plan.check_runs([OKVQA], tmp_path / "runs", "cpu")
    with pytest.raises(ValueError, match="share the name 'tiny-llava-corners'"):
        plan.check_runs([RECIPES / "tiny-llava-corners.yaml"] * 2, tmp_path / "runs", "tiny")
    assert not (tmp_path / "runs").exists()


def paper_recipe(tmp_path, model, data):
    text = OKVQA.read_text().replace("llava-hf/llava-1.5-7b-hf", str(model)).replace("../data/real", str(data))
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_paper_runs_are_checked_before_any_work(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    # the shipped recipe: its model is not in this machine's Hugging Face cache
    with pytest.raises(RecipeError, match="neither a path nor a model in the local Hugging Face cache"):
        plan.check_runs(plan.recipe_files("paper"), runs, "paper")
    # a model folder, no data folder
    model = ROOT / "checkpoints" / "mini-llava-1.5"
    data = tmp_path / "data"
    with pytest.raises(RecipeError, match="data_dir: no such file or folder"):
        plan.check_runs([paper_recipe(tmp_path, model, data)], runs, "paper")
    # a data folder that is not prepared
    data.mkdir()
    with pytest.raises(FileNotFoundError, match="is not prepared \\(no manifest.json\\)"):
        plan.check_runs([paper_recipe(tmp_path, model, data)], runs, "paper")
    # prepared (fabricated in the real format), but no GPU
    from data_scripts.real.local import Example, write_target
    write_target(data, "okvqa", "fabricated", [("train", Example("q1", "What is it?", ["a cat"]))])
    write_target(data, "calibration", "fabricated", [("calibration", Example("c1", "Q?", ["yes"], task="pope"))])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="the paper scale needs a GPU"):
        plan.check_runs([paper_recipe(tmp_path, model, data)], runs, "paper")
    # with a GPU (pretended) everything is there: every step is still to run
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    (run,) = plan.check_runs([paper_recipe(tmp_path, model, data)], runs, "paper")
    assert run.todo == chain.STEPS and run.out == runs.resolve() / "llava-1.5-7b-okvqa"
    assert not runs.exists()                             # checking writes nothing


def test_a_finished_chain_needs_no_model_data_or_gpu(tmp_path, monkeypatch):
    """Chains run elsewhere (accelerate launch on GPUs) are read as they are."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    recipe = load_recipe(OKVQA, check_paths=False)
    out = tmp_path / "runs" / recipe.name
    for step in chain.STEPS:
        (out / step).mkdir(parents=True)
        (out / step / chain.DONE).write_text(json.dumps({"step": step, "recipe": recipe.name, "seconds": 1.0,
                                                         "recipe_sha256": chain.recipe_sha256(recipe)}))
    (run,) = plan.check_runs([OKVQA], tmp_path / "runs", "paper")
    assert run.todo == ()
    # a chain folder of another recipe is refused, not read
    (out / "results" / chain.DONE).write_text(json.dumps({"recipe": "other", "recipe_sha256": "0"}))
    with pytest.raises(ValueError, match="was made by another recipe"):
        plan.check_runs([OKVQA], tmp_path / "runs", "paper")


def test_the_chapter_at_preset_paper_stops_in_its_first_cell(tmp_path):
    """Here there is neither the model nor a GPU: the notebook fails before any step, naming the model; the
    pipeline's command says so in one line (no traceback) and exits 1."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "cgm_min.pipeline", "notebooks", "--preset", "paper", "--only",
                        "07_paper_scale", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 07_paper_scale: cell ") and "stopped with RecipeError" in last, r.stderr
    assert "neither a path nor a model in the local Hugging Face cache" in last
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results" / "07_paper_scale").exists()
    # the error names the first cell after the parameters: the check, before any import of the chain's work
    with pytest.raises(pipeline.NotebookError) as err:
        pipeline.execute_notebook("07_paper_scale", "paper", tmp_path, timeout=300)
    assert "plan.check_runs" in err.value.__cause__.source


def test_further_parameters_must_be_declared(tmp_path):
    assert "RUNS_DIR" in pipeline.declared_parameters("07_paper_scale")
    with pytest.raises(ValueError, match="no notebook of \\['01_toy_quadratics'\\] has a parameter 'RUNS_DIR'"):
        pipeline.execute_all("tiny", tmp_path, ["01_toy_quadratics"], params={"RUNS_DIR": "runs"})
    r = pipeline.main(["notebooks", "--only", "01_toy_quadratics", "--param", "runs=x", "--out", str(tmp_path)])
    assert r == 2
    assert not (tmp_path / "executed").exists()
