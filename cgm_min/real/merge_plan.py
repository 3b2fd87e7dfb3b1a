"""The cgm-merge plan of a real LLaVA-1.5-7B / Qwen2.5-VL-3B merge, from names and shapes only.

    from cgm_min.real.merge_plan import real_merge_plan
    plan = real_merge_plan("llava-1.5-7b", "scratch")          # what `cgm-merge --dry-run` prints
    print(plan["describe"]); plan["bytes_read"], plan["peak_memory"]

No weights are needed: `fabricate` writes checkpoint folders whose safetensors files hold the real headers
(names, dtypes, shapes, offsets of every tensor) and no data. Each file is extended to its full size as a
sparse file (`os.truncate`), so it takes no disk space and reads as zeros; the plan opens headers only and
never reads a tensor. The folders are what the user's files look like:

    pre-trained / fine-tuned   config.json (the published one), model-0000k-of-0000n.safetensors (shards of
                               at most 5 GB, filled in state-dict order as save_pretrained fills them), the
                               index file; in either key layout
    h_pt / h_ft                the curvature files `io.curvature_files.write_curvature` writes for the merge
                               set: float32, the model's stored names, one shard per model shard that holds
                               a merged tensor, with the model shard's file name, and an index
                               (`curvature_layout`, checked against write_curvature on the miniatures)

`real_merge_plan` then runs `io.merge_checkpoints.plan_merge`, the function `cgm-merge --dry-run` runs, on
them: layouts mapped, the paper's merge set resolved, curvature coverage and shapes checked, bytes to
read and write and peak memory estimated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..io.layouts import MergeSet
from ..io.reader import DTYPES, numel
from ..io.writer import build_header, index_json
from .architectures import config_text, get_real, merge_set_names, tensor_specs

SHARD_BYTES = 5_000_000_000         # transformers 4.x save_pretrained / push_to_hub default max_shard_size
INDEX_NAME = "model.safetensors.index.json"

Specs = Mapping[str, tuple[str, tuple[int, ...]]]


def _nbytes(code: str, shape: Sequence[int]) -> int:
    return numel(shape) * DTYPES[code][1]


def shard_layout(specs: Specs, max_bytes: int = SHARD_BYTES) -> dict[str, str]:
    """{stored name: shard file name}: tensors in order, a new shard when the next tensor would take the
    current one over `max_bytes` (a tensor larger than that gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, (code, shape) in specs.items():
        n = _nbytes(code, shape)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    total = len(groups)
    return {name: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, g in enumerate(groups) for name in g}


def curvature_layout(specs: Specs, shard_of: Mapping[str, str] | None, merged: Sequence[str]
                     ) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """{file name: [(stored name, "F32", shape), ...]} of the curvature files of the tensors `merged`
    (stored names) for a model with tensors `specs` in shards `shard_of` (None: one model.safetensors):
    the model's order, float32, each tensor in the file named like its model shard."""
    chosen = set(merged)
    unknown = chosen - set(specs)
    if unknown:
        raise ValueError(f"curvature for {len(unknown)} tensors the model does not have, e.g. {sorted(unknown)[0]!r}")
    out: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for name, (_, shape) in specs.items():
        if name in chosen:
            out.setdefault(shard_of[name] if shard_of else "model.safetensors", []).append((name, "F32", tuple(shape)))
    return out


def write_headers(folder: Path, files: Mapping[str, Sequence[tuple[str, str, Sequence[int]]]],
                  sharded: bool, metadata: Mapping[str, str] | None = None) -> int:
    """Write safetensors files `files` ({file name: entries}) into `folder`, each a real header followed by
    a hole as large as its tensor data (a sparse file), plus an index file when `sharded`. Returns the
    bytes of tensor data described."""
    folder.mkdir(parents=True, exist_ok=True)
    total, weight_map = 0, {}
    for fname, entries in files.items():
        head, offsets = build_header(entries, metadata)
        size = max((end for _, end in offsets.values()), default=0)
        path = folder / fname
        with open(path, "wb") as f:
            f.write(head)
        os.truncate(path, len(head) + size)
        total += size
        weight_map.update({name: fname for name, _, _ in entries})
    if sharded:
        (folder / INDEX_NAME).write_text(index_json(weight_map, total))
    return total


def fabricate(name: str, root: str | os.PathLike, layouts: Mapping[str, str] | None = None,
              curvature: bool = True, last_layers: int | None = None) -> dict[str, Path]:
    """Header-only checkpoint folders of the real model `name` under `root`: pre_trained, fine_tuned (each
    in its key layout, default both "original"), and, with `curvature`, h_pt and h_ft covering the
    merge set in the fine-tuned model's layout. Returns {role: folder}."""
    layouts = {"pre_trained": "original", "fine_tuned": "original", **(layouts or {})}
    root = Path(root)
    out: dict[str, Path] = {}
    for role in ("pre_trained", "fine_tuned"):
        specs = tensor_specs(name, layouts[role])
        shard_of = shard_layout(specs)
        files: dict[str, list] = {}
        for n, (code, shape) in specs.items():
            files.setdefault(shard_of[n], []).append((n, code, shape))
        folder = root / role
        write_headers(folder, files, sharded=True, metadata={"format": "pt"})
        (folder / "config.json").write_text(config_text(name))
        out[role] = folder
    if curvature:
        specs = tensor_specs(name, layouts["fine_tuned"])
        merged = merge_set_names(name, layouts["fine_tuned"], last_layers)
        files = curvature_layout(specs, shard_layout(specs), merged)
        for role in ("h_pt", "h_ft"):
            meta = {"kind": json.dumps(role), "estimator": json.dumps("empirical_fisher")}
            write_headers(root / role, files, sharded=True, metadata=meta)
            out[role] = root / role
    return out


def real_merge_plan(name: str, root: str | os.PathLike, method: str = "cgm", parameters: Mapping | None = None,
                    layouts: Mapping[str, str] | None = None, last_layers: int | None = None) -> dict:
    """The cgm-merge plan of merging the real model `name` with `method`, computed by plan_merge on
    header-only folders written under `root` (see `fabricate`). Returns a summary:

    describe (the dry run's text), tensors, merged_tensors, merged_parameters, bytes_read, bytes_written,
    curvature_bytes (h_pt + h_ft of the merge set), peak_memory (bytes, plan_merge's estimate), shards
    (output shard files), layouts (of each input)."""
    from ..io.merge_checkpoints import parse_config, plan_merge
    m = get_real(name)
    paths = fabricate(name, root, layouts, curvature=True, last_layers=last_layers)
    params = dict(parameters) if parameters is not None else ({"alpha_normalised": 1.0} if method == "cgm" else {})
    data = {"pre_trained": str(paths["pre_trained"]), "fine_tuned": str(paths["fine_tuned"]), "method": method,
            "parameters": params, "merge_set": MergeSet(preset=m.preset, last_layers=last_layers).as_dict(),
            "curvature": {"pre_trained": str(paths["h_pt"]), "fine_tuned": str(paths["h_ft"])}}
    plan = plan_merge(parse_config(data, root))
    try:
        merged = plan.merged
        return {
            "describe": plan.describe(),
            "tensors": len(plan.tensors),
            "merged_tensors": len(merged),
            "merged_names": [t.name for t in merged],
            "merged_parameters": sum(t.ft.numel for t in merged),
            "bytes_read": plan.bytes_read,
            "bytes_written": plan.bytes_written,
            "curvature_bytes": sum(t.h_pt.nbytes + t.h_ft.nbytes for t in merged if t.h_pt is not None),
            "peak_memory": plan.peak_memory_estimate(),
            "shards": list(plan.shards),
            "layouts": dict(plan.layouts),
        }
    finally:
        plan.close()
