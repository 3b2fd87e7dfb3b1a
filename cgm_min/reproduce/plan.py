"""Which chains a notebook runs at a preset, and the check, before any step runs, that every one of them can.

    from cgm_min.reproduce import plan
    runs = plan.check_runs(plan.recipe_files("cpu"), "cache/chains")     # one-line error if anything is missing
    for run in runs:
        chain.run_chain(run.recipe, run.out)

The presets of the book map to recipes in `recipes/`:

    tiny    recipes/tiny-*.yaml    the shipped miniatures, 8 fine-tuning steps (the test suite's size)
    cpu     recipes/mini-*.yaml    the shipped miniatures, 100 fine-tuning steps, one recipe per paper table
    paper   every recipe of scale "paper": real LLaVA-1.5-7B and Qwen2.5-VL-3B, one per paper table

A notebook's `RECIPES` parameter (comma-separated recipe files) replaces the preset's list; the scale of each
file must match the preset (`paper` runs real checkpoints only, `tiny` and `cpu` miniatures only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import chain
from .recipes import Recipe, load_recipe

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
PRESET_GLOBS = {"tiny": "tiny-*.yaml", "cpu": "mini-*.yaml", "paper": "*.yaml"}
PRESET_SCALES = {"tiny": "tiny", "cpu": "tiny", "paper": "paper"}


@dataclass(frozen=True)
class Run:
    recipe: Recipe
    out: Path                  # the chain's folder: RUNS_DIR/<recipe name>
    todo: tuple[str, ...]      # the steps not finished yet, in order


def recipe_files(preset: str, recipes: str | Sequence[str] = "", folder: str | Path | None = None) -> list[Path]:
    """The recipe files a notebook runs: `recipes` (comma-separated, or a list) if given, else the preset's
    shipped recipes (PRESET_GLOBS; at `paper` those of scale "paper")."""
    if preset not in PRESET_GLOBS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESET_GLOBS)}")
    given = [p.strip() for p in recipes.split(",")] if isinstance(recipes, str) else list(recipes)
    given = [p for p in given if p]
    if given:
        missing = [p for p in given if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"RECIPES: no recipe file {missing[0]}")
        return [Path(p) for p in given]
    folder = Path(folder) if folder else RECIPE_DIR
    files = sorted(folder.glob(PRESET_GLOBS[preset]))
    if preset == "paper":
        files = [p for p in files if load_recipe(p, check_paths=False).scale == "paper"]
    if not files:
        raise FileNotFoundError(f"no recipes for preset {preset} ({PRESET_GLOBS[preset]}) in {folder}")
    return files


def check_runs(files: Sequence[str | Path], runs_dir: str | Path, preset: str | None = None) -> list[Run]:
    """Every recipe loaded and checked before any work: its fields (RecipeError, one line), its scale against
    `preset`, one chain folder per recipe name under `runs_dir`, a folder made by another recipe refused, and,
    for each chain with steps left, what those steps need (`chain.preflight`: the model, the prepared data, a
    GPU at the paper's scale). A chain whose steps are all finished needs none of these (its results are
    read as they are)."""
    runs, names = [], {}
    for f in files:
        recipe = load_recipe(f, check_paths=False)
        if preset is not None and recipe.scale != PRESET_SCALES[preset]:
            raise ValueError(f"{f}: a recipe of scale {recipe.scale!r} cannot run at preset {preset!r} "
                             f"(it runs recipes of scale {PRESET_SCALES[preset]!r})")
        if recipe.name in names:
            raise ValueError(f"{f} and {names[recipe.name]} share the name {recipe.name!r} (one chain folder each)")
        names[recipe.name] = f
        out = Path(runs_dir).resolve() / recipe.name
        todo = tuple(s for s in chain.STEPS if not chain.is_done(out, s, recipe))
        if todo:
            recipe = load_recipe(f)                     # now the paths too: the model, the data folder
            chain.preflight(recipe, todo)
        runs.append(Run(recipe, out, todo))
    return runs
