"""Tensor-name layouts of LLaVA-1.5 and Qwen2.5-VL checkpoints, and the merge set by preset or pattern.

The same model is stored under two sets of names. transformers renamed the LLaVA and Qwen2.5-VL modules
(the language model moved under `model.`), and checkpoints exist in both layouts: the hub's
llava-hf/llava-1.5-7b-hf and Qwen/Qwen2.5-VL-3B-Instruct, and anything `save_pretrained` writes by default,
use the *original* names; `save_pretrained(..., save_original_format=False)` (and some transformers 4.5x
saves) write the *in-memory* names that `model.named_parameters()` returns:

    family      original (on disk)                         in-memory (canonical here)
    LLaVA       language_model.model.layers.N.*            model.language_model.layers.N.*
                language_model.lm_head.weight              lm_head.weight
                vision_tower.vision_model.* (hub),         model.vision_tower.*
                vision_tower.* (saved from a config)
                multi_modal_projector.*                    model.multi_modal_projector.*
    Qwen2.5-VL  model.layers.N.*, model.embed_tokens.*     model.language_model.layers.N.*, ...
                visual.*                                   model.visual.*

transformers 5 also drops the CLIP tower's `vision_model.` level when it loads LLaVA (the hub and 4.x
in-memory names `model.vision_tower.vision_model.*` carry it); every form maps to the same canonical name
(checked against transformers' own reverse conversion on the real LLaVA-1.5-7B, tests/test_real_arch.py).
Every name is mapped to its in-memory (canonical) form before two checkpoints or a curvature file are
matched, so a pre-trained model, a fine-tuned model and curvature files may each come in either layout;
the output keeps the fine-tuned model's own names. Other model types (a plain Llama, say) keep their names.

The merge set is given by a preset or by patterns, both on canonical names:

    preset llava-1.5    the last 12 decoder layers + the projector (the paper, LLaVA-1.5-7B: 12 of 32)
    preset qwen2.5-vl   the last 6 decoder layers + the merger (the paper, Qwen2.5-VL-3B: 6 of 36)
    last_layers: K      overrides the number of layers. A model with fewer decoder layers than the preset
                        asks for is refused (a preset is never scaled silently): the 4-layer miniatures
                        are merged with `last_layers: 2`, the half they are fine-tuned on.
    patterns            shell-style globs (fnmatch, case-sensitive); each must match at least one tensor.

The layer and projector prefixes are those of `cgm_min.world.models` (LAYER_PREFIX, PROJECTOR_PREFIX), so a
preset selects exactly the tensors `merge_param_names(model, K)` names (tested on both miniatures).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

# The prefixes of cgm_min.world.models (LAYER_PREFIX, PROJECTOR_PREFIX by family), keyed here by config.json's
# model_type. Not imported from there: world.models imports the LLaVA and Qwen model and processor classes,
# about 3 s that every cgm-merge call would pay; a test checks that both places agree.
LAYER_PREFIX = "model.language_model.layers."
PROJECTOR_PREFIX = {"llava": "model.multi_modal_projector.", "qwen2_5_vl": "model.visual.merger."}

# (pattern on an original name, replacement) per model_type, applied first match only.
_RENAMES: dict[str, list[tuple[re.Pattern, str]]] = {
    "llava": [(re.compile(r"^language_model\.model\."), "model.language_model."),
              (re.compile(r"^language_model\.lm_head\."), "lm_head."),
              (re.compile(r"^(?:model\.)?vision_tower\.vision_model\."), "model.vision_tower."),
              (re.compile(r"^vision_tower\."), "model.vision_tower."),
              (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector.")],
    "qwen2_5_vl": [(re.compile(r"^visual\."), "model.visual."),
                   (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model.")],
}


def canonical_name(model_type: str | None, name: str) -> str:
    """The in-memory name of a stored tensor name (unchanged for unknown model types)."""
    for pat, rep in _RENAMES.get(model_type or "", ()):
        new, n = pat.subn(rep, name, count=1)
        if n:
            return new
    return name


def canonical_names(model_type: str | None, names: Iterable[str], what: str = "checkpoint") -> dict[str, str]:
    """{canonical name: stored name}; refuses a checkpoint where two stored names mean the same tensor."""
    out: dict[str, str] = {}
    for n in names:
        c = canonical_name(model_type, n)
        if c in out:
            raise ValueError(f"{what}: {out[c]!r} and {n!r} are the same tensor in two key layouts")
        out[c] = n
    return out


def layout_of(model_type: str | None, names: Iterable[str]) -> str:
    """"original", "in-memory", or "plain" (a model type without renamed keys)."""
    if model_type not in _RENAMES:
        return "plain"
    names = list(names)
    renamed = sum(canonical_name(model_type, n) != n for n in names)
    return "original" if renamed else "in-memory"


# ----------------------------------------------------------------------------------------------
# The merge set.

@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    last_layers: int
    paper: str

    @property
    def projector(self) -> str:
        return PROJECTOR_PREFIX[self.model_type]


PRESETS = {
    "llava-1.5": Preset("llava-1.5", "llava", 12, "LLaVA-1.5-7B: the last 12 of 32 decoder layers + projector"),
    "qwen2.5-vl": Preset("qwen2.5-vl", "qwen2_5_vl", 6, "Qwen2.5-VL-3B: the last 6 of 36 decoder layers + merger"),
}


def layer_of(name: str) -> int | None:
    """The decoder-layer index of a canonical name, or None."""
    if not name.startswith(LAYER_PREFIX):
        return None
    head = name[len(LAYER_PREFIX):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def n_decoder_layers(names: Iterable[str]) -> int:
    idx = [i for i in map(layer_of, names) if i is not None]
    return max(idx) + 1 if idx else 0


@dataclass(frozen=True)
class MergeSet:
    """How the merged tensors are chosen: a preset (with an optional number of layers) or patterns."""
    preset: str | None = None
    last_layers: int | None = None
    patterns: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """The merge_set mapping of a cgm-merge config or a recipe: {preset[, last_layers]} or {patterns}."""
        if self.preset:
            return {"preset": self.preset, **({"last_layers": self.last_layers} if self.last_layers is not None
                                              else {})}
        return {"patterns": list(self.patterns)}

    def describe(self) -> str:
        if self.preset:
            p = PRESETS[self.preset]
            k = p.last_layers if self.last_layers is None else self.last_layers
            return f"preset {self.preset}: last {k} decoder layers + {p.projector.rstrip('.')}"
        return "patterns " + ", ".join(self.patterns)

    def resolve(self, model_type: str | None, canonical: Sequence[str]) -> list[str]:
        """The canonical names of the merged tensors, in the order of `canonical`."""
        if self.preset:
            p = PRESETS[self.preset]
            if model_type != p.model_type:
                raise ValueError(f"merge_set: preset {p.name} is for {p.model_type} checkpoints, this one is "
                                 f"{model_type or 'of unknown type (no config.json)'}; give patterns instead")
            total = n_decoder_layers(canonical)
            k = p.last_layers if self.last_layers is None else self.last_layers
            if k > total:
                raise ValueError(f"merge_set: preset {p.name} merges the last {k} decoder layers ({p.paper}), but "
                                 f"this model has {total}; set merge_set.last_layers (the miniatures: 2)")
            first = total - k
            chosen = [n for n in canonical if n.startswith(p.projector)
                      or (layer_of(n) is not None and layer_of(n) >= first)]
            if not any(n.startswith(p.projector) for n in chosen):
                raise ValueError(f"merge_set: preset {p.name}: no tensor starts with {p.projector}")
            return chosen
        chosen, used = [], set()
        for n in canonical:
            for pat in self.patterns:
                if fnmatch.fnmatchcase(n, pat):
                    chosen.append(n)
                    used.add(pat)
                    break
        for pat in self.patterns:
            if pat not in used and not any(fnmatch.fnmatchcase(n, pat) for n in canonical):
                raise ValueError(f"merge_set: pattern {pat!r} matches no tensor (patterns are globs on in-memory "
                                 f"names such as {canonical[0]!r})" if canonical else
                                 f"merge_set: pattern {pat!r} matches no tensor")
        return chosen


def invert(mapping: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in mapping.items()}
