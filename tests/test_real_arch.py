"""The real LLaVA-1.5-7B and Qwen2.5-VL-3B, built on the meta device from their published configs: parameter
counts against the published sizes, both key layouts, the paper's merge sets, curvature files and the
cgm-merge plan computed from the real names and shapes (no weights anywhere)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from cgm_min.io.layouts import MergeSet, canonical_name, layer_of, layout_of
from cgm_min.io.reader import Checkpoint
from cgm_min.real import architectures as ra
from cgm_min.real import merge_plan as rp

from cgm_merge_fixtures import make_family, make_sharded_llama
from cgm_merge_fixtures import private_hash_cache  # noqa: F401 (an autouse fixture)

NAMES = tuple(ra.REAL_MODELS)
# Published parameter counts of the real checkpoints (sources in cgm_min/data/real_configs/README.md).
PUBLISHED_TOTAL = {"llava-1.5-7b": 7_063_427_072, "qwen2.5-vl-3b": 3_754_622_976}
PUBLISHED_TENSORS = {"qwen2.5-vl-3b": 824}
# The paper's merge sets (papers.md): decoder layers 20-31 of 32 (LLaVA), 30-35 of 36 (Qwen2.5-VL).
PAPER_LAYERS = {"llava-1.5-7b": range(20, 32), "qwen2.5-vl-3b": range(30, 36)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_shipped_configs_are_the_published_files():
    for name in NAMES:
        m = ra.get_real(name)
        d = ra.config_dict(name)
        assert d["model_type"] == m.model_type and d["architectures"][0].endswith("ForConditionalGeneration")
        assert json.loads(ra.config_text(name)) == d
    assert ra.stored_dtype("llava-1.5-7b") == torch.float16
    assert ra.stored_dtype("qwen2.5-vl-3b") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown real model 'llava-13b'"):
        ra.get_real("llava-13b")


@pytest.mark.parametrize("name", NAMES)
def test_meta_model_has_no_storage(name):
    net = ra.meta_model(name, layout="original")
    params = list(net.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert {p.dtype for p in params} == {ra.stored_dtype(name)}
    assert type(net).__name__ == ra.config_dict(name)["architectures"][0]
    with pytest.raises(ValueError, match="layout must be one of"):
        ra.meta_model(name, layout="hub")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_published_sizes(name):
    c = ra.parameter_counts(name)
    assert c["total"] == PUBLISHED_TOTAL[name]
    assert c["total"] == sum(p.numel() for p in ra.meta_model(name).parameters())   # tied weights once
    assert c["language_model"] + c["vision_tower"] + c["projector"] == c["total"]
    if name in PUBLISHED_TENSORS:
        assert c["tensors"] == PUBLISHED_TENSORS[name]
    k = ra.get_real(name).last_layers
    assert c["merge_set"] == k * c["decoder_layer"] + c["projector"]
    assert c["merge_set_tensors"] == k * sum(layer_of(n) == 0 for n in ra.in_memory_shapes(name)) + sum(
        n.startswith(ra.get_real(name).projector_prefix) for n in ra.in_memory_shapes(name))


def test_layer_and_projector_sizes_follow_from_the_config():
    """One decoder layer and the projector counted by hand from the config values (minGPT-style check)."""
    d = ra.config_dict("llava-1.5-7b")
    t = LlamaConfig(**d["text_config"])                         # the port relies on LlamaConfig's defaults
    h, i, v = t.hidden_size, t.intermediate_size, d["vision_config"]["hidden_size"]
    c = ra.parameter_counts("llava-1.5-7b")
    assert c["n_decoder_layers"] == t.num_hidden_layers == 32
    assert c["decoder_layer"] == 4 * h * h + 3 * h * i + 2 * h
    assert c["projector"] == (v * h + h) + (h * h + h)
    q = ra.config_dict("qwen2.5-vl-3b")
    h, i = q["hidden_size"], q["intermediate_size"]
    kv = q["num_key_value_heads"] * h // q["num_attention_heads"]
    vh, m = q["vision_config"]["hidden_size"], q["vision_config"]["spatial_merge_size"] ** 2
    c = ra.parameter_counts("qwen2.5-vl-3b")
    assert c["n_decoder_layers"] == q["num_hidden_layers"] == 36
    assert c["decoder_layer"] == (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert c["projector"] == vh + (vh * m) * (vh * m) + vh * m + (vh * m) * h + h


@pytest.mark.parametrize("name", NAMES)
def test_both_key_layouts(name):
    """transformers' own reverse conversion (what save_pretrained writes) and the project's layouts.py
    table agree on every tensor; the two layouts hold the same tensors."""
    m = ra.get_real(name)
    orig, mem = ra.tensor_specs(name, "original"), ra.tensor_specs(name, "in-memory")
    assert len(orig) == len(mem)
    assert [canonical_name(m.model_type, n) for n in orig] == list(mem)
    assert list(orig.values()) == list(mem.values())
    assert layout_of(m.model_type, orig) == "original" and layout_of(m.model_type, mem) == "in-memory"
    if name == "llava-1.5-7b":
        assert {"language_model.model.layers.31.mlp.down_proj.weight", "language_model.lm_head.weight",
                "multi_modal_projector.linear_2.weight",
                "vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight"} <= set(orig)
        assert orig["language_model.lm_head.weight"] == ("F16", (32064, 4096))
        # the CLIP tower's three spellings (hub, 4.x in-memory, saved from a config) are one tensor
        for n in ("vision_tower.vision_model.post_layernorm.bias",
                  "model.vision_tower.vision_model.post_layernorm.bias", "vision_tower.post_layernorm.bias"):
            assert canonical_name("llava", n) == "model.vision_tower.post_layernorm.bias"
    else:
        assert {"model.layers.35.mlp.down_proj.weight", "model.embed_tokens.weight", "visual.merger.mlp.2.weight",
                "visual.blocks.31.attn.qkv.weight"} <= set(orig)
        assert "lm_head.weight" not in orig and "lm_head.weight" not in mem      # tied to the embeddings
        assert orig["visual.merger.mlp.0.weight"] == ("BF16", (5120, 5120))
    with pytest.raises(ValueError, match="layout must be one of"):
        ra.tensor_specs(name, "hub")


@pytest.mark.parametrize("name", NAMES)
def test_paper_merge_set(name):
    """The preset resolves to the paper's layers + projector in both layouts, and selects exactly what the
    miniature world's merge_param_names selects on the real model."""
    from cgm_min.world.models import merge_param_names
    m = ra.get_real(name)
    mem = ra.merge_set_names(name, "in-memory")
    orig = ra.merge_set_names(name, "original")
    assert [canonical_name(m.model_type, n) for n in orig] == mem
    layers = {layer_of(n) for n in mem} - {None}
    assert layers == set(PAPER_LAYERS[name])
    assert all(layer_of(n) is not None or n.startswith(m.projector_prefix) for n in mem)
    assert any(n.startswith(m.projector_prefix) for n in mem)
    assert mem == merge_param_names(ra.meta_model(name), m.last_layers)
    other = "qwen2.5-vl" if m.preset == "llava-1.5" else "llava-1.5"
    with pytest.raises(ValueError, match=f"preset {other} is for"):
        MergeSet(preset=other).resolve(m.model_type, mem)


def _headers(folder: Path) -> dict[str, list[tuple[str, str, tuple]]]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with Checkpoint(p, "test") as ck:
            out[p.name] = [(n, ck.info(n).dtype, ck.info(n).shape) for n in ck.names]
    return out


def test_curvature_layout_is_what_write_curvature_writes(tmp_path):
    """curvature_layout predicts the files write_curvature writes, for a sharded and a single-file model."""
    for paths in (make_sharded_llama(tmp_path / "llama"), make_family(tmp_path / "llava", "llava", "original")):
        with Checkpoint(paths["pt"], "pt") as ck:
            specs = {n: (ck.info(n).dtype, ck.info(n).shape) for n in ck.names}
            shard_of = {n: ck.info(n).file.name for n in ck.names} if ck.sharded else None
        written = _headers(Path(paths["h_pt"]))
        merged = [n for entries in written.values() for n, _, _ in entries]
        assert rp.curvature_layout(specs, shard_of, merged) == written
        assert (Path(paths["h_pt"]) / rp.INDEX_NAME).is_file() == (shard_of is not None)


def test_header_only_files_read_like_real_ones(tmp_path):
    specs = dict(list(ra.tensor_specs("qwen2.5-vl-3b", "original").items())[:40])
    shard_of = rp.shard_layout(specs, max_bytes=20_000_000)
    files: dict[str, list] = {}
    for n, (code, shape) in specs.items():
        files.setdefault(shard_of[n], []).append((n, code, shape))
    assert len(files) > 1
    total = rp.write_headers(tmp_path / "ck", files, sharded=True)
    assert total == ra.bytes_of(specs)
    with Checkpoint(tmp_path / "ck", "fabricated") as ck:
        assert ck.sharded and {n: (ck.info(n).dtype, ck.info(n).shape) for n in ck.names} == specs
        small = min(specs, key=lambda n: _numel(specs[n][1]))
        assert not ck.read(small).any()                          # a hole reads as zeros
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "ck").iterdir())
    assert used < 1 << 20 < total                                # sparse: headers only on disk


@pytest.mark.parametrize("name,layouts", [
    ("llava-1.5-7b", {"pre_trained": "original", "fine_tuned": "original"}),
    ("llava-1.5-7b", {"pre_trained": "original", "fine_tuned": "in-memory"}),
    ("qwen2.5-vl-3b", {"pre_trained": "in-memory", "fine_tuned": "original"}),
])
def test_real_merge_plan(name, layouts, tmp_path):
    """plan_merge (cgm-merge --dry-run) on header-only real checkpoints: the paper's merge set, the bytes to
    read and write, and a bounded peak memory, from names and shapes alone."""
    c = ra.parameter_counts(name)
    el = torch.finfo(ra.stored_dtype(name)).bits // 8
    plan = rp.real_merge_plan(name, tmp_path, "cgm", {"alpha_normalised": 1.0}, layouts)
    assert plan["tensors"] == c["tensors"]
    assert plan["merged_tensors"] == c["merge_set_tensors"]
    assert plan["merged_parameters"] == c["merge_set"]
    assert plan["merged_names"] == ra.merge_set_names(name, layouts["fine_tuned"])   # the output keeps ft's names
    assert plan["bytes_written"] == el * c["total"]
    assert plan["curvature_bytes"] == 2 * 4 * c["merge_set"]
    # read: the whole fine-tuned model, the pre-trained merge set and both curvatures (float32)
    assert plan["bytes_read"] == el * c["total"] + el * c["merge_set"] + 8 * c["merge_set"]
    assert plan["layouts"] == {**layouts, "h_pt": layouts["fine_tuned"], "h_ft": layouts["fine_tuned"]}
    assert len(plan["shards"]) == {"llava-1.5-7b": 3, "qwen2.5-vl-3b": 2}[name]   # as many as the hub checkpoints have
    assert plan["peak_memory"] < 2e9                             # streamed: never a whole model in memory
    assert f"{c['merge_set']:,} parameters" in plan["describe"]
    used = sum(p.stat().st_blocks * 512 for p in tmp_path.rglob("*") if p.is_file())
    assert used < 16 << 20


def test_merge_plan_refuses_curvature_that_misses_the_merge_set(tmp_path):
    """The real layers beyond the curvature are caught before anything is read."""
    with pytest.raises(ValueError, match="does not cover the merge set"):
        paths = rp.fabricate("qwen2.5-vl-3b", tmp_path, last_layers=5)
        from cgm_min.io.merge_checkpoints import parse_config, plan_merge
        data = {"pre_trained": str(paths["pre_trained"]), "fine_tuned": str(paths["fine_tuned"]), "method": "cgm",
                "parameters": {"alpha": 0.5}, "merge_set": {"preset": "qwen2.5-vl"},
                "curvature": {"pre_trained": str(paths["h_pt"]), "fine_tuned": str(paths["h_ft"])}}
        plan_merge(parse_config(data, tmp_path)).close()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ra.LAYOUTS)
def test_fabricated_checkpoints_load_in_transformers(name, layout, tmp_path):
    """transformers itself loads the header-only checkpoints (names, shapes, dtypes; the check every merge
    runs on its output) with no missing, unexpected or mismatched key: the names the real hub files hold
    (layout "original") and those save_pretrained(save_original_format=False) writes are both right."""
    from cgm_min.io.merge_checkpoints import transformers_load_check
    folder = rp.fabricate(name, tmp_path, {"pre_trained": layout}, curvature=False)["pre_trained"]
    r = transformers_load_check(folder)
    assert r["checked"] and r["missing_keys"] == r["unexpected_keys"] == r["mismatched_keys"] == []
    # negative control: one tensor under a wrong name is reported
    specs = ra.tensor_specs(name, layout)
    last = list(specs)[-1]
    bad = {(n + "_x" if n == last else n): v for n, v in specs.items()}
    rp.write_headers(tmp_path / "bad", {"model.safetensors": [(n, c, s) for n, (c, s) in bad.items()]},
                     sharded=False)
    (tmp_path / "bad" / "config.json").write_text(ra.config_text(name))
    r = transformers_load_check(tmp_path / "bad")
    assert r["missing_keys"] and r["unexpected_keys"]


def test_cli_prints_counts_and_plan(capsys):
    from cgm_min.cli import run
    from cgm_min.real.__main__ import main
    assert run(main, ["qwen2.5-vl-3b", "--method", "linear", "--param", "lam=0.5"]) == 0
    out = capsys.readouterr().out
    c = ra.parameter_counts("qwen2.5-vl-3b")
    assert f"{c['total']:,} parameters" in out and f"{c['merge_set']:,} parameters in 77 tensors" in out
    assert "lam = 0.5" in out and "<header-only files>/fine_tuned" in out
    assert run(main, ["llava-13b"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown real model 'llava-13b'; choose one of "
                                              "llava-1.5-7b, qwen2.5-vl-3b")


def test_offline_mode_only_where_models_are_built(tmp_path):
    """Importing the module leaves HF_HUB_OFFLINE alone; meta_model builds both models with the hub off and
    no network connection attempted, and restores the setting; the command sets it for itself."""
    import subprocess
    import sys
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, socket\n"
        "tried = []\n"
        "def refuse(self, addr):\n"
        "    tried.append(addr)\n"
        "    raise OSError('no network in this test')\n"
        "socket.socket.connect = refuse\n"
        "from cgm_min.real import architectures as ra\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ, 'set by importing the module'\n"
        "from huggingface_hub import constants\n"
        "with ra.hub_offline():\n"
        "    assert os.environ['HF_HUB_OFFLINE'] == '1' and constants.is_offline_mode()\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ and not constants.is_offline_mode()\n"
        "for name in ra.REAL_MODELS:\n"
        "    ra.meta_model(name)\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ and not tried, tried\n"
        "print('ok')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = subprocess.run([sys.executable, probe], capture_output=True, text=True, env=env, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    main = (Path(ra.__file__).parent / "__main__.py").read_text()
    assert 'os.environ.setdefault("HF_HUB_OFFLINE", "1")' in main.split('if __name__ == "__main__":')[1]
