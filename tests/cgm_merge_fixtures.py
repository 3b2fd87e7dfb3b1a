"""Inputs for the cgm-merge tests: fine-tuned copies of the shipped miniatures in both key layouts, a small
sharded bf16 Llama, curvature files, and the in-memory reference merge of the same tensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cgm_min import cgm
from cgm_min.io.curvature_files import write_curvature
from cgm_min.io.layouts import canonical_name
from cgm_min.merge import merge_state
from cgm_min.world.models import shipped_checkpoint

@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """Input hashes are remembered in a per-test file, never in the user's ~/.cache (import this fixture)."""
    monkeypatch.setenv("CGM_MERGE_HASH_CACHE", str(tmp_path / "sha256-cache.json"))


MODEL_TYPE = {"llava": "llava", "qwen": "qwen2_5_vl"}
MERGED = {"llava": ("model.language_model.layers.2.", "model.language_model.layers.3.",
                    "model.multi_modal_projector."),
          "qwen": ("model.language_model.layers.2.", "model.language_model.layers.3.", "model.visual.merger.")}

# The shipped miniatures are stored with the original names (what transformers' save_pretrained writes by
# default). The in-memory layout, as save_pretrained(save_original_format=False) writes it, transcribed from
# transformers' conversion_mapping (that transformers loads it with zero missing keys is checked by every
# merge's verification).
TO_IN_MEMORY = {
    "llava": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")],
    "qwen": [("visual.", "model.visual."), ("model.", "model.language_model.")],
}


def in_memory_name(family: str, name: str) -> str:
    for old, new in TO_IN_MEMORY[family]:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def copy_model(family: str, state: dict, out: Path, layout: str) -> Path:
    """A checkpoint folder: the shipped miniature's config, tokenizer, processor files and `state`."""
    src = shipped_checkpoint(family)
    out.mkdir(parents=True)
    for p in src.iterdir():
        if p.name not in ("model.safetensors", "manifest.json", "curves.json"):
            shutil.copy(p, out / p.name)
    if layout == "in-memory":
        state = {in_memory_name(family, n): t for n, t in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def make_family(root: Path, family: str, layout: str = "original", seed: int = 0) -> dict[str, Path]:
    """pre-trained (the shipped miniature), fine-tuned (merge set moved by seeded noise), h_pt (keyed by
    in-memory names, as calibration_fisher returns it) and h_ft (keyed by stored names), in `layout`."""
    root = Path(root)
    src = shipped_checkpoint(family)
    sd = load_file(src / "model.safetensors")
    mt = MODEL_TYPE[family]
    merged = [n for n in sd if canonical_name(mt, n).startswith(MERGED[family])]
    g = torch.Generator().manual_seed(seed)
    ft = dict(sd)
    for n in merged:
        ft[n] = sd[n] + 0.02 * torch.randn(sd[n].shape, generator=g)
    paths = {"pt": copy_model(family, sd, root / "pt", layout), "ft": copy_model(family, ft, root / "ft", layout)}
    h_pt = {canonical_name(mt, n): torch.rand(sd[n].shape, generator=g) ** 2 for n in merged}
    h_ft = {n: torch.rand(sd[n].shape, generator=g) ** 2 for n in merged}
    paths["h_pt"] = write_curvature(h_pt, paths["pt"], root / "h_pt", {"kind": "h_pt", "samples": 8})
    paths["h_ft"] = write_curvature(h_ft, paths["ft"], root / "h_ft", {"kind": "h_ft", "samples": 64})
    return paths


def make_sharded_llama(root: Path, seed: int = 0) -> dict[str, Path]:
    """A 3-layer bf16 Llama saved by save_pretrained in several shards with an index, a fine-tuned copy, and
    fp32 curvature of layers 1-2 in the same shard layout."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = Path(root)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "pt", max_shard_size="40KB")
    g = torch.Generator().manual_seed(seed + 1)
    merged = [n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in merged:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    model.save_pretrained(root / "ft", max_shard_size="40KB")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    paths = {"pt": root / "pt", "ft": root / "ft"}
    for role in ("h_pt", "h_ft"):
        h = {n: torch.rand(shapes[n], generator=g) for n in merged}
        paths[role] = write_curvature(h, paths["pt" if role == "h_pt" else "ft"], root / role, {"kind": role})
    return paths


def write_config(path: Path, paths: dict[str, Path], method: str = "cgm", parameters: dict | None = None,
                 merge_set: dict | None = None, **extra) -> Path:
    cfg = {"pre_trained": str(paths["pt"]), "fine_tuned": str(paths["ft"])}
    if "h_pt" in paths:
        cfg["curvature"] = {"pre_trained": str(paths["h_pt"]), "fine_tuned": str(paths["h_ft"])}
    cfg["method"] = method
    cfg["parameters"] = parameters if parameters is not None else {"alpha": 0.5}
    cfg["merge_set"] = merge_set or {"preset": "llava-1.5", "last_layers": 2}
    cfg.update(extra)
    path.write_text("# a cgm-merge config written by the tests\n" + yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# The in-memory reference.

def load_canonical(path: Path, model_type: str | None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single file or sharded), keyed by in-memory names."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out = {}
    for f in files:
        out.update({canonical_name(model_type, n): t for n, t in load_file(path / f).items()})
    return out


def reference_merge(paths: dict[str, Path], model_type: str | None, method: str, parameters: dict,
                    names: list[str]) -> dict[str, torch.Tensor]:
    """merge_state on the whole models in memory; `names`: the merge set, in-memory names, in order."""
    sd_pt, sd_ft = load_canonical(paths["pt"], model_type), load_canonical(paths["ft"], model_type)
    hp = dict(parameters)
    curv = (None, None)
    if "h_pt" in paths and method in ("cgm", "cgm_dagger", "fisher_merging"):
        h_pt, h_ft = load_canonical(paths["h_pt"], model_type), load_canonical(paths["h_ft"], model_type)
        curv = ({n: h_pt[n] for n in names}, {n: h_ft[n] for n in names})
        if "alpha_normalised" in hp:
            hp["alpha"] = cgm.alpha_from_normalised(hp.pop("alpha_normalised"), *curv)
    return merge_state(method, sd_pt, sd_ft, *curv, names=names, **hp)


def bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
