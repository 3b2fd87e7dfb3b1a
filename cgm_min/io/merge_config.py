"""The cgm-merge config: a small YAML file, read and checked here (`load_config`, `parse_config`).

    pre_trained: checkpoints/mini-llava-1.5     # folder, .safetensors file, or a hub id in your HF cache
    fine_tuned: runs/llava-corners
    curvature: {pre_trained: runs/h_pt, fine_tuned: runs/h_ft}   # for cgm, cgm_dagger, fisher_merging
    method: cgm                                 # a data-free method of cgm_min.merge.METHODS
    parameters: {alpha_normalised: 1.0}         # the method's hyperparameters; alpha or alpha_normalised
    merge_set: {preset: llava-1.5, last_layers: 2}   # or {patterns: ["model.language_model.layers.3.*"]}
    dtype: auto                                 # auto (the fine-tuned model's dtype), bfloat16, float16, float32

Every field is checked before anything is opened: unknown keys, wrong types, an unknown or data-needing
method, unknown, missing or out-of-range hyperparameters (the registry's own `MergeMethod.check`), a preset
or pattern list that cannot be used. A key given twice, YAML that does not parse, a binary or huge file, are
one-line ValueErrors too. Relative paths are relative to the config file's folder; `resolve_input` finds a
path, or a hub id in the local Hugging Face cache (never downloaded).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..merge import METHODS, Range
from .layouts import PRESETS, MergeSet

CONFIG_KEYS = ("pre_trained", "fine_tuned", "curvature", "method", "parameters", "merge_set", "dtype")
OUT_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class MergeConfig:
    pre_trained: str
    fine_tuned: str
    method: str
    merge_set: MergeSet
    parameters: Mapping[str, Any] = field(default_factory=dict)
    curvature_pt: str | None = None
    curvature_ft: str | None = None
    dtype: str = "auto"
    base_dir: Path = Path(".")
    source: Path | None = None          # the config file, when read from one
    text: str = ""                      # its text as given

    def as_dict(self) -> dict:
        """The config as a plain mapping (what the YAML file says, defaults filled in)."""
        d: dict[str, Any] = {"pre_trained": self.pre_trained, "fine_tuned": self.fine_tuned}
        if self.curvature_pt or self.curvature_ft:
            d["curvature"] = {"pre_trained": self.curvature_pt, "fine_tuned": self.curvature_ft}
        d["method"] = self.method
        d["parameters"] = dict(self.parameters)
        d["merge_set"] = self.merge_set.as_dict()
        d["dtype"] = self.dtype
        return d


def _fail(msg: str):
    raise ValueError(f"config: {msg}")


def _str(value, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(f"{key} must be a non-empty string, got {value!r}")
    return value


def _mapping(value, key: str, allowed: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        _fail(f"{key} must be a mapping, got {type(value).__name__}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        _fail(f"unknown key {unknown[0]!r} in {key}; allowed: {', '.join(allowed)}")
    return value


def data_free_methods() -> list[str]:
    """Registry methods that need nothing at merge time beyond the two models and their curvature."""
    return [n for n, m in METHODS.items() if m.level == "tensor" and m.needs <= {"curvature"}]


def parse_config(data: Any, base_dir: str | os.PathLike = ".", source: Path | None = None, text: str = ""
                 ) -> MergeConfig:
    """A MergeConfig from a parsed YAML mapping; every field checked (one-line ValueError)."""
    if not isinstance(data, dict):
        _fail(f"the top level must be a mapping of {', '.join(CONFIG_KEYS)}, got {type(data).__name__}")
    _mapping(data, "the config", CONFIG_KEYS)
    for key in ("pre_trained", "fine_tuned", "method", "merge_set"):
        if key not in data:
            _fail(f"missing {key}")
    method = _str(data["method"], "method")
    if method not in METHODS:
        _fail(f"unknown method {method!r}; data-free methods: {', '.join(data_free_methods())}")
    m = METHODS[method]
    if method not in data_free_methods():
        _fail(f"method {method} needs {', '.join(sorted(m.needs - {'curvature'})) or 'the whole model'} at merge "
              f"time; cgm-merge runs the data-free methods: {', '.join(data_free_methods())}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        _fail(f"parameters must be a mapping of hyperparameter names to values, got {params!r}")
    params = dict(params)
    for k, v in params.items():
        if isinstance(v, (dict, list)):
            _fail(f"parameters.{k} must be a number or true/false, got {v!r}")
    if "alpha_normalised" in params:
        if "alpha" not in m.ranges:
            _fail(f"alpha_normalised is for methods with an alpha; {method} takes {list(m.ranges) or 'nothing'}")
        if "alpha" in params:
            _fail("give alpha or alpha_normalised, not both")
        Range(0.0).check(method, "alpha_normalised", params["alpha_normalised"])
        m.check({**{k: v for k, v in params.items() if k != "alpha_normalised"}, "alpha": 0.0})
    else:
        m.check(params)
    curv = data.get("curvature")
    c_pt = c_ft = None
    if curv is not None:
        _mapping(curv, "curvature", ("pre_trained", "fine_tuned"))
        if set(curv) != {"pre_trained", "fine_tuned"}:
            _fail("curvature needs both pre_trained (h_pt) and fine_tuned (h_ft)")
        c_pt = _str(curv["pre_trained"], "curvature.pre_trained")
        c_ft = _str(curv["fine_tuned"], "curvature.fine_tuned")
    if m.uses_curvature and c_pt is None:
        _fail(f"method {method} uses curvature: give curvature.pre_trained and curvature.fine_tuned")
    ms = _mapping(data["merge_set"], "merge_set", ("preset", "last_layers", "patterns"))
    if ("preset" in ms) == ("patterns" in ms):
        _fail(f"merge_set needs a preset ({', '.join(PRESETS)}) or a list of patterns, not both")
    if "preset" in ms:
        preset = _str(ms["preset"], "merge_set.preset")
        if preset not in PRESETS:
            _fail(f"unknown merge_set preset {preset!r}; presets: {', '.join(PRESETS)}")
        k = ms.get("last_layers")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            _fail(f"merge_set.last_layers must be an integer >= 0, got {k!r}")
        merge_set = MergeSet(preset=preset, last_layers=k)
    else:
        if "last_layers" in ms:
            _fail("merge_set.last_layers goes with a preset")
        pats = ms["patterns"]
        if isinstance(pats, str):
            pats = [pats]
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
            _fail(f"merge_set.patterns must be a non-empty list of glob patterns, got {pats!r}")
        merge_set = MergeSet(patterns=tuple(pats))
    dtype = data.get("dtype", "auto")
    if not isinstance(dtype, str) or dtype not in OUT_DTYPES:
        _fail(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    return MergeConfig(_str(data["pre_trained"], "pre_trained"), _str(data["fine_tuned"], "fine_tuned"), method,
                       merge_set, params, c_pt, c_ft, dtype, Path(base_dir), source, text)


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice (PyYAML keeps the last one silently)."""

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml, Loader


def read_yaml(path: str | os.PathLike, kind: str = "config") -> tuple[Any, str]:
    """(data, text) of a small YAML file (a merge config, a recipe), every kind of bad file one line:
    missing, a folder, over 1 MiB, not UTF-8, invalid or too deeply nested YAML, a duplicate key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {kind} file {path}")
    if not path.is_file():
        raise IsADirectoryError(f"{kind} {path} is not a file")
    raw = path.read_bytes()
    if len(raw) > 1 << 20:
        raise ValueError(f"{path}: a {kind} of {len(raw)} bytes is too large (limit 1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (not UTF-8)") from None
    yaml, Loader = _yaml_loader()
    try:
        return yaml.load(text, Loader=Loader), text
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).split("\n")[0]
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"{path}: invalid YAML: nested too deeply") from None


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and check a YAML config file (one-line errors for every kind of bad file)."""
    path = Path(path)
    data, text = read_yaml(path, "config")
    try:
        return parse_config(data, path.parent, path, text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    except RecursionError:
        raise ValueError(f"{path}: config nested too deeply") from None


def resolve_input(ref: str, base_dir: Path, what: str) -> Path:
    """A local path (absolute, or relative to the config's folder), else a hub id found in the local
    Hugging Face cache (never downloaded)."""
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if p.exists():
        return p
    if HUB_ID.fullmatch(ref):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:                       # not in the cache (or no huggingface_hub): say so below
            pass
        raise FileNotFoundError(f"{what}: {ref} is neither a path nor a model in the local Hugging Face cache "
                                f"(nothing is downloaded; fetch it first, e.g. `hf download {ref}`)")
    raise FileNotFoundError(f"{what}: no such file or folder: {p}")
