"""The paper's two real backbones, LLaVA-1.5-7B and Qwen2.5-VL-3B, without their weights.

    from cgm_min.real.architectures import REAL_MODELS, meta_model, parameter_counts, tensor_specs
    net = meta_model("llava-1.5-7b")                 # LlavaForConditionalGeneration on the meta device
    parameter_counts("qwen2.5-vl-3b")["merge_set"]   # parameters the paper fine-tunes and merges
    tensor_specs("llava-1.5-7b", "original")         # {stored name: (dtype code, shape)}, hub order

The published `config.json` of each model ships in `cgm_min/data/real_configs/` (sources in its README).
The installed transformers builds the model from it on the meta device (no memory, no weights, no
download), so parameter names, shapes and counts are those of the real model as this transformers version
defines it. Everything the paper preset decides from names and shapes alone is computed here and checked
in tests/test_real_arch.py: parameter counts against the published sizes, the merge set the paper
fine-tunes (resolved by `cgm_min.io.layouts.MergeSet`, the code cgm-merge uses), both key layouts of a
LLaVA / Qwen2.5-VL checkpoint, and (in `cgm_min.real.merge_plan`) the curvature files and the cgm-merge plan.

Key layouts. transformers keeps the checkpoints' *original* names on disk (what the hub files and a default
`save_pretrained` hold) and renames them when loading to the *in-memory* names `named_parameters()`
returns. `tensor_specs(name, "original")` applies transformers' own reverse conversion
(`core_model_loading.revert_weight_conversion` with the conversions `from_pretrained` attaches, what
`save_pretrained` applies to a loaded model), not the project's `layouts.py` table, so the tests check one
against the other. (A model built from a config and saved without that record drops the prefix changes:
the miniatures store LLaVA's CLIP tower as `vision_tower.*`, the hub as `vision_tower.vision_model.*`.)
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Mapping

import torch

from ..io.layouts import PRESETS, MergeSet, canonical_names, layer_of
from ..io.reader import numel as _numel

LAYOUTS = ("original", "in-memory")


@dataclass(frozen=True)
class RealModel:
    name: str               # the project's name for it
    hub_id: str             # where a user gets the weights
    config_file: str        # in cgm_min/data/real_configs/
    family: str             # cgm_min.world.models family: "llava" or "qwen"
    preset: str             # cgm_min.io.layouts preset: the paper's merge set
    vision_prefix: str      # in-memory prefix of the vision tower (the projector / merger excluded)
    paper: str              # the fine-tuning the paper reports for it

    @property
    def model_type(self) -> str:
        return PRESETS[self.preset].model_type

    @property
    def projector_prefix(self) -> str:
        return PRESETS[self.preset].projector

    @property
    def last_layers(self) -> int:
        return PRESETS[self.preset].last_layers


REAL_MODELS: dict[str, RealModel] = {
    "llava-1.5-7b": RealModel(
        "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf.json", "llava", "llava-1.5",
        "model.vision_tower.",
        "last 12 of 32 decoder layers + projector; 1 epoch, lr 1e-4, global batch 64"),
    "qwen2.5-vl-3b": RealModel(
        "qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-3b-instruct.json", "qwen", "qwen2.5-vl",
        "model.visual.",
        "last 6 of 36 decoder layers + merger; 3 epochs, lr 1e-5, global batch 64"),
}


def get_real(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; choose one of {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def config_text(name: str) -> str:
    """The shipped config.json, byte for byte as published."""
    return resources.files("cgm_min").joinpath("data", "real_configs", get_real(name).config_file).read_text(
        encoding="utf-8")


def config_dict(name: str) -> dict:
    return json.loads(config_text(name))


def real_config(name: str):
    """The transformers config object of the shipped config.json."""
    from transformers import AutoConfig
    d = config_dict(name)
    return AutoConfig.for_model(**d)


def stored_dtype(name: str) -> torch.dtype:
    """The dtype the published weights are stored in (config.json's torch_dtype)."""
    return getattr(torch, config_dict(name)["torch_dtype"])


@contextlib.contextmanager
def hub_offline():
    """Hub requests refused inside the block (HF_HUB_OFFLINE=1), restored after; importing this module
    changes nothing. huggingface_hub reads the variable once, when it is imported, so its constant (what
    transformers asks through `is_offline_mode`) is set for the block too."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def meta_model(name: str, layout: str | None = None):
    """The transformers model of `name` on the meta device, in the published dtype (no weights, no memory).

    Its parameters always carry the in-memory names; `layout` ("original" / "in-memory") is only checked:
    `tensor_specs(name, layout)` gives the names a checkpoint in that layout stores."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    import transformers
    with hub_offline():                     # built from the shipped config: nothing is fetched
        cfg = real_config(name)
        cls = getattr(transformers, cfg.architectures[0])
        with torch.device("meta"):
            net = cls(cfg)
    return net.to(stored_dtype(name))


@functools.lru_cache(maxsize=None)
def _specs(name: str) -> tuple[tuple[tuple[str, str, tuple[int, ...]], ...], tuple[tuple[str, str], ...]]:
    """((in-memory name, dtype code, shape) of every stored tensor, in state-dict order),
    ((in-memory name, original name), ...). Tied tensors are stored once (as save_pretrained does)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion
    from ..io.reader import dtype_code
    net = meta_model(name)
    seen: set[int] = set()
    specs = []
    sd = net.state_dict(keep_vars=True)     # Parameters themselves: a tied pair is one object
    for key, t in sd.items():
        if id(t) in seen:                   # a tied weight (Qwen2.5-VL-3B: lm_head = embed_tokens)
            continue
        seen.add(id(t))
        specs.append((key, dtype_code(t.dtype), tuple(t.shape)))
    kept = {k: sd[k] for k, _, _ in specs}
    # What from_pretrained attaches to a model it loaded (prefix changes included: LLaVA's CLIP tower is
    # stored as vision_tower.vision_model.*), so the reverse gives the names of the hub's files.
    net._weight_conversions = get_model_conversion_mapping(net, add_legacy=False)
    reverted = revert_weight_conversion(net, kept)      # {original name: the same tensor}
    by_id = {id(t): k for k, t in reverted.items()}
    renamed = {k: by_id[id(t)] for k, t in kept.items()}
    if len(reverted) != len(kept) or len(set(renamed.values())) != len(kept):
        raise RuntimeError(f"{name}: transformers' reverse key conversion is not one-to-one")
    return tuple(specs), tuple(renamed.items())


def tensor_specs(name: str, layout: str = "original") -> dict[str, tuple[str, tuple[int, ...]]]:
    """{stored name: (safetensors dtype code, shape)} of the checkpoint `name` in `layout`, in the order
    the model's state dict lists them; tied tensors once."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    specs, renamed = _specs(name)
    orig = dict(renamed)
    return {(orig[k] if layout == "original" else k): (code, shape) for k, code, shape in specs}


def in_memory_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """{in-memory name: shape} of every stored tensor."""
    return {k: shape for k, (_, shape) in tensor_specs(name, "in-memory").items()}


def merge_set_names(name: str, layout: str = "in-memory", last_layers: int | None = None) -> list[str]:
    """The paper's merge set of `name`, as cgm-merge resolves it (`MergeSet(preset).resolve`) from the
    names of a checkpoint in `layout`; returned as that checkpoint's stored names."""
    m = get_real(name)
    stored = list(tensor_specs(name, layout))
    canonical = canonical_names(m.model_type, stored, name)          # {in-memory: stored}
    chosen = MergeSet(preset=m.preset, last_layers=last_layers).resolve(m.model_type, list(canonical))
    return [canonical[c] for c in chosen]


def parameter_counts(name: str) -> dict[str, int]:
    """Parameter counts of `name`, computed from the meta model's tensors (tied tensors once):

    total, language_model (embeddings, decoder layers, final norm, untied lm_head), vision_tower (without
    the projector / merger), projector (LLaVA's multi_modal_projector, Qwen2.5-VL's visual.merger),
    decoder_layer (one decoder layer), n_decoder_layers, merge_set (the paper's: last K layers + projector),
    merge_set_tensors, tensors (stored tensors)."""
    m = get_real(name)
    shapes = in_memory_shapes(name)
    counts = {"total": 0, "language_model": 0, "vision_tower": 0, "projector": 0}
    for k, shape in shapes.items():
        n = _numel(shape)
        counts["total"] += n
        if k.startswith(m.projector_prefix):
            counts["projector"] += n
        elif k.startswith(m.vision_prefix):
            counts["vision_tower"] += n
        else:
            counts["language_model"] += n
    layers = [layer_of(k) for k in shapes]
    counts["n_decoder_layers"] = max(i for i in layers if i is not None) + 1
    counts["decoder_layer"] = sum(_numel(s) for k, s in shapes.items() if layer_of(k) == 0)
    merged = merge_set_names(name, "in-memory")
    counts["merge_set"] = sum(_numel(shapes[k]) for k in merged)
    counts["merge_set_tensors"] = len(merged)
    counts["tensors"] = len(shapes)
    return counts


def bytes_of(specs: Mapping[str, tuple[str, tuple[int, ...]]], names=None) -> int:
    """Bytes the tensors `names` (default: all) of `specs` take in their stored dtypes."""
    from ..io.reader import DTYPES
    names = specs if names is None else names
    return sum(_numel(specs[n][1]) * DTYPES[specs[n][0]][1] for n in names)
