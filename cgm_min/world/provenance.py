"""Provenance of the shipped miniature checkpoints: a manifest that says exactly how each was made, and the
checks that the shipped files are what the pre-training script makes.

    cgm-provenance ship --run RUN_DIR --dest checkpoints/mini-llava-1.5 --command "..."
    cgm-provenance verify checkpoints/mini-llava-1.5

`manifest.json` holds: the exact command, seed and configuration, library versions, a hash of the data the
run saw (held-out sets and the first training batches), the per-task held-out scores (strict and relaxed),
the first recorded losses, the wall time, and the SHA-256 of every shipped file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from . import tasks as mt
from . import training as tr
from ..report import file_sha256 as sha256

MANIFEST = "manifest.json"
FIRST_STEPS = 20                    # losses that CI reproduces by re-running the script's first steps
SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "processor_config.json", "chat_template.jinja", "special_tokens_map.json", "preprocessor_config.json")


def data_hash(cfg: tr.PretrainConfig, n_batches: int = FIRST_STEPS) -> str:
    """SHA-256 over the held-out evaluation sets and the first training batches of a run's configuration."""
    h = hashlib.sha256()
    for task, samples in mt.eval_set(cfg.tasks, "heldout", cfg.eval_n, cfg.world_seed).items():
        for s in samples:
            h.update(s.content_bytes() + b"\x01" + s.answer.encode())
    for step in range(n_batches):
        for s in tr.train_batch(cfg.tasks, step, cfg.batch_size, cfg.seed, "pretrain", cfg.task_weights,
                                cfg.world_seed):
            h.update(s.content_bytes() + b"\x01" + s.answer.encode())
    return h.hexdigest()


def config_from_log(log: dict) -> tr.PretrainConfig:
    cfg = dict(log["config"])
    for key in ("tasks", "task_weights", "betas"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    return tr.PretrainConfig(**cfg)


def ship(run: Path, dest: Path, command: str, code_commit: str | None = None) -> Path:
    """Copy a finished pre-training run into `dest` with its manifest. Refuses an unfinished run and an
    existing `dest`; writes into a temporary folder and renames it, so `dest` is never half written."""
    run, dest = Path(run), Path(dest)
    log_path = run / "log.json"
    if not log_path.is_file() or not (run / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run} is not a finished pre-training run (log.json and model.safetensors needed)")
    if dest.exists():
        raise FileExistsError(f"{dest} exists; remove it first to ship a new checkpoint")
    log = json.loads(log_path.read_text())
    cfg = config_from_log(log)
    if log.get("stop_after") is not None or len(log["losses"]) != cfg.steps or not log["evals"]:
        raise ValueError(f"{run}: the run did not complete its {cfg.steps} steps with a final evaluation")
    final = log["evals"][-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        stage = Path(tmp) / dest.name
        stage.mkdir()
        files = {}
        for name in SHIPPED:
            if (run / name).is_file():
                shutil.copy2(run / name, stage / name)
                files[name] = {"sha256": sha256(stage / name), "bytes": (stage / name).stat().st_size}
        curves = {"losses_every_10": log["losses"][::10], "evals": [
            {"step": e["step"], "pre_avg_exact": e["pre_avg_exact"], "min_exact": e["min_exact"],
             "scores": e["scores"]} for e in log["evals"]]}
        (stage / "curves.json").write_text(json.dumps(curves))
        manifest = {
            "family": cfg.family, "command": command, "code_commit": code_commit, "seed": cfg.seed,
            "config": log["config"],
            "versions": log["versions"], "n_params": log["n_params"], "data_sha256": data_hash(cfg),
            "heldout_n_per_task": cfg.eval_n, "heldout_scores": final["scores"],
            "pre_avg_exact": final["pre_avg_exact"], "min_exact": final["min_exact"],
            "first_losses": log["losses"][:FIRST_STEPS], "wall_time_s": log["time_s"],
            "step_time_s": log["step_time_s"], "threads": cfg.threads, "files": files,
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        stage.rename(dest)
    return dest


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {ckpt}")
    return json.loads(path.read_text())


def check_files(ckpt: Path) -> list[str]:
    """Files whose SHA-256 differs from the manifest (or that are missing)."""
    ckpt = Path(ckpt)
    return [name for name, rec in read_manifest(ckpt)["files"].items()
            if not (ckpt / name).is_file() or sha256(ckpt / name) != rec["sha256"]]


def rerun_first_losses(ckpt: Path, n: int = FIRST_STEPS) -> list[float]:
    """The first `n` losses of the pre-training script run afresh with the manifest's configuration."""
    cfg = config_from_log({"config": read_manifest(ckpt)["config"]})
    cfg.eval_every = 0
    _, _, log = tr.pretrain(cfg, out=None, stop_after=n, progress=False)
    return log["losses"]
