"""Curvature files in the model's own shard layout, so that a merge streams weights and curvature side by
side.

    write_curvature(h, "runs/llava-ft", "runs/h_ft", {"kind": "h_ft", "samples": 64, ...})

writes, for a model stored as `model.safetensors`, one `model.safetensors` of float32 curvature; for a model
sharded as `model-0000k-of-0000n.safetensors` + index, a shard of the same file name for every model shard
that holds a curvature tensor, and an index. Tensor names are the model's stored names (either key layout;
the dict may use in-memory names), tensors come in the model's order, and every shard carries the metadata
(JSON-encoded values, as `world.training.save_curvature` writes them, so `load_curvature` reads a single
file): kind (h_pt / h_ft), estimator, samples, tasks, and the model's hash: `model_sha256`, the SHA-256 of
the lines "<file name> <sha256 of the file>" of its weight files, and `model_files`, those hashes.
NaN, Inf or negative curvature is refused, and the folder is written atomically (AtomicOutputDir).

`measure_curvature` measures the empirical Fisher of a LLaVA / Qwen2.5-VL checkpoint's merge set on the
project's calibration tasks (`world.training.calibration_fisher`); `cgm-merge curvature` is its CLI.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .layouts import canonical_name, canonical_names
from .outdir import AtomicOutputDir
from .reader import Checkpoint
from .writer import sha256_file, write_tensors


def model_hash(ckpt: Checkpoint, cache: bool = False) -> tuple[str, dict[str, str]]:
    """(one SHA-256 for the model's weights, {file name: SHA-256} of its weight files). `cache`: through
    cgm-merge's hash cache (`merge_checkpoints.cached_sha256`), so a merge of this model reads the files
    for their hashes no second time."""
    paths = ckpt.weight_files()
    if cache:
        from .merge_checkpoints import cached_sha256
        digests = cached_sha256(paths)
    else:
        digests = [sha256_file(p) for p in paths]
    files = {p.name: h for p, h in zip(paths, digests)}
    text = "".join(f"{name} {h}\n" for name, h in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest(), files


class _Float32(Mapping):
    """{stored name: curvature as contiguous float32}, checked, converted when looked up."""

    def __init__(self, curv: Mapping[str, torch.Tensor], key_of: Mapping[str, str]):
        self.curv, self.key_of = curv, dict(key_of)

    def __getitem__(self, stored: str) -> torch.Tensor:
        h = self.curv[self.key_of[stored]].detach()
        if not torch.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"curvature of {stored} has NaN, Inf or negative entries")
        return h.to(torch.float32).contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_of)

    def __len__(self) -> int:
        return len(self.key_of)


def write_curvature(curv: Mapping[str, torch.Tensor], model: str | os.PathLike, out_dir: str | os.PathLike,
                    meta: Mapping[str, object] | None = None, overwrite: bool = False,
                    hash_cache: bool = False) -> Path:
    """Write the curvature dict `curv` ({name: tensor}, in-memory or stored names) into the folder `out_dir`
    in the shard layout of the checkpoint at `model`. Tensors are fetched from `curv` one at a time.
    `hash_cache`: hash the model's files through cgm-merge's hash cache (see `model_hash`)."""
    from .merge_checkpoints import read_model_config
    model = Path(model)
    with Checkpoint(model, "model") as ck:
        folder = model if model.is_dir() else model.parent
        model_type = (read_model_config(folder) or {}).get("model_type")
        stored_of = canonical_names(model_type, ck.names, "model")
        key_of: dict[str, str] = {}
        for key in curv:
            stored = stored_of.get(canonical_name(model_type, key))
            if stored is None:
                raise ValueError(f"curvature names {key!r}, which is not a tensor of the model at {model}")
            key_of[stored] = key
        order = [n for n in ck.names if n in key_of]            # the model's order
        for n in order:
            if tuple(curv[key_of[n]].shape) != ck.info(n).shape:
                raise ValueError(f"curvature of {n} has shape {list(curv[key_of[n]].shape)}, the model's tensor "
                                 f"{list(ck.info(n).shape)}")
        digest, files = model_hash(ck, hash_cache)
        header = {**(meta or {}), "model_sha256": digest, "model_files": files}
        metadata = {k: json.dumps(v) for k, v in header.items()}
        shard_of = {n: ck.info(n).file.name for n in order} if ck.sharded else None
        with AtomicOutputDir(out_dir, overwrite) as out:
            write_tensors(out, _Float32(curv, {n: key_of[n] for n in order}), shard_of, metadata)
    return Path(out_dir)


def read_curvature_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a curvature file or folder, JSON values decoded."""
    with Checkpoint(path, "curvature") as ck:
        out = {}
        for k, v in ck.metadata.items():
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
        return out


def measure_curvature(model: str | os.PathLike, tasks: Sequence[str], n_per_task: int, n_layers: int | None = None,
                      progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(h, metadata): the empirical Fisher diagonal of the merge set of the checkpoint at `model` (the last
    `n_layers` decoder layers + projector; default half) on `n_per_task` calibration samples of each task."""
    from ..world import models as mm
    from ..world import tasks as mt
    from ..world import training as tr
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    tasks = tuple(mt.get_task(t).name for t in tasks)
    net, processor = mm.load_family(model)
    h = tr.calibration_fisher(net, processor, tasks, n_per_task, n_layers, progress=progress)
    general = tasks == tuple(mt.GENERAL)
    meta = {"kind": "h_pt" if general else "h_ft", "estimator": "empirical_fisher",
            "samples": n_per_task * len(tasks), "n_per_task": n_per_task, "tasks": list(tasks),
            "n_layers": n_layers if n_layers is not None else mm.n_text_layers(net) // 2}
    return h, meta
