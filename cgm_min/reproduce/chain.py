"""The chain: data -> finetune -> curvature -> merge -> evaluate -> results, one folder per step.

    from cgm_min.reproduce.chain import run_chain
    run_chain(load_recipe("recipes/tiny-llava-corners.yaml"), out="runs/tiny")    # resumable

Each step writes OUT/<step>/ through a hidden folder OUT/.<step>.partial that is renamed into place with its
`done.json` (the recipe's SHA-256, the step's seconds and what it made) once complete; a step whose folder
exists is skipped, so an interrupted chain resumes where it stopped. A finished folder made by another
recipe is refused (one line), never mixed.

    data        paper: the data folder's target and calibration set verified against their manifests
                (data_scripts.real.verify); tiny: the miniature target (train + held-out), every general
                task (held-out) and the calibration set exported into OUT/data in the same local format, each
                target with its manifest (data_scripts.real.verify checks it)
    finetune    OUT/finetune/model (checkpoint), OUT/finetune/h_ft (curvature files), log.json
    curvature   OUT/curvature/h_pt: h_pt at w_pt on the calibration set (every process of accelerate launch)
    merge       OUT/merge/<label>/: one cgm-merge output per merge of the recipe (cgm-merge's Python API)
    evaluate    OUT/evaluate/scores.json: {model: {task label: score in [0, 1]}} for the pre-trained, the
                fine-tuned and every merged model
    results     OUT/results/results.parquet in the results-table schema of the miniature experiment
                (cgm_min.experiments.results), so the figure chapter draws it unchanged

`finetune` and `curvature` run on every process `accelerate launch` starts; the other steps on the main
process only.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

STEPS = ("data", "finetune", "curvature", "merge", "evaluate", "results")
NEEDS = {"data": (), "finetune": ("data",), "curvature": ("data",), "merge": ("finetune", "curvature"),
         "evaluate": ("merge",), "results": ("evaluate",)}
COLLECTIVE = ("finetune", "curvature")
DONE = "done.json"
REGIME = "reproduce"          # the results table's regime column for chain runs
BARRIER_HOURS = 72            # how long processes wait for the main one (torch.distributed timeout)


def process_state():
    """accelerate's PartialState: the processes `accelerate launch` (or torchrun) started; on a machine without
    a GPU, CPU processes joined by gloo (accelerate needs `cpu=True` to see them)."""
    import datetime
    import torch
    from accelerate import PartialState
    # the other processes wait at a barrier while the main one merges and evaluates (hours at the paper's
    # scale): a process-group timeout longer than that (the default is 10-30 minutes)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=BARRIER_HOURS))


def recipe_sha256(recipe) -> str:
    return hashlib.sha256(recipe.text.encode()).hexdigest()


def data_dir(recipe, out: Path) -> Path:
    return recipe.data_dir if recipe.data_dir is not None else out / "data"


def is_done(out: Path, step: str, recipe) -> bool:
    """Whether OUT/<step> is finished; refuses one finished by another recipe."""
    folder = out / step
    if not folder.exists():
        return False
    marker = folder / DONE
    if not marker.is_file():
        raise ValueError(f"{folder} exists but is not a finished step (no {DONE}); remove it or use another --out")
    done = json.loads(marker.read_text())
    if done.get("recipe_sha256") != recipe_sha256(recipe):
        raise ValueError(f"{folder} was made by another recipe ({done.get('recipe')}); use another --out")
    return True


def preflight(recipe, steps: Sequence[str]) -> None:
    """Everything a paper run needs, checked before any work: the model, the data folder, a GPU."""
    if recipe.scale != "paper":
        return
    import torch
    from .recipes import _model_ref
    if isinstance(recipe.model, str):
        _model_ref(str(recipe.source or "recipe"), Path("."), recipe.model, True)
    elif not (Path(recipe.model) / "config.json").is_file():
        raise FileNotFoundError(f"{recipe.name}: no checkpoint (config.json) in the model folder {recipe.model}")
    if recipe.data_dir is None or not Path(recipe.data_dir).is_dir():
        raise FileNotFoundError(f"{recipe.name}: no data folder {recipe.data_dir} (prepare it with data_scripts, "
                                f"see data_scripts/README.md)")
    for target in (recipe.target, "calibration"):
        if not (Path(recipe.data_dir) / target / "manifest.json").is_file():
            raise FileNotFoundError(f"{recipe.name}: {Path(recipe.data_dir) / target} is not prepared (no "
                                    f"manifest.json); run data_scripts for {target}")
    if any(s in COLLECTIVE + ("evaluate",) for s in steps) and not torch.cuda.is_available():
        raise ValueError(f"{recipe.name}: the paper scale needs a GPU and torch sees none "
                         f"(torch.cuda.is_available() is False); use a tiny recipe on the CPU")


def model_path(recipe) -> Path:
    from ..io.merge_config import resolve_input
    return resolve_input(str(recipe.model), Path("."), "model") if isinstance(recipe.model, str) else Path(recipe.model)


# ----------------------------------------------------------------------------------------------
# The steps. Each writes into `tmp` (the hidden folder) and returns a summary for done.json.

def step_data(recipe, out: Path, tmp: Path) -> dict:
    if recipe.scale == "paper":
        from .data import verify
        made = {t: verify(recipe.data_dir, t)["splits"] for t in (recipe.target, "calibration")}
        (tmp / "verified.json").write_text(json.dumps(made, indent=1))
        return {"verified": made}
    return export_tiny(recipe, tmp)


def export_tiny(recipe, tmp: Path) -> dict:
    """The miniature tasks in the local format (`data_scripts.real.export_miniature_splits`): the target's
    train split (finetune.max_samples records), the evaluated split of the target and of every general task
    (evaluate.limit records each), and the calibration set (curvature.n_per_task records of every general
    task, with their task names). Each task is written with all its splits as one target, manifest included,
    so `data_scripts.real.verify` checks OUT/data as it checks a prepared data folder."""
    from data_scripts.real import export_miniature_splits
    n_train = recipe.finetune.max_samples or 256
    n_eval = recipe.evaluate.limit or 32
    parts = [(recipe.target, "train", n_train), ("calibration", "calibration", recipe.curvature.n_per_task)]
    parts += [(t.task, recipe.evaluate.split, n_eval) for t in (recipe.evaluate.target, *recipe.evaluate.general)]
    targets: dict[str, dict[str, int]] = {}
    for task, split, n in parts:
        splits = targets.setdefault(task, {})
        splits[split] = max(n, splits.get(split, 0))
    for task, splits in targets.items():
        export_miniature_splits(task, splits, tmp)
    return {"train": n_train, "eval_per_task": n_eval, "calibration_per_task": recipe.curvature.n_per_task}


def step_finetune(recipe, out: Path, tmp: Path) -> dict:
    from .data import read_split
    from .finetune import finetune
    records = read_split(data_dir(recipe, out), recipe.target, "train", recipe.finetune.max_samples)
    log = finetune(recipe, model_path(recipe), records, tmp)
    return {"samples": log["samples"], "optimizer_steps": log["optimizer_steps"], "seconds": log["seconds"],
            "h_ft_samples": log["h_ft_samples"]}


def step_curvature(recipe, out: Path, tmp: Path) -> dict:
    from .curvature import calibration_records, measure_h_pt, write_h_pt
    from .data import read_split
    records = calibration_records(read_split(data_dir(recipe, out), "calibration", "calibration"),
                                  recipe.curvature.n_per_task, [t.task for t in recipe.evaluate.general])
    h, meta = measure_h_pt(recipe, model_path(recipe), records)
    state = process_state()
    if state.is_main_process:
        write_h_pt(h, meta, model_path(recipe), tmp / "h_pt")
    state.wait_for_everyone()
    return {k: meta[k] for k in ("samples", "processes", "estimator")}


def merge_config(recipe, out: Path, step) -> dict:
    return {"pre_trained": str(model_path(recipe)), "fine_tuned": str(out / "finetune" / "model"),
            "curvature": {"pre_trained": str(out / "curvature" / "h_pt"),
                          "fine_tuned": str(out / "finetune" / "h_ft")},
            "method": step.method, "parameters": dict(step.parameters),
            "merge_set": recipe.merge_set.as_dict()}


def step_merge(recipe, out: Path, tmp: Path) -> dict:
    from ..io.merge_checkpoints import merge_checkpoints
    from ..io.merge_config import parse_config
    made = {}
    for step in recipe.merge:
        cfg = parse_config(merge_config(recipe, out, step), out)
        rec = merge_checkpoints(cfg, tmp / step.label, progress=False, log=lambda *a, **k: None)
        made[step.label] = {"method": step.method, "hyperparameters": rec["hyperparameters"],
                            "alpha": rec.get("alpha")}
    (tmp / "merges.json").write_text(json.dumps(made, indent=1))
    return {"merges": list(made)}


def models_to_score(recipe, out: Path) -> dict[str, Path]:
    return {"pre_trained": model_path(recipe), "fine_tuned": out / "finetune" / "model",
            **{s.label: out / "merge" / s.label for s in recipe.merge}}


def step_evaluate(recipe, out: Path, tmp: Path) -> dict:
    from .evaluate import score_model
    scores, seconds = {}, {}
    for label, path in models_to_score(recipe, out).items():
        t0 = time.perf_counter()
        scores[label] = score_model(recipe, path, data_dir(recipe, out))
        seconds[label] = time.perf_counter() - t0
    (tmp / "scores.json").write_text(json.dumps({"scores": scores, "seconds": seconds}, indent=1))
    return {"models": list(scores)}


def step_results(recipe, out: Path, tmp: Path) -> dict:
    from ..experiments.results import write_table
    from .evaluate import results_table
    df = results_table(recipe, out)
    write_table(df, tmp / "results.parquet")
    return {"rows": len(df)}


STEP_FUNCS: dict[str, Callable] = {"data": step_data, "finetune": step_finetune, "curvature": step_curvature,
                                    "merge": step_merge, "evaluate": step_evaluate, "results": step_results}


# ----------------------------------------------------------------------------------------------
# Running.

def run_step(recipe, out: Path, step: str, log=print) -> bool:
    """Run one step unless it is done; returns whether it ran. Collective steps run on every process: they
    share the step's hidden folder (io.outdir.AtomicOutputDir with a fixed staging name), which the main
    process creates (removing what an interrupted run left), renames into place with done.json, or removes
    when the step fails."""
    from ..io.merge_checkpoints import hash_cache_moved
    from ..io.outdir import AtomicOutputDir
    state = process_state()
    out = Path(out)
    if is_done(out, step, recipe):
        if state.is_main_process:
            log(f"{step}: done, skipped ({out / step})")
        return False
    missing = [n for n in NEEDS[step] if not is_done(out, n, recipe)]
    if missing:
        raise ValueError(f"step {step} needs {', '.join(missing)}: run that step first")
    tmp = out / f".{step}.partial"
    target = AtomicOutputDir(out / step, staging_name=tmp.name) if state.is_main_process else None
    if target is not None:
        target.tree()
    state.wait_for_everyone()
    if step not in COLLECTIVE and not state.is_main_process:
        state.wait_for_everyone()
        return True
    t0 = time.perf_counter()
    if state.is_main_process:
        log(f"{step}: running")
    try:
        summary = STEP_FUNCS[step](recipe, out, tmp)
    except BaseException:
        if target is not None:
            target.abort()
        raise
    if target is not None:
        done = {"step": step, "recipe": recipe.name, "recipe_sha256": recipe_sha256(recipe),
                "seconds": time.perf_counter() - t0, "summary": summary}
        (tmp / DONE).write_text(json.dumps(done, indent=1))
        target.commit()
        hash_cache_moved(tmp, out / step)       # the files hashed in the hidden folder keep their hashes
        log(f"{step}: done in {done['seconds']:.1f} s")
    state.wait_for_everyone()
    return True


def run_chain(recipe, out: str | Path, steps: Sequence[str] | None = None, log=print) -> list[str]:
    """Run `steps` (default: all, in order), skipping finished ones; returns the steps that ran."""
    out = Path(out).resolve()
    steps = list(steps or STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step {unknown[0]!r}; steps: {', '.join(STEPS)}")
    preflight(recipe, steps)
    out.mkdir(parents=True, exist_ok=True)
    return [s for s in steps if run_step(recipe, out, s, log)]
