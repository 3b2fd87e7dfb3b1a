"""Build the miniature tasks as local data sets that lmms-eval reads, with one lmms-eval task YAML per task.

    python data_scripts/build_mini_data.py --out build/mini_data --n-heldout 200

Every sample comes from `cgm_min.world.tasks` (the same generator the training code uses), so the data on
disk and the samples in memory are the same images, questions and answers; the scores come from
`evaluate.scores.exact_match` / `evaluate.scores.relaxed_match` (imported by the generated utils.py). Nothing is
downloaded.

Layout of the output directory (pass it to lmms-eval as `--include_path`):

    manifest.json                 parameters, per-file SHA-256 and per-split content hashes
    utils.py                      doc_to_visual, doc_to_text, process_results (shared by all tasks)
    mini_<task>.yaml              one lmms-eval task per miniature task (test split: heldout)
    mini_general.yaml             group over the general tasks (Pre-Avg), mini_targets.yaml over the targets
    data/<task>/<split>.parquet   columns: doc_id, index, task, split, question, answer, image (PNG)

The `data_files` paths in the YAMLs are relative to the YAML's directory; lmms-eval (0.7.3) resolves them
against it, so the tasks work from any working directory, on the command line or in-process.

The build is deterministic (the same arguments give byte-identical files) and atomic: it is written to a
temporary sibling directory and renamed into place. An existing directory is left alone when it already
holds exactly this build, and is replaced only with --force when it holds anything else.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

try:
    from cgm_min.world import tasks as mt  # noqa: E402
except ImportError:      # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cgm_min.world import tasks as mt  # noqa: E402
from cgm_min.report import file_sha256, replace_dir  # noqa: E402

FORMAT_VERSION = 1
TASK_PREFIX = "mini_"
GROUPS = {"mini_general": mt.GENERAL, "mini_targets": mt.TARGETS}
# Generation budget per task: room for the longest answer in a real LLaMA / Qwen tokenizer and several
# tokens beyond it, so that a model that does not stop after its answer loses the strict score.
DEFAULT_MAX_NEW_TOKENS = 8
MAX_NEW_TOKENS = {"caption": 24}
METRICS = ("exact_match", "relaxed_match")

UTILS_PY = '''\
"""lmms-eval hooks for the miniature tasks (written by data_scripts/build_mini_data.py; do not edit).

The prompt is the task's question as-is (the model adapter applies the family's chat template, exactly as
in training), and the scores are cgm_min.world.tasks' own: exact_match (strict: the generated text equals
the answer) and relaxed_match (the generated text starts with the answer).
"""
from cgm_min.evaluate.scores import exact_match, relaxed_match


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    pred = results[0] if results else ""
    return {"exact_match": exact_match(pred, doc["answer"]), "relaxed_match": relaxed_match(pred, doc["answer"])}
'''


def lmms_task_name(task: str) -> str:
    return TASK_PREFIX + task


def max_new_tokens(task: str) -> int:
    return MAX_NEW_TOKENS.get(task, DEFAULT_MAX_NEW_TOKENS)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(samples: Sequence[mt.Sample], path: Path) -> str:
    """Write one split as parquet (image column: datasets.Image, PNG bytes); return its content hash."""
    import datasets
    features = datasets.Features({
        "doc_id": datasets.Value("int32"), "index": datasets.Value("int32"), "task": datasets.Value("string"),
        "split": datasets.Value("string"), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "image": datasets.Image()})
    h = hashlib.sha256()
    for s in samples:     # what the samples are, independent of the parquet encoding
        h.update(s.content_bytes() + b"\x00" + s.answer.encode() + b"\x01")
    ds = datasets.Dataset.from_dict({
        "doc_id": list(range(len(samples))), "index": [s.index for s in samples], "task": [s.task for s in samples],
        "split": [s.split for s in samples], "question": [s.question for s in samples],
        "answer": [s.answer for s in samples], "image": [{"bytes": _png(s.image), "path": None} for s in samples]},
        features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds.to_parquet(str(path))
    finally:
        if bars:
            datasets.enable_progress_bars()
    return h.hexdigest()


def _yaml_str(s: str) -> str:
    return json.dumps(s)          # a JSON string is a valid YAML double-quoted scalar


def task_yaml(task: str, splits: Sequence[str]) -> str:
    t = mt.get_task(task)
    files = "\n".join(f"    {s}: data/{task}/{s}.parquet" for s in splits)
    metrics = "\n".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in METRICS)
    return f"""\
# Miniature task {task!r} ({t.kind}; stands for {t.stands_for}).
# Written by data_scripts/build_mini_data.py; do not edit.
task: {lmms_task_name(task)}
dataset_path: parquet
dataset_kwargs:
  data_files:
{files}
test_split: heldout
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens(task)}
  do_sample: false
  temperature: 0
  until: []
process_results: !function utils.process_results
metric_list:
{metrics}
metadata:
  version: {FORMAT_VERSION}.0
  kind: {t.kind}
  stands_for: {_yaml_str(t.stands_for)}
"""


def group_yaml(group: str, tasks: Sequence[str]) -> str:
    listed = "\n".join(f"  - {lmms_task_name(t)}" for t in tasks)
    metrics = "\n".join(f"  - metric: {m}\n    aggregation: mean\n    weight_by_size: false" for m in METRICS)
    return f"""\
# Unweighted mean over the tasks below (for mini_general: the paper's Pre-Avg).
# Written by data_scripts/build_mini_data.py; do not edit.
group: {group}
task:
{listed}
aggregate_metric_list:
{metrics}
metadata:
  version: {FORMAT_VERSION}.0
"""


def _build_into(root: Path, params: dict) -> dict:
    """Write everything into `root` (an empty directory); return the manifest."""
    splits = [s for s in mt.SPLITS if params["n"].get(s, 0) > 0]
    tasks = params["tasks"]
    manifest = {"format": FORMAT_VERSION, "params": params, "tasks": {}, "groups": {}, "files": {}}
    for task in tasks:
        entry = {"lmms_task": lmms_task_name(task), "kind": mt.get_task(task).kind,
                 "max_new_tokens": max_new_tokens(task), "splits": {}}
        for split in splits:
            n = params["n"][split]
            samples = mt.make_samples(task, split, n, world_seed=params["world_seed"])
            rel = f"data/{task}/{split}.parquet"
            entry["splits"][split] = {"n": n, "file": rel, "content_sha256": _write_split(samples, root / rel)}
        (root / f"{lmms_task_name(task)}.yaml").write_text(task_yaml(task, splits))
        manifest["tasks"][task] = entry
    for group, members in GROUPS.items():
        members = [t for t in members if t in tasks]
        if members:
            (root / f"{group}.yaml").write_text(group_yaml(group, members))
            manifest["groups"][group] = members
    (root / "utils.py").write_text(UTILS_PY)
    manifest["files"] = {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _existing_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and "files" in m and "params" in m else None


def _differences(old: dict | None, new: dict) -> list[str]:
    if old is None:
        return ["it has no manifest.json written by this script (not a miniature-data build)"]
    diffs = [f"params.{k}: {old['params'].get(k)!r} -> {v!r}" for k, v in new["params"].items()
             if old["params"].get(k) != v]
    changed = sorted(set(old["files"]) ^ set(new["files"]) |
                     {f for f in set(old["files"]) & set(new["files"]) if old["files"][f] != new["files"][f]})
    if changed:
        diffs.append(f"{len(changed)} file(s) differ, e.g. {changed[:3]}")
    return diffs


def build(out: str | os.PathLike, n_heldout: int = 200, n_calibration: int = 64, n_train: int = 0,
          tasks: Sequence[str] | None = None, world_seed: int = 0, force: bool = False, verbose: bool = True) -> Path:
    """Build the data sets + YAMLs into `out` (see the module docstring). Returns the directory.

    Leaves `out` untouched when it already holds exactly this build; refuses (FileExistsError) to replace a
    directory holding anything else unless `force`.
    """
    out = Path(out).absolute()
    tasks = list(mt.TASKS) if tasks is None else list(dict.fromkeys(mt.get_task(t).name for t in tasks))
    if n_heldout < 1:
        raise ValueError("n_heldout must be at least 1 (lmms-eval evaluates the heldout split)")
    if min(n_calibration, n_train) < 0:
        raise ValueError("split sizes must be >= 0")
    params = {"n": {"train": int(n_train), "calibration": int(n_calibration), "heldout": int(n_heldout)},
              "tasks": tasks, "world_seed": int(world_seed), "format": FORMAT_VERSION}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)          # mkdtemp makes it private; the result is an ordinary build directory
    try:
        manifest = _build_into(tmp, params)
        if out.exists():
            old = _existing_manifest(out)
            if old is not None and old["files"] == manifest["files"] and old["params"] == params:
                if verbose:
                    print(f"{out}: up to date ({len(tasks)} tasks)")
                shutil.rmtree(tmp)
                return out
            empty = out.is_dir() and not any(out.iterdir())
            if not (force or empty):
                raise FileExistsError(
                    f"{out} exists and does not hold this build: " + "; ".join(_differences(old, manifest))
                    + ". Pass --force (force=True) to replace it.")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        sizes = ", ".join(f"{s} {n}" for s, n in params["n"].items() if n)
        print(f"{out}: {len(tasks)} tasks ({sizes} samples each), groups {list(manifest['groups'])}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/mini_data", help="output directory (lmms-eval --include_path)")
    ap.add_argument("--n-heldout", type=int, default=200, help="held-out samples per task (the evaluation set)")
    ap.add_argument("--n-calibration", type=int, default=64, help="calibration samples per task (0: none)")
    ap.add_argument("--n-train", type=int, default=0, help="training samples per task (0: none)")
    ap.add_argument("--tasks", default=",".join(mt.TASKS), help="comma-separated miniature tasks (default: all)")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing directory that holds another build")
    a = ap.parse_args(argv)
    try:
        build(a.out, a.n_heldout, a.n_calibration, a.n_train, a.tasks.split(","), a.world_seed, a.force)
    except (FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
