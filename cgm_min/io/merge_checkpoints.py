"""Merge real checkpoints by streaming: the Python API under `cgm-merge`.

    from cgm_min.io.merge_checkpoints import load_config, plan_merge, merge_checkpoints
    plan = plan_merge(load_config("merge.yaml"))      # reads headers only; every check that needs no tensor
    print(plan.describe())                            # what `cgm-merge --dry-run` prints
    plan.close()
    record = merge_checkpoints("merge.yaml", "merged/")   # writes, verifies; returns cgm_merge.json's content

The config (YAML, or the same mapping in Python; relative paths are relative to the config file's folder):

    pre_trained: checkpoints/mini-llava-1.5     # folder, .safetensors file, or a hub id in your HF cache
    fine_tuned: runs/llava-corners
    curvature:                                  # for methods that use curvature (cgm, cgm_dagger, fisher_merging)
      pre_trained: runs/h_pt                    # folder in the model's shard layout, or one .safetensors file
      fine_tuned: runs/h_ft
    method: cgm                                 # any data-free method of cgm_min.merge.METHODS
    parameters: {alpha_normalised: 1.0}         # the method's hyperparameters; alpha or alpha_normalised
    merge_set: {preset: llava-1.5, last_layers: 2}   # or {patterns: ["model.language_model.layers.3.*"]}
    dtype: auto                                 # output dtype: auto (the fine-tuned model's), bfloat16, ...

How a merge runs (one tensor at a time; never a whole model or curvature dict in memory):
  1. `plan_merge` opens every header (reader.Checkpoint), maps both key layouts to in-memory names
     (layouts.py), resolves the merge set, and refuses before writing anything: different tensor names,
     shapes or dtypes between the models, curvature that does not cover the merge set or has the wrong
     shape, unknown methods or hyperparameters, values out of range, patterns that match nothing, an
     existing output folder, too little free disk space.
  2. For `alpha_normalised`, alpha = alpha_norm * sum(h_ft) / sum(h_pt) is computed first, over the merge
     set, by cgm.total_curvature as cgm.alpha_from_normalised computes it (the curvature is read one tensor
     at a time through a lazy mapping), so alpha equals the in-memory one bit for bit.
  3. The output mirrors the fine-tuned model's shards (same file names, same tensor order, its index
     file): each shard's header is written first, then every tensor (streaming.ShardStreamer). CGM and
     linear stream each tensor in blocks through the chunked kernels of chunked.py (bit-identical to the
     registry), an IO thread reading the next block and writing the previous one while the main thread
     computes; every other method gets the whole tensor, read into reused buffers, and the registry's own
     function, called with the in-memory name (so seeded methods draw what they draw in memory).
     Tensors outside the merge set are copied byte for byte. Math is float32 (float64 for float64
     weights), weights are cast before w_pt - w_ft, and results are stored in the fine-tuned model's dtype
     (then cast when `dtype` asks for another).
  4. Into a hidden folder beside OUT_DIR (outdir.AtomicOutputDir): the shards, the index, the fine-tuned
     model's config, tokenizer, processor, chat template and generation config (missing ones from the
     pre-trained folder), a README.md model card; the staged folder is verified (`verify_output`), then
     cgm_merge.json (config, versions, SHA-256 of every input and output file, per-tensor statistics,
     the verification) is added and the folder is renamed to OUT_DIR.
SHA-256 hashes of the weight shards are computed as they are written, other hashes by a background thread
while the merge runs; input hashes are remembered across runs (`Hasher`; `cached_sha256` is the same cache
for other callers, e.g. `write_curvature(hash_cache=True)` in the reproduction chain, so the chain reads each
model's weights once for their hashes). The output is deterministic: the same config gives the same bytes in every file (no
time is recorded, and paths only as the config gives them).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .. import cgm
from ..merge import MergeMethod, get_method
from .chunked import CHUNK
from .layouts import canonical_names, layout_of
from .merge_config import OUT_DTYPES, MergeConfig, load_config, parse_config, resolve_input  # noqa: F401 (the API)
from .outdir import AtomicOutputDir
from .reader import DTYPES, Buffer, Checkpoint, dtype_code, find_weights, read_range
from .streaming import CHUNKED, ShardStreamer, TensorPlan
from .writer import ShardWriter, index_json, sha256_fd

# Files of a model folder that are not carried into the output: weights (written anew), the model card
# (written anew), this tool's record, and the project's provenance manifest (it hashes the input's weights).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$")
NOT_CARRIED = {"README.md", "cgm_merge.json", "manifest.json"}
# What the pre-trained folder may supply when the fine-tuned one lacks it: configuration, tokenizer, processor,
# chat template and generation config (not training logs or other files that describe the base run).
FROM_BASE = re.compile(r"config\.json|generation_config\.json|tokenizer.*|.*tokens.*\.json|vocab.*|merges\.txt|"
                       r".*processor_config\.json|chat_template.*|.*\.model|.*\.tiktoken")
# Throughput anchors of the streaming merge on the project's 2-vCPU machine class (bytes moved per second),
# for the dry run's estimate only.
WARM_BYTES_PER_S, COLD_BYTES_PER_S, START_S = 2.3e9, 0.8e9, 4.0


class VerificationError(ValueError):
    """The written output does not match the fine-tuned model (names, shapes, dtypes, bytes, loading)."""


# ----------------------------------------------------------------------------------------------
# The plan: everything decided before a tensor is read.

def read_model_config(folder: Path) -> dict | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{cfg} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg} is not a JSON object")
    return data


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    hyperparameters: dict
    paths: dict[str, Path]
    pt: Checkpoint
    ft: Checkpoint
    h_pt: Checkpoint | None
    h_ft: Checkpoint | None
    model_type: str | None
    layouts: dict[str, str]
    tensors: list[TensorPlan]
    shards: dict[str, list[TensorPlan]]
    index_name: str | None
    carried: dict[str, Path]
    notes: list[str]

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.merged]

    @property
    def bytes_read(self) -> int:
        return sum(t.bytes_read for t in self.tensors)

    @property
    def bytes_written(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)

    @property
    def alpha_normalised(self) -> float | None:
        return self.config.parameters.get("alpha_normalised")

    @property
    def chunked(self) -> bool:
        return self.method.name in CHUNKED

    def buffer_bytes(self) -> dict[str, int]:
        """Bytes of the reused buffers the merge allocates: two sets of BLOCK entries per input for CGM and
        linear, else the largest tensor each input holds; casts need the largest cast tensor."""
        merged = self.merged
        cast = [t for t in self.tensors if not t.merged and t.out_dtype != t.ft.dtype]
        if self.chunked:
            b = {"blocks": ShardStreamer.block_bytes(self.method.name, merged)}
            whole: list[TensorPlan] = []
        else:
            b, whole = {}, merged
        b["pre_trained"] = max((t.pt.nbytes for t in whole), default=0)
        b["fine_tuned"] = max((t.ft.nbytes for t in whole + cast), default=0)
        b["output"] = max((t.out_nbytes for t in whole + cast), default=0)
        if self.h_pt is not None:
            b["h_pt"] = max((t.h_pt.nbytes for t in whole), default=0)
            b["h_ft"] = max((t.h_ft.nbytes for t in whole), default=0)
        return b

    def peak_memory_estimate(self) -> int:
        base = 450 << 20                               # python + torch + transformers, measured
        scratch = 12 * CHUNK * 8
        work = 0 if self.chunked else 6 * max((t.ft.numel for t in self.merged), default=0) * 4
        if self.alpha_normalised is not None:          # total_curvature's float64 copy of the largest tensor
            work = max(work, 8 * max((t.ft.numel for t in self.merged), default=0) + max(
                t.h_pt.nbytes for t in self.merged))
        return base + scratch + sum(self.buffer_bytes().values()) + work

    def describe(self) -> str:
        """The dry run's report: inputs, method, merge set, bytes, estimated time and peak memory."""
        c, gb = self.config, 1e9
        hp = dict(self.hyperparameters)
        if self.alpha_normalised is not None:
            hp["alpha"] = f"{self.alpha_normalised:g} x sum(h_ft)/sum(h_pt) (computed when merging)"
        lines = [f"method      {self.method.name}: {self.method.reference}",
                 f"            {', '.join(f'{k} = {v}' for k, v in hp.items()) or 'no hyperparameters'}"]
        for role, ck in (("pre_trained", self.pt), ("fine_tuned", self.ft), ("h_pt", self.h_pt), ("h_ft", self.h_ft)):
            if ck is not None:
                lines.append(f"{role:<11} {ck.path} ({len(ck)} tensors in {len(ck.files)} file(s), "
                             f"{self.layouts[role]} key layout)")
        merged = self.merged
        params = sum(t.ft.numel for t in merged)
        lines.append(f"merge set   {c.merge_set.describe()}: {len(merged)} of {len(self.tensors)} tensors, "
                     f"{params:,} parameters")
        for t in merged:
            lines.append(f"  merge  {t.name}  {t.ft.dtype}{list(t.ft.shape)}")
        lines.append(f"copied      {len(self.tensors) - len(merged)} tensors unchanged from fine_tuned")
        w = self.bytes_written
        verify = 2 * sum(t.ft.nbytes for t in self.tensors if not t.merged)
        moved = self.bytes_read + w
        warm = START_S + (moved + verify) / WARM_BYTES_PER_S
        cold = START_S + (moved + verify) / COLD_BYTES_PER_S
        if self.alpha_normalised is not None:
            extra = sum(t.h_pt.nbytes + t.h_ft.nbytes for t in merged)
            lines.append(f"alpha       one extra pass over the curvature ({extra / gb:.2f} GB) for the sums")
            warm, cold = warm + extra / WARM_BYTES_PER_S, cold + extra / COLD_BYTES_PER_S
        lines += [f"read        {self.bytes_read / gb:.2f} GB (+ {verify / 2 / gb:.2f} GB again to verify)",
                  f"write       {w / gb:.2f} GB in {len(self.shards)} shard(s): {', '.join(self.shards)}"
                  + (f" + {self.index_name}" if self.index_name else ""),
                  f"carried     {', '.join(self.carried) or 'nothing'}",
                  f"estimate    about {warm:.0f} s with inputs in the page cache, {cold:.0f} s cold "
                  f"(2-vCPU anchors); peak memory about {self.peak_memory_estimate() / gb:.2f} GB"]
        lines += [f"note        {n}" for n in self.notes]
        return "\n".join(lines)

    def close(self) -> None:
        for ck in (self.pt, self.ft, self.h_pt, self.h_ft):
            if ck is not None:
                ck.close()


def _model_folder(path: Path) -> Path:
    """The folder of a checkpoint given as a folder, an index file or a weights file."""
    return path if path.is_dir() else path.parent


def _is_model_folder(path: Path) -> bool:
    """Whether the files beside `path` belong to its model: a folder, its index file or model.safetensors
    (not an arbitrary .safetensors file in a folder of other things)."""
    return path.is_dir() or path.name.endswith(".index.json") or path.name == "model.safetensors"


def _inside(a: Path, b: Path) -> bool:
    """a equals b or lies inside it (real paths)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents


def _check_output_location(out_dir: Path, inputs: Mapping[str, Path], overwrite: bool, need: int) -> None:
    out = Path(os.path.abspath(out_dir))
    for role, p in inputs.items():
        folder = _model_folder(p) if _is_model_folder(p) else p
        if _inside(out, folder) or _inside(folder, out) or _inside(p, out):
            raise ValueError(f"output folder {out} overlaps the {role} input {p}; choose another output folder")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output folder")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise OSError(28, f"not enough free space for {out}: the merge writes {need / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB are free")


def _carried_files(ft_folder: Path | None, pt_folder: Path | None, skip: set[str]) -> dict[str, Path]:
    """Config, tokenizer, processor, chat template, generation config...: the fine-tuned folder's
    non-weight files, and those of the pre-trained folder's (FROM_BASE) that the fine-tuned one lacks."""
    out: dict[str, Path] = {}
    for folder in (ft_folder, pt_folder):
        if folder is None:
            continue
        for p in sorted(folder.iterdir()):
            if (p.is_file() and not p.name.startswith(".") and p.name not in NOT_CARRIED
                    and not WEIGHT_FILE.fullmatch(p.name) and p.name not in skip and p.name not in out
                    and (folder == ft_folder or FROM_BASE.fullmatch(p.name))):
                out[p.name] = p
    return out


def plan_merge(config: MergeConfig, out_dir: str | os.PathLike | None = None, overwrite: bool = False
               ) -> MergePlan:
    """Open every header and decide the whole merge; raises a one-line error for any bad input. The
    returned plan holds open read-only files: close() it (merge_checkpoints does)."""
    method = get_method(config.method)
    paths = {"pre_trained": resolve_input(config.pre_trained, config.base_dir, "pre_trained"),
             "fine_tuned": resolve_input(config.fine_tuned, config.base_dir, "fine_tuned")}
    notes: list[str] = []
    if config.curvature_pt and method.uses_curvature:
        paths["h_pt"] = resolve_input(config.curvature_pt, config.base_dir, "curvature.pre_trained")
        paths["h_ft"] = resolve_input(config.curvature_ft, config.base_dir, "curvature.fine_tuned")
    elif config.curvature_pt:
        notes.append(f"the curvature files are not read: {method.name} does not use curvature")
    opened: list[Checkpoint] = []
    try:
        pt = Checkpoint(paths["pre_trained"], "pre_trained")
        opened.append(pt)
        ft = Checkpoint(paths["fine_tuned"], "fine_tuned")
        opened.append(ft)
        cfg_ft, cfg_pt = (read_model_config(_model_folder(paths[r])) if _is_model_folder(paths[r]) else None
                          for r in ("fine_tuned", "pre_trained"))
        mt_ft = (cfg_ft or {}).get("model_type")
        mt_pt = (cfg_pt or {}).get("model_type")
        if mt_ft and mt_pt and mt_ft != mt_pt:
            raise ValueError(f"pre_trained is a {mt_pt} model but fine_tuned is a {mt_ft} model")
        model_type = mt_ft or mt_pt
        if model_type is None:
            notes.append("no config.json: tensor names are used as stored, and the output is not loaded "
                         "with transformers to verify it")
        c_pt = canonical_names(model_type, pt.names, "pre_trained")
        c_ft = canonical_names(model_type, ft.names, "fine_tuned")
        if set(c_pt) != set(c_ft):
            only_pt, only_ft = sorted(set(c_pt) - set(c_ft)), sorted(set(c_ft) - set(c_pt))
            raise ValueError(f"pre_trained and fine_tuned hold different tensors: {len(only_pt)} only in "
                             f"pre_trained {only_pt[:3]}, {len(only_ft)} only in fine_tuned {only_ft[:3]}")
        for c, n in c_ft.items():
            a, b = pt.info(c_pt[c]), ft.info(n)
            if a.shape != b.shape:
                raise ValueError(f"{c}: shape {list(a.shape)} in pre_trained but {list(b.shape)} in fine_tuned "
                                 "(are these the same architecture?)")
            if a.dtype != b.dtype:
                raise ValueError(f"{c}: dtype {a.dtype} in pre_trained but {b.dtype} in fine_tuned; save both "
                                 "in one dtype")
        canonical = list(c_ft)
        merged = set(config.merge_set.resolve(model_type, canonical))
        if not merged:
            raise ValueError(f"merge_set: {config.merge_set.describe()} selects no tensor")
        for c in canonical:
            if c in merged and not ft.info(c_ft[c]).is_float:
                raise ValueError(f"merge_set: {c} is {ft.info(c_ft[c]).dtype}, not a floating-point tensor")
        h = {}
        if "h_pt" in paths:
            for role, label in (("h_pt", "curvature.pre_trained"), ("h_ft", "curvature.fine_tuned")):
                ck = Checkpoint(paths[role], label)
                opened.append(ck)
                names = canonical_names(model_type, ck.names, label)
                unknown = [n for n in names if n not in c_ft]
                if unknown:
                    raise ValueError(f"{label} names {len(unknown)} tensors that are not in the model, e.g. "
                                     f"{unknown[0]!r}")
                missing = [c for c in canonical if c in merged and c not in names]
                if missing:
                    raise ValueError(f"{label} does not cover the merge set: no curvature for {len(missing)} "
                                     f"merged tensors, e.g. {missing[0]!r}")
                for c in canonical:
                    if c in merged:
                        hi, wi = ck.info(names[c]), ft.info(c_ft[c])
                        if hi.shape != wi.shape:
                            raise ValueError(f"{label}: {c} has shape {list(hi.shape)} but the model's tensor "
                                             f"has {list(wi.shape)}")
                        if not hi.is_float:
                            raise ValueError(f"{label}: {c} is {hi.dtype}; curvature must be floating point")
                h[role] = (ck, names)
        out_dt = OUT_DTYPES[config.dtype]
        tensors: list[TensorPlan] = []
        shards: dict[str, list[TensorPlan]] = {}
        single_name = "model.safetensors"
        canonical_of = {n: c for c, n in c_ft.items()}
        for n, info in ft.infos.items():
            c = canonical_of[n]
            code = dtype_code(out_dt) if out_dt is not None and info.is_float else info.dtype
            tp = TensorPlan(n, c, c in merged, info, pt.info(c_pt[c]), code)
            if tp.merged and h:
                tp.h_pt = h["h_pt"][0].info(h["h_pt"][1][c])
                tp.h_ft = h["h_ft"][0].info(h["h_ft"][1][c])
            tensors.append(tp)
            shards.setdefault(info.file.name if ft.sharded else single_name, []).append(tp)
        hp = dict(config.parameters)
        if "alpha_normalised" in hp:
            hp.pop("alpha_normalised")
            hp = method.check({**hp, "alpha": 0.0})
            hp.pop("alpha")
        else:
            hp = method.check(hp)
        index_name = "model.safetensors.index.json" if ft.sharded else None
        ft_folder, pt_folder = (_model_folder(paths[r]) if _is_model_folder(paths[r]) else None
                                for r in ("fine_tuned", "pre_trained"))
        if ft_folder is None:
            notes.append("fine_tuned is a single weights file: the files beside it are not carried over (config, "
                         "tokenizer and processor come from pre_trained's folder where it has them)")
        carried = _carried_files(ft_folder, pt_folder, set(shards) | {index_name or ""})
        layouts = {"pre_trained": layout_of(model_type, pt.names), "fine_tuned": layout_of(model_type, ft.names)}
        for role in h:
            layouts[role] = layout_of(model_type, h[role][0].names)
        plan = MergePlan(config, method, hp, paths, pt, ft, h.get("h_pt", (None,))[0], h.get("h_ft", (None,))[0],
                         model_type, layouts, tensors, shards, index_name, carried, notes)
        if out_dir is not None:
            need = plan.bytes_written + sum(p.stat().st_size for p in carried.values()) + (1 << 20)
            _check_output_location(Path(out_dir), paths, overwrite, need)
        return plan
    except BaseException:
        for ck in opened:
            ck.close()
        raise


# ----------------------------------------------------------------------------------------------
# Merging one tensor.

class LazyTensors(Mapping):
    """A read-only mapping {canonical name: tensor} that reads each tensor when it is looked up (a view into
    the checkpoint's buffer, valid until the next lookup): lets whole-dict reference functions such as
    cgm.alpha_from_normalised run over files without holding them."""

    def __init__(self, ckpt: Checkpoint, names: Mapping[str, str]):
        self.ckpt, self.names = ckpt, dict(names)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.ckpt.read(self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# ----------------------------------------------------------------------------------------------
# Hashing in the background.

def hash_cache_path() -> Path | None:
    """Where input hashes are remembered: $CGM_MERGE_HASH_CACHE, default ~/.cache/cgm_min/sha256.json;
    "0" or "" turns the cache off."""
    value = os.environ.get("CGM_MERGE_HASH_CACHE", "~/.cache/cgm_min/sha256.json")
    return None if value in ("", "0") else Path(value).expanduser()


class Hasher:
    """SHA-256 of files on one background thread (hashlib and preadv release the GIL), so hashing runs on
    the second core while the merge computes.

    Hashes of input files are remembered across runs (`hash_cache_path()`), keyed by the file's real path
    and validated by its size, mtime (ns), inode and device, as git validates its index: merging the same
    checkpoints again (an alpha sweep, a benchmark) does not re-read 15 GB to hash them. A file changed in
    any way that touches its mtime is hashed again."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.stop = threading.Event()
        self.jobs: dict[tuple, concurrent.futures.Future] = {}
        self.cache_path = hash_cache_path()
        self.cache = _read_hash_cache(self.cache_path)
        self.fresh: dict[str, list] = {}

    @staticmethod
    def _stamp(st: os.stat_result) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]

    def _hash(self, source):
        if self.stop.is_set():
            return None
        if isinstance(source, int):
            return sha256_fd(source, stop=self.stop)
        real = os.path.realpath(source)
        fd = os.open(real, os.O_RDONLY)
        try:
            stamp = self._stamp(os.fstat(fd))
            hit = self.cache.get(real)
            if isinstance(hit, list) and len(hit) == 5 and hit[:4] == stamp:
                return hit[4]
            digest = sha256_fd(fd, stop=self.stop)
            if digest is not None and self._stamp(os.fstat(fd)) == stamp:
                self.fresh[real] = stamp + [digest]
            return digest
        finally:
            os.close(fd)

    def add(self, key: tuple, source: Path | int, digest: str | None = None) -> None:
        """Hash `source` (a path or an open descriptor) as `key`; `digest`: its hash, already known."""
        if key in self.jobs:
            return
        if digest is not None:
            self.jobs[key] = concurrent.futures.Future()
            self.jobs[key].set_result(digest)
        else:
            self.jobs[key] = self.pool.submit(self._hash, source)

    def result(self, key: tuple) -> str:
        return self.jobs[key].result()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        if self.fresh and not cancel and self.cache_path is not None:
            _write_hash_cache(self.cache_path, {**_read_hash_cache(self.cache_path), **self.fresh})
            self.fresh = {}

    def digests(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """The SHA-256 of each input file, from the cache where its stamp still matches."""
        keys = [("in", os.path.realpath(p)) for p in paths]
        for key, p in zip(keys, paths):
            self.add(key, Path(p))
        return [self.result(key) for key in keys]


def _read_hash_cache(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_hash_cache(path: Path, cache: Mapping[str, list]) -> None:
    try:
        from ..report import atomic_write
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(cache)))
    except OSError:
        pass                         # a cache that cannot be written only costs time next run


def cached_sha256(paths: Sequence[str | os.PathLike]) -> list[str]:
    """SHA-256 of files through the merge's hash cache (`Hasher`): a file hashed here is not read again when
    it is merged (or hashed here) later, while its size, mtime, inode and device stay the same."""
    hasher = Hasher()
    done = False
    try:
        out = hasher.digests(paths)
        done = True
        return out
    finally:
        hasher.close(cancel=not done)


def hash_cache_moved(old: str | os.PathLike, new: str | os.PathLike) -> int:
    """After the folder `old` was renamed to `new`: its files' remembered hashes move to their new paths (a
    rename keeps each file's stamp, but the cache is keyed by path), each kept only where the file at the
    new path has the recorded stamp. Returns how many moved."""
    path = hash_cache_path()
    if path is None:
        return 0
    cache = _read_hash_cache(path)
    src, dst = os.path.realpath(old), os.path.realpath(new)
    matched = [k for k in cache if k.startswith(src + os.sep)]
    if not matched:
        return 0
    moved: dict[str, list] = {}
    for key in matched:
        entry = cache.pop(key)
        target = dst + key[len(src):]
        try:
            stamp = Hasher._stamp(os.stat(target))
        except OSError:
            continue
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stamp:
            moved[target] = entry
    _write_hash_cache(path, {**cache, **moved})
    return len(moved)


# ----------------------------------------------------------------------------------------------
# Verification of the written folder.

def _same_bytes(a: tuple, b: tuple, n: int, bufs: tuple[Buffer, Buffer], block: int = 32 << 20) -> bool:
    """Whether n bytes of two files are equal; a and b are (SafetensorsFile, offset) pairs (read around the
    page cache where the bytes are not in it)."""
    (fa, off_a), (fb, off_b) = a, b
    done = 0
    while done < n:
        k = min(block, n - done)
        ha = read_range(fa.fd, fa.dfd, bufs[0], off_a + done, k, str(fa.path))
        hb = read_range(fb.fd, fb.dfd, bufs[1], off_b + done, k, str(fb.path))
        if not torch.equal(bufs[0].data[ha:ha + k], bufs[1].data[hb:hb + k]):
            return False
        done += k
    return True


def transformers_load_check(folder: Path) -> dict:
    """Load `folder` the way a user would, on the meta device (no weights in memory): the model class of
    config.json's `architectures` and its config class read from the folder, and `from_pretrained(None,
    config=..., state_dict=..., device_map="meta", output_loading_info=True)` with a state dict of meta
    tensors whose names, shapes and dtypes the safetensors library reads from every weights file of the
    folder (its own header parser, not this package's). That is transformers' own key mapping, renaming and
    shape checks, as `from_pretrained(folder, device_map="meta")` runs them, without that call's reading of
    the tensor bytes through mmap (1.6 of 2.3 GB of a freshly written 1 B-parameter merge, about 1.5 s when
    they are not in the page cache; the bytes are checked by `verify_output` and the tests instead)."""
    cfg = read_model_config(folder) or {}
    archs = cfg.get("architectures") or []
    import transformers
    try:
        cls = getattr(transformers, archs[0]) if archs else None
    except AttributeError:
        cls = None
    if cls is None:
        return {"checked": False, "why": f"no transformers class for architectures {archs}"}
    from safetensors import safe_open
    from transformers.utils import logging as tlog
    state = {}
    index, files = find_weights(folder, "output")
    if index is not None:
        files = [folder / f for f in dict.fromkeys(sorted(json.loads(index.read_text())["weight_map"].values()))]
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                state[k] = torch.empty(sl.get_shape(), dtype=DTYPES[sl.get_dtype()][0], device="meta")
    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        config = (getattr(cls, "config_class", None) or transformers.AutoConfig).from_pretrained(str(folder))
        _, info = cls.from_pretrained(None, config=config, state_dict=state, device_map="meta",
                                      output_loading_info=True)
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
    return {"checked": True, "class": cls.__name__, "loaded": "from_pretrained on the meta device, tensor names, "
            "shapes and dtypes read by safetensors",
            **{k: sorted(map(str, info.get(k, ()))) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}}


def verify_output(folder: Path, plan: MergePlan) -> dict:
    """Check a written merge against the fine-tuned model: the same tensor names (and index), shapes and
    dtypes (the output dtype where one was asked for); every tensor outside the merge set byte-identical
    (equal after the cast when the dtype changed); and, with a config.json, a transformers load on the meta
    device with zero missing, unexpected and mismatched keys. Raises VerificationError."""
    out = Checkpoint(folder, "output")
    try:
        ft = plan.ft
        if set(out.names) != set(ft.names):
            extra, missing = sorted(set(out.names) - set(ft.names)), sorted(set(ft.names) - set(out.names))
            raise VerificationError(f"verification failed: output tensors differ from fine_tuned (missing "
                                    f"{missing[:3]}, unexpected {extra[:3]})")
        if out.sharded != ft.sharded or (ft.sharded and out.index["weight_map"] != ft.index["weight_map"]):
            raise VerificationError("verification failed: the output's shards differ from fine_tuned's")
        bufs = (Buffer(), Buffer())
        identical = 0
        for tp in plan.tensors:
            o = out.info(tp.name)
            if o.shape != tp.ft.shape or o.dtype != tp.out_dtype:
                raise VerificationError(f"verification failed: {tp.name} is {o.dtype}{list(o.shape)}, expected "
                                        f"{tp.out_dtype}{list(tp.ft.shape)}")
            if tp.merged:
                continue
            if tp.out_dtype == tp.ft.dtype:
                same = _same_bytes((out.file_of(tp.name), o.start), (ft.file_of(tp.name), tp.ft.start),
                                   o.nbytes, bufs)
            else:
                same = torch.equal(out.read(tp.name), ft.read(tp.name).to(DTYPES[tp.out_dtype][0]))
            if not same:
                raise VerificationError(f"verification failed: {tp.name} is outside the merge set but differs "
                                        "from fine_tuned")
            identical += 1
        report = {"tensors": len(plan.tensors), "merged": len(plan.merged), "unchanged_identical": identical,
                  "names_shapes_dtypes": "equal to fine_tuned"}
        if (folder / "config.json").is_file():
            tf = transformers_load_check(folder)
            report["transformers"] = tf
            if tf["checked"] and (tf["missing_keys"] or tf["unexpected_keys"] or tf["mismatched_keys"]):
                raise VerificationError(
                    f"verification failed: transformers {tf['class']} reports {len(tf['missing_keys'])} missing, "
                    f"{len(tf['unexpected_keys'])} unexpected, {len(tf['mismatched_keys'])} mismatched keys, e.g. "
                    f"{(tf['missing_keys'] + tf['unexpected_keys'] + tf['mismatched_keys'])[0]}")
        else:
            report["transformers"] = {"checked": False, "why": "no config.json"}
        return report
    finally:
        out.close()


# ----------------------------------------------------------------------------------------------
# The model card.

def model_card(plan: MergePlan, hp: Mapping, stats: Mapping[str, dict], record_alpha: dict | None) -> str:
    """README.md: YAML front matter (base_model, library_name, pipeline_tag, tags, merge_method and its
    parameters) and a table of the merge. Nothing in it depends on where the output is written."""
    import yaml
    c, m = plan.config, plan.method
    front: dict[str, Any] = {"base_model": c.pre_trained, "library_name": "transformers"}
    if plan.model_type in ("llava", "qwen2_5_vl"):
        front["pipeline_tag"] = "image-text-to-text"
    front["tags"] = ["merge", "cgm-merge", m.name] + ([plan.model_type] if plan.model_type else [])
    front["merge_method"] = m.name
    front["merge_parameters"] = {k: v for k, v in hp.items()}
    n = sum(s["n"] for s in stats.values())
    nd = sum(s["n_delta"] for s in stats.values())
    mean_lam = sum(s["mean_lam"] * s["n"] for s in stats.values()) / n if n else 0.0
    rev = sum(s["reverted"] for s in stats.values())
    rows = [("method", f"`{m.name}`: {m.reference}"), ("rule", m.rule),
            ("hyperparameters", ", ".join(f"{k} = {v}" for k, v in hp.items()) or "none")]
    if record_alpha:
        rows.append(("alpha", f"alpha_normalised {record_alpha['alpha_normalised']} x sum(h_ft) / sum(h_pt) = "
                              f"{record_alpha['alpha']}"))
    rows += [("pre-trained", f"`{c.pre_trained}`"), ("fine-tuned", f"`{c.fine_tuned}`"),
             ("merge set", f"{c.merge_set.describe()} ({len(stats)} tensors, {n:,} entries)"),
             ("mean lam", f"{mean_lam:.4f}"),
             ("fraction reverted", f"{rev / nd:.4f} of the entries where the models differ" if nd else "-"),
             ("tool", f"cgm_min {_version()} (`cgm-merge`)")]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    title = f"{Path(c.fine_tuned).name}, merged with {m.name}"
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n"
            f"A merge of a fine-tuned model with its pre-trained base, written by `cgm-merge` "
            f"(Curvature-Guided Mixing, arXiv:2606.24963).\n\n| | |\n|---|---|\n{table}\n\n"
            "Tensors outside the merge set are the fine-tuned model's, byte for byte. After writing, the folder "
            "was loaded with transformers on the meta device (zero missing, unexpected and mismatched keys) and "
            "compared with the fine-tuned model tensor by tensor. `cgm_merge.json` records the config, the "
            "SHA-256 of every input and output file, and the statistics of every merged tensor.\n")


def _version() -> str:
    from .. import __version__
    return __version__


# ----------------------------------------------------------------------------------------------
# The whole merge.

def _config_json_for(src: Path, out_dtype: str) -> str:
    """config.json with its dtype fields set to the output dtype (top level and sub-configs)."""
    cfg = json.loads(src.read_text())

    def fix(d):
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = out_dtype
        for v in d.values():
            if isinstance(v, dict):
                fix(v)
    fix(cfg)
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def merge_checkpoints(config: MergeConfig | str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                      progress: bool = True, threads: int = 1, log=print) -> dict:
    """Merge as `config` says into `out_dir` (atomically), verify the output, and return the record that
    is written to OUT_DIR/cgm_merge.json. Raises a one-line ValueError / OSError on bad input; then nothing
    is written and the inputs are untouched."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    plan = plan_merge(cfg, out_dir, overwrite)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    hasher = Hasher()
    done = False
    try:
        record = _run(plan, Path(out_dir), overwrite, progress, hasher, log)
        done = True
        return record
    finally:
        hasher.close(cancel=not done)          # a failed merge leaves no trace, not even in the hash cache
        torch.set_num_threads(old_threads)
        plan.close()


def _input_files(plan: MergePlan) -> dict[str, list[Path]]:
    files = {role: ck.weight_files() for role, ck in
             (("pre_trained", plan.pt), ("fine_tuned", plan.ft), ("h_pt", plan.h_pt), ("h_ft", plan.h_ft)) if ck}
    for name, src in plan.carried.items():
        role = "fine_tuned" if _model_folder(plan.paths["fine_tuned"]) == src.parent else "pre_trained"
        files[role].append(src)
    return files


def _import_model_class(folder: Path) -> None:
    """Import the transformers class that verification will load (seconds of import time), so that a
    background thread can do it while the merge computes."""
    try:
        archs = (read_model_config(folder) or {}).get("architectures") or []
        if archs:
            import transformers
            getattr(transformers, archs[0], None)
    except Exception:               # verification imports it again and reports what goes wrong
        pass


def _run(plan: MergePlan, out_dir: Path, overwrite: bool, progress: bool, hasher: Hasher, log) -> dict:
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    importer = threading.Thread(target=_import_model_class, args=(_model_folder(plan.paths["fine_tuned"]),),
                                daemon=True, name="import-transformers")
    importer.start()
    inputs = _input_files(plan)
    for role, files in inputs.items():
        for f in files:
            hasher.add(("in", str(Path(os.path.realpath(f)))), f)
    if plan.config.source is not None:
        hasher.add(("in", str(Path(os.path.realpath(plan.config.source)))), plan.config.source)
    hp, alpha_rec = dict(plan.hyperparameters), None
    merged = plan.merged
    if plan.alpha_normalised is not None:
        lp = LazyTensors(plan.h_pt, {t.canonical: t.h_pt.name for t in merged})
        lf = LazyTensors(plan.h_ft, {t.canonical: t.h_ft.name for t in merged})
        sum_pt, sum_ft = cgm.total_curvature(lp), cgm.total_curvature(lf)    # as alpha_from_normalised
        for ck in (plan.h_pt, plan.h_ft):
            ck.buffer = Buffer()                # whole-tensor reads are over: give the memory back
        if not (math.isfinite(sum_pt) and math.isfinite(sum_ft)):
            raise ValueError(f"alpha_normalised: the curvature contains NaN or Inf (sum over the merge set: h_pt "
                             f"{sum_pt:g}, h_ft {sum_ft:g})")
        if sum_pt <= 0:
            raise ValueError("alpha_normalised: h_pt sums to zero over the merge set; a normalised alpha needs "
                             "sum(h_pt) > 0")
        alpha = plan.alpha_normalised * (sum_ft / sum_pt)      # cgm.alpha_from_normalised's expression
        hp = plan.method.check({**hp, "alpha": alpha})
        alpha_rec = {"alpha_normalised": plan.alpha_normalised, "sum_h_pt": sum_pt, "sum_h_ft": sum_ft,
                     "alpha": alpha}
    stats: dict[str, dict] = {}
    total = plan.bytes_read + plan.bytes_written
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="cgm-merge", disable=not progress,
               dynamic_ncols=True, leave=False)

    def done(tp: TensorPlan, st: dict | None) -> None:
        if st is not None:
            frac = st["reverted"] / st["n_delta"] if st["n_delta"] else 0.0
            stats[tp.name] = {"canonical": tp.canonical, **st, "fraction_reverted": frac}
        bar.set_postfix_str(tp.name[-40:], refresh=False)
        bar.update(tp.bytes_read + tp.out_nbytes)

    streamer = ShardStreamer({"pt": plan.pt, "ft": plan.ft, "h_pt": plan.h_pt, "h_ft": plan.h_ft},
                             plan.method.name, hp)
    with AtomicOutputDir(out_dir, overwrite) as out:
        try:
            for shard, tps in plan.shards.items():
                fd = out.create(shard)
                entries = [(t.name, t.out_dtype, t.ft.shape) for t in tps]
                src = next(f for f in plan.ft.files if f.path == tps[0].ft.file)
                same = all(t.out_dtype == t.ft.dtype for t in tps) and [t.name for t in tps] == list(src.infos)
                with ShardWriter(fd, entries, src.metadata, header=src.header_bytes if same else None,
                                 name=shard) as w:
                    streamer.write_shard(w, tps, done)
                hasher.add(("out", shard), fd, w.sha256())
            streamer.close()
        except BaseException:
            streamer.close(cancel=True)
            raise
        bar.close()
        if plan.index_name:
            meta = {k: v for k, v in plan.ft.index.get("metadata", {}).items() if k != "total_size"}
            wm = {t.name: s for s, tps in plan.shards.items() for t in tps}
            wm = {n: wm[n] for n in plan.ft.index["weight_map"]}
            out.write_text(plan.index_name, index_json(wm, plan.bytes_written, meta))
        for name, src in plan.carried.items():
            if name == "config.json" and plan.config.dtype != "auto":
                out.write_text(name, _config_json_for(src, plan.config.dtype))
            else:
                out.copy_file(name, src)
        card = model_card(plan, hp, stats, alpha_rec)
        out.write_text("README.md", card)
        staging = out.stage()
        importer.join()
        verification = verify_output(staging, plan)
        for name in out.names:
            if ("out", name) not in hasher.jobs:
                hasher.add(("out", name), out.fd(name))
        record = _record(plan, hp, alpha_rec, stats, verification, inputs, hasher, out.names)
        out.write_text("cgm_merge.json", json.dumps(record, indent=1) + "\n")
        out.stage()
    log(f"merged {len(stats)} of {len(plan.tensors)} tensors with {plan.method.name} into {out_dir} in "
        f"{time.perf_counter() - t0:.1f} s; verified (transformers: "
        f"{'zero missing/unexpected keys' if verification['transformers'].get('checked') else 'not checked'})")
    return record


def _record(plan: MergePlan, hp: Mapping, alpha_rec: dict | None, stats: Mapping[str, dict], verification: dict,
            inputs: Mapping[str, list[Path]], hasher: Hasher, out_names: Sequence[str]) -> dict:
    from importlib.metadata import version
    cfg = plan.config

    def files(role: str, paths: Sequence[Path]) -> dict:
        root = _model_folder(plan.paths[role]) if role in plan.paths else None
        res = {}
        for p in paths:
            key = p.name if root is None or p.parent != root else os.path.relpath(p, root)
            res[key] = {"sha256": hasher.result(("in", str(Path(os.path.realpath(p))))), "bytes": p.stat().st_size}
        return res

    rec: dict[str, Any] = {
        "tool": "cgm-merge", "cgm_min_version": _version(), "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
        "config": cfg.as_dict(), "config_text": cfg.text or None,
        "method": {"name": plan.method.name, "reference": plan.method.reference, "rule": plan.method.rule},
        "hyperparameters": dict(hp), "alpha": alpha_rec,
        "model_type": plan.model_type, "key_layouts": plan.layouts,
        "merge_set": {"rule": cfg.merge_set.describe(), "tensors": [t.canonical for t in plan.merged]},
        "inputs": {role: {"path": {"pre_trained": cfg.pre_trained, "fine_tuned": cfg.fine_tuned,
                                   "h_pt": cfg.curvature_pt, "h_ft": cfg.curvature_ft}[role],
                          "files": files(role, paths)} for role, paths in inputs.items()},
        "curvature_metadata": {role: ck.metadata for role, ck in (("h_pt", plan.h_pt), ("h_ft", plan.h_ft)) if ck},
        "outputs": {name: {"sha256": hasher.result(("out", name))} for name in out_names},
        "tensors": dict(stats),
        "verification": verification,
        "notes": plan.notes,
    }
    if cfg.source is not None:
        rec["config_sha256"] = hasher.result(("in", str(Path(os.path.realpath(cfg.source)))))
    return rec
