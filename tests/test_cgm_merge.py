"""cgm-merge on the shipped miniatures (both families, both key layouts) and on a sharded bf16 Llama: the
streaming merge equals the in-memory merge_state bit for bit, the output reloads, and it is deterministic."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cgm_min import cgm
from cgm_min.cli import run
from cgm_min.cli.merge import main
from cgm_min.io.layouts import LAYER_PREFIX, PROJECTOR_PREFIX, MergeSet, canonical_name
from cgm_min.io.merge_checkpoints import load_config, merge_checkpoints, plan_merge
from cgm_min.io.writer import sha256_file

from cgm_merge_fixtures import (MODEL_TYPE, load_canonical, make_family, make_sharded_llama, reference_merge,
                                same_bits, write_config)
from cgm_merge_fixtures import private_hash_cache  # noqa: F401 (an autouse fixture)

PRESET = {"llava": {"preset": "llava-1.5", "last_layers": 2}, "qwen": {"preset": "qwen2.5-vl", "last_layers": 2}}
METHODS = {
    "cgm": {"alpha": 0.7}, "cgm_dagger": {"alpha": 1.0, "k": 0.3}, "linear": {"lam": 0.3},
    "task_arithmetic": {"scale": 0.6}, "ties": {"k": 0.5, "scale": 0.9}, "dare": {"p": 0.3, "seed": 1},
    "magnitude": {"k": 0.4}, "random_revert": {"k": 0.2, "seed": 2, "per_row": False},
    "fisher_merging": {"lam_pt": 0.4},
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {(f, layout): make_family(root / f"{f}-{layout}", f, layout)
            for f in ("llava", "qwen") for layout in ("original", "in-memory")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_sharded_llama(tmp_path_factory.mktemp("llama"))


def merged_names(record: dict) -> list[str]:
    return record["merge_set"]["tensors"]


def check_equal_to_reference(out: Path, paths: dict, model_type, method: str, parameters: dict, record: dict,
                             out_dtype=None) -> None:
    names = merged_names(record)
    ref = reference_merge(paths, model_type, method, parameters, names)
    got = load_canonical(out, model_type)
    assert set(got) == set(ref)
    for n, t in ref.items():
        want = t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t
        assert same_bits(got[n], want), n


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("layout", ["original", "in-memory"])
def test_streaming_equals_in_memory_on_both_families_and_layouts(families, tmp_path, family, layout):
    paths = families[family, layout]
    params = {"alpha_normalised": 1.3}
    cfg = write_config(tmp_path / "m.yaml", paths, "cgm", params, PRESET[family])
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    mt = MODEL_TYPE[family]
    # the preset resolved to the last two decoder layers + the projector in either layout
    assert len(merged_names(record)) == (22 if family == "llava" else 29)
    prefixes = (LAYER_PREFIX + "2.", LAYER_PREFIX + "3.", PROJECTOR_PREFIX[mt])
    assert all(n.startswith(prefixes) for n in merged_names(record))
    check_equal_to_reference(tmp_path / "out", paths, mt, "cgm", params, record)
    # the output keeps the fine-tuned model's own key layout, and loads with zero missing / unexpected keys
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(load_file(paths["ft"] / "model.safetensors"))
    tf = record["verification"]["transformers"]
    assert tf["checked"] and not (tf["missing_keys"] or tf["unexpected_keys"] or tf["mismatched_keys"])
    assert record["key_layouts"]["fine_tuned"] == layout


def test_every_data_free_method_equals_merge_state(families, tmp_path):
    paths = families["llava", "original"]
    for method, params in METHODS.items():
        out = tmp_path / method
        cfg = write_config(tmp_path / f"{method}.yaml", paths, method, params)
        record = merge_checkpoints(cfg, out, progress=False, log=lambda *_: None)
        check_equal_to_reference(out, paths, "llava", method, params, record)
        if method in ("cgm", "cgm_dagger"):             # and the one-page module's own whole-model merge
            sd = {k: load_canonical(paths[k], "llava") for k in ("pt", "ft", "h_pt", "h_ft")}
            names = merged_names(record)
            ref = cgm.cgm_merge(sd["pt"], sd["ft"], {n: sd["h_pt"][n] for n in names},
                                {n: sd["h_ft"][n] for n in names}, params["alpha"], params.get("k"))
            got = load_canonical(out, "llava")
            assert all(same_bits(got[n], ref[n]) for n in ref), method


def test_mixed_layouts_and_curvature_names(families, tmp_path):
    """pre-trained in the original layout, fine-tuned in the in-memory one: the output is in the fine-tuned
    layout and equals the reference."""
    paths = dict(families["llava", "in-memory"])
    paths["pt"] = families["llava", "original"]["pt"]
    cfg = write_config(tmp_path / "m.yaml", paths, "cgm_dagger", {"alpha": 2.0, "k": 0.5, "per_row": False})
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    assert record["key_layouts"] == {"pre_trained": "original", "fine_tuned": "in-memory", "h_pt": "in-memory",
                                     "h_ft": "in-memory"}
    check_equal_to_reference(tmp_path / "out", paths, "llava", "cgm_dagger",
                             {"alpha": 2.0, "k": 0.5, "per_row": False}, record)


@pytest.mark.parametrize("method, params, dtype", [
    ("cgm", {"alpha_normalised": 0.5}, "auto"), ("cgm_dagger", {"alpha": 1.0, "k": 0.25}, "auto"),
    ("cgm", {"alpha": 0.8}, "float32")])
def test_sharded_bf16_llama(llama, tmp_path, method, params, dtype):
    from transformers import LlamaForCausalLM
    cfg = write_config(tmp_path / "m.yaml", llama, method, params,
                       {"patterns": ["model.layers.1.*", "model.layers.2.*"]}, dtype=dtype)
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    ft_index = json.loads((llama["ft"] / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == ft_index["weight_map"] and len(set(index["weight_map"].values())) > 1
    out_dtype = torch.float32 if dtype == "float32" else None
    check_equal_to_reference(out, llama, None, method, params, record, out_dtype)
    model = LlamaForCausalLM.from_pretrained(out)                       # a real load, not only the meta one
    assert model.dtype == (torch.float32 if dtype == "float32" else torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == ("float32" if dtype == "float32" else "bfloat16")


@pytest.mark.parametrize("method, params, dtype", [("cgm", {"alpha": 0.8}, "auto"), ("linear", {"lam": 0.3}, "float32")])
def test_tensors_streamed_in_many_blocks(llama, tmp_path, monkeypatch, method, params, dtype):
    """Blocks of 1000 entries (tensors of up to 6144): read ahead, written behind, equal to the reference."""
    from cgm_min.io import streaming
    monkeypatch.setattr(streaming, "BLOCK", 1000)
    cfg = write_config(tmp_path / "m.yaml", llama, method, params, {"patterns": ["model.layers.1.*", "model.layers.2.*norm*"]},
                       dtype=dtype)
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    check_equal_to_reference(tmp_path / "out", llama, None, method, params, record,
                             torch.float32 if dtype == "float32" else None)


@pytest.mark.parametrize("direct", [True, False])
def test_reads_around_the_page_cache_and_small_stages(llama, tmp_path, monkeypatch, direct):
    """Every read treated as cold (O_DIRECT into page-aligned buffers, at offsets that are not page
    aligned), or no O_DIRECT at all, and a staging buffer of one page: the output is the reference's, and
    the shard hashes computed while writing are the files' hashes."""
    from cgm_min.io import reader, streaming, writer
    monkeypatch.setattr(streaming, "BLOCK", 1000)
    monkeypatch.setattr(writer, "STAGE_BYTES", writer.PAGE)
    monkeypatch.setattr(writer, "COPY_BYTES", 3 * writer.PAGE)
    if direct:
        monkeypatch.setattr(reader, "MIN_DIRECT", 0)
        monkeypatch.setattr(reader, "is_cached", lambda fd, offset, nbytes: False)
    else:
        monkeypatch.setattr(reader, "open_direct", lambda *a, **k: None)
        monkeypatch.setattr(writer, "open_direct", lambda *a, **k: None)
    cfg = write_config(tmp_path / "m.yaml", llama, "cgm", {"alpha": 0.8}, {"patterns": ["model.layers.1.*"]})
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    check_equal_to_reference(tmp_path / "out", llama, None, "cgm", {"alpha": 0.8}, record)
    for name, info in record["outputs"].items():
        assert info["sha256"] == sha256_file(tmp_path / "out" / name), name


def test_copies_reuse_the_readers_direct_descriptors(llama, tmp_path, monkeypatch):
    """Tensors outside the merge set are copied through the reader's cached O_DIRECT descriptor (one per
    input file, opened once), not a new one per tensor; the output stays the reference's, bit for bit."""
    from cgm_min.io import reader, writer
    monkeypatch.setattr(writer, "COPY_BYTES", 3 * writer.PAGE)     # every copied tensor takes the O_DIRECT path
    monkeypatch.setattr(reader, "MIN_DIRECT", 0)
    monkeypatch.setattr(reader, "is_cached", lambda fd, offset, nbytes: False)
    opened = {"reader": [], "writer": []}
    for mod, key in ((reader, "reader"), (writer, "writer")):
        real = mod.open_direct
        monkeypatch.setattr(mod, "open_direct", lambda *a, _r=real, _k=key, **k: opened[_k].append(a) or _r(*a, **k))
    cfg = write_config(tmp_path / "m.yaml", llama, "cgm", {"alpha": 0.8}, {"patterns": ["model.layers.1.*"]})
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    check_equal_to_reference(tmp_path / "out", llama, None, "cgm", {"alpha": 0.8}, record)
    assert record["verification"]["unchanged_identical"] > 0         # tensors were copied
    assert [a for a in opened["writer"] if len(a) == 1] == []        # no O_DIRECT source opened per copy
    paths = [str(a[0]) for a in opened["reader"]]
    assert any(p.startswith(str(llama["ft"])) for p in paths) and len(paths) == len(set(paths))   # once a file


def test_a_declined_block_is_rewritten_by_the_reference(llama, tmp_path, monkeypatch):
    """Curvature near the float32 limit in a later block of a tensor: the kernel declines, the reference
    (which accepts it) rewrites the tensor from its first byte."""
    from cgm_min.io import streaming
    monkeypatch.setattr(streaming, "BLOCK", 1000)
    paths = dict(llama)
    shutil.copytree(llama["h_pt"], tmp_path / "h_pt")
    paths["h_pt"] = tmp_path / "h_pt"
    shard = next(f for f in sorted((tmp_path / "h_pt").glob("*.safetensors")) if
                 "model.layers.1.mlp.up_proj.weight" in load_file(f))
    sd = load_file(shard)
    sd["model.layers.1.mlp.up_proj.weight"].view(-1)[4321] = 3e38
    save_file(sd, shard)
    cfg = write_config(tmp_path / "m.yaml", paths, "cgm", {"alpha": 1.0}, {"patterns": ["model.layers.1.*"]})
    from cgm_min.io.writer import ShardWriter
    rewinds = []
    real = ShardWriter.rewind
    monkeypatch.setattr(ShardWriter, "rewind", lambda self: rewinds.append(1) or real(self))
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    check_equal_to_reference(tmp_path / "out", paths, None, "cgm", {"alpha": 1.0}, record)
    assert rewinds == [1]                   # blocks 0-3 were written, then rewritten by the reference


def test_curvature_files_mirror_the_model_shards(llama):
    h_index = json.loads((llama["h_pt"] / "model.safetensors.index.json").read_text())["weight_map"]
    m_index = json.loads((llama["pt"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(m_index[n] == shard for n, shard in h_index.items())
    from cgm_min.io.curvature_files import read_curvature_metadata
    from cgm_min.io.reader import Checkpoint
    meta = read_curvature_metadata(llama["h_pt"])
    with Checkpoint(llama["pt"]) as model:
        assert meta["kind"] == "h_pt" and set(meta["model_files"]) == {p.name for p in model.weight_files()}
    with Checkpoint(llama["h_pt"]) as ck:
        assert all(ck.info(n).dtype == "F32" for n in ck.names)


def test_same_config_gives_identical_files(families, tmp_path):
    paths = families["qwen", "original"]
    cfg = write_config(tmp_path / "m.yaml", paths, "dare", {"p": 0.5, "seed": 3}, PRESET["qwen"])
    for out in ("a", "b"):
        merge_checkpoints(cfg, tmp_path / out, progress=False, log=lambda *_: None)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_provenance_model_card_and_carried_files(families, tmp_path):
    paths = families["llava", "original"]
    cfg = write_config(tmp_path / "m.yaml", paths, "cgm", {"alpha_normalised": 1.0})
    record = merge_checkpoints(cfg, tmp_path / "out", progress=False, log=lambda *_: None)
    out = tmp_path / "out"
    assert json.loads((out / "cgm_merge.json").read_text()) == record
    import cgm_min
    assert record["cgm_min_version"] == cgm_min.__version__ and record["config"]["method"] == "cgm"
    assert record["alpha"]["alpha"] == pytest.approx(record["alpha"]["sum_h_ft"] / record["alpha"]["sum_h_pt"])
    for role, key in (("pre_trained", "pt"), ("fine_tuned", "ft"), ("h_pt", "h_pt"), ("h_ft", "h_ft")):
        for name, info in record["inputs"][role]["files"].items():
            assert info["sha256"] == sha256_file(paths[key] / name), (role, name)
    assert record["config_sha256"] == sha256_file(cfg)
    for name, info in record["outputs"].items():
        assert info["sha256"] == sha256_file(out / name)
    assert set(record["outputs"]) | {"cgm_merge.json"} == {p.name for p in out.iterdir()}
    stats = record["tensors"]
    assert len(stats) == 22 and all(0 <= s["mean_lam"] <= 1 and 0 <= s["reverted"] <= s["n_delta"] <= s["n"]
                                    and s["fraction_reverted"] == s["reverted"] / s["n_delta"] for s in stats.values())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (paths["ft"] / name).read_bytes(), name
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == str(paths["pt"]) and front["library_name"] == "transformers"
    assert front["merge_method"] == "cgm" and "merge" in front["tags"] and "alpha" in front["merge_parameters"]
    from cgm_min.world.models import load_processor
    ids = [load_processor(p).tokenizer("USER: hi")["input_ids"] for p in (out, paths["ft"])]
    assert ids[0] == ids[1]


def test_overwrite_replaces_only_after_success(families, tmp_path):
    paths = families["llava", "original"]
    cfg = write_config(tmp_path / "m.yaml", paths, "linear", {"lam": 0.25})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    assert run(main, [str(cfg), str(tmp_path / "out"), "--no-progress", "--overwrite"]) == 0
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "cgm_merge.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "out", "sha256-cache.json"]


def test_verification_catches_a_wrong_tensor_outside_the_merge_set(families, tmp_path, monkeypatch, capsys):
    from cgm_min.io.writer import ShardWriter
    paths = families["llava", "original"]
    cfg = write_config(tmp_path / "m.yaml", paths, "linear", {"lam": 0.25})

    def wrong_copy(self, name, src_fd, src_offset, *src_dfd):   # writes zeros instead of copying the bytes
        n = self.offsets[name][1] - self.offsets[name][0]
        return self.write_tensor(name, torch.zeros(n // 4))
    monkeypatch.setattr(ShardWriter, "copy_tensor", wrong_copy)
    assert run(main, [str(cfg), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "is outside the merge set but differs from fine_tuned" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_transformers_check_reports_renamed_keys(families, tmp_path):
    from cgm_min.io.merge_checkpoints import transformers_load_check
    src = families["qwen", "original"]["ft"]
    shutil.copytree(src, tmp_path / "m")
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight_renamed"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    report = transformers_load_check(tmp_path / "m")
    assert report["checked"] and report["missing_keys"] == ["model.language_model.layers.0.mlp.up_proj.weight"]
    assert len(report["unexpected_keys"]) == 1


def test_input_hashes_are_remembered_until_a_file_changes(families, tmp_path, monkeypatch):
    from cgm_min.io import merge_checkpoints as mc
    paths = families["qwen", "original"]
    cfg = write_config(tmp_path / "m.yaml", paths, "linear", {"lam": 0.5}, PRESET["qwen"])
    first = merge_checkpoints(cfg, tmp_path / "a", progress=False, log=lambda *_: None)
    assert (tmp_path / "sha256-cache.json").is_file()
    hashed = []
    real = mc.sha256_fd
    monkeypatch.setattr(mc, "sha256_fd", lambda fd, **kw: hashed.append(fd) or real(fd, **kw))
    second = merge_checkpoints(cfg, tmp_path / "b", progress=False, log=lambda *_: None)
    # outputs only, and of those not the weight shards: they are hashed as they are written
    files = [n for n in second["outputs"] if not n.endswith(".safetensors")]
    assert second["inputs"] == first["inputs"] and len(hashed) == len(files)
    os.utime(paths["ft"] / "config.json", ns=(1, 1))                                        # touched: hashed again
    hashed.clear()
    merge_checkpoints(cfg, tmp_path / "c", progress=False, log=lambda *_: None)
    assert len(hashed) == len(files) + 1


def test_curvature_then_merge_hash_each_model_file_once(tmp_path, monkeypatch):
    """The chain's hashing: write_curvature(hash_cache=True) hashes the models through cgm-merge's cache; the
    folder is then renamed (as the chain renames a finished step) and hash_cache_moved keeps the hashes, so
    the merge reads neither model's weights for their hashes again, and records the same hashes."""
    from cgm_min.io import merge_checkpoints as mc
    from cgm_min.io.curvature_files import read_curvature_metadata, write_curvature
    stage, final = tmp_path / ".step.partial", tmp_path / "step"
    paths = make_family(stage, "llava")
    hashed = []
    real = mc.sha256_fd
    monkeypatch.setattr(mc, "sha256_fd", lambda fd, **kw: hashed.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real(fd, **kw))
    for role, model in (("h_pt", "pt"), ("h_ft", "ft")):
        h = load_file(paths[role] / "model.safetensors")
        write_curvature(h, paths[model], stage / f"{role}-cached", {"kind": role}, hash_cache=True)
    weights = {m: paths[m] / "model.safetensors" for m in ("pt", "ft")}
    assert sorted(hashed) == sorted(str(w) for w in weights.values())        # each model once
    stage.rename(final)
    assert mc.hash_cache_moved(stage, final) == 2
    moved = {k: final / v.relative_to(stage) for k, v in paths.items()}
    hashed.clear()
    cfg = write_config(tmp_path / "m.yaml", {**moved, "h_pt": final / "h_pt-cached", "h_ft": final / "h_ft-cached"},
                       "cgm", {"alpha": 0.5}, PRESET["llava"])
    rec = merge_checkpoints(cfg, tmp_path / "merged", progress=False, log=lambda *_: None)
    assert hashed and not set(hashed) & {str(moved[m] / "model.safetensors") for m in ("pt", "ft")}
    for model, role in (("pt", "pre_trained"), ("ft", "fine_tuned")):
        digest = rec["inputs"][role]["files"]["model.safetensors"]["sha256"]
        assert digest == sha256_file(moved[model] / "model.safetensors")
        meta = read_curvature_metadata(final / ("h_pt-cached" if model == "pt" else "h_ft-cached"))
        assert meta["model_files"] == {"model.safetensors": digest}


def test_presets_select_what_merge_param_names_selects(models):
    from cgm_min.world import models as mm
    assert mm.LAYER_PREFIX == LAYER_PREFIX
    assert {mm.MODEL_TYPE[f]: p for f, p in mm.PROJECTOR_PREFIX.items()} == PROJECTOR_PREFIX
    for family, preset in (("llava", "llava-1.5"), ("qwen", "qwen2.5-vl")):
        model = models[family]
        names = [n for n, _ in model.named_parameters()]
        for k in (0, 1, 2):
            assert MergeSet(preset=preset, last_layers=k).resolve(MODEL_TYPE[family], names) == \
                mm.merge_param_names(model, k)
        with pytest.raises(ValueError, match="set merge_set.last_layers"):
            MergeSet(preset=preset).resolve(MODEL_TYPE[family], names)       # 12 / 6 of 2 layers: refused
        other = "qwen2.5-vl" if preset == "llava-1.5" else "llava-1.5"
        with pytest.raises(ValueError, match="is for"):
            MergeSet(preset=other, last_layers=1).resolve(MODEL_TYPE[family], names)
    # the paper's counts on full-depth names, in both LLaVA layouts
    stored = [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(32)] + \
        ["multi_modal_projector.linear_1.weight", "language_model.lm_head.weight"]
    canonical = [canonical_name("llava", n) for n in stored]
    chosen = MergeSet(preset="llava-1.5").resolve("llava", canonical)
    assert len(chosen) == 13 and chosen[0] == "model.language_model.layers.20.mlp.up_proj.weight"


def test_dry_run_prints_the_plan_and_writes_nothing(families, tmp_path, capsys):
    paths = families["llava", "original"]
    cfg = write_config(tmp_path / "m.yaml", paths, "cgm", {"alpha": 0.5})
    before = sorted(os.listdir(tmp_path))
    assert run(main, [str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "22 of 82 tensors" in text and "estimate" in text and "peak memory" in text
    assert "merge  language_model.model.layers.3.mlp.up_proj.weight" in text
    assert sorted(os.listdir(tmp_path)) == before


def test_curvature_subcommand_writes_the_model_layout(tmp_path):
    from cgm_min.world.models import shipped_checkpoint
    from cgm_min.io.curvature_files import measure_curvature, read_curvature_metadata
    src = shipped_checkpoint("qwen")
    argv = ["curvature", "--model", str(src), "--tasks", "colour,count", "--n-per-task", "2", "--n-layers", "1",
            "--out", str(tmp_path / "h")]
    assert run(main, argv) == 0
    meta = read_curvature_metadata(tmp_path / "h")
    assert meta["kind"] == "h_ft" and meta["samples"] == 4 and len(meta["model_sha256"]) == 64
    stored = load_file(tmp_path / "h" / "model.safetensors")
    assert all(not n.startswith("model.language_model.") for n in stored)        # the model's own (original) names
    h, _ = measure_curvature(src, ("colour", "count"), 2, 1)
    assert set(h) == {canonical_name("qwen2_5_vl", n) for n in stored}
    assert all(torch.equal(stored[n], h[canonical_name("qwen2_5_vl", n)]) for n in stored)
    assert run(main, argv) == 2                                                    # exists: refused
    # the model's file hashes are remembered for the merge that follows (the per-test hash cache)
    cache = json.loads(Path(os.environ["CGM_MERGE_HASH_CACHE"]).read_text())
    weights = [os.path.realpath(p) for p in Path(src).glob("*.safetensors")]
    assert weights and set(weights) <= set(cache), cache
    from cgm_min.io.writer import sha256_file
    assert all(cache[w][4] == sha256_file(w) for w in weights)


def test_hub_ids_resolve_from_the_local_cache_only(families, tmp_path, monkeypatch):
    paths = families["llava", "original"]
    cache = tmp_path / "hub"
    snap = cache / "models--someone--mini-llava" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    os.symlink(paths["pt"], snap)
    (cache / "models--someone--mini-llava" / "refs").mkdir()
    (cache / "models--someone--mini-llava" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    cfg = write_config(tmp_path / "m.yaml", {**paths, "pt": "someone/mini-llava"}, "linear", {"lam": 0.5})
    plan = plan_merge(load_config(cfg))
    assert Path(os.path.realpath(plan.paths["pre_trained"])) == Path(os.path.realpath(paths["pt"]))
    plan.close()
    cfg = write_config(tmp_path / "n.yaml", {**paths, "pt": "someone/not-cached"}, "linear", {"lam": 0.5})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        plan_merge(load_config(cfg))


def test_console_script_error_contract(families, tmp_path):
    """The installed console script (one process start; the success path runs in-process above)."""
    exe = Path(sys.executable).parent / "cgm-merge"
    paths = families["qwen", "in-memory"]
    cfg = write_config(tmp_path / "m.yaml", paths, "magnitude", {"k": 1.5}, PRESET["qwen"])
    bad = subprocess.run([str(exe), str(cfg), str(tmp_path / "out")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr and "k must be in [0, 1]" in bad.stderr and not (tmp_path / "out").exists()
    # success: the script ends without the interpreter's teardown, its piped output flushed, OUT_DIR complete
    cfg = write_config(tmp_path / "ok.yaml", paths, "linear", {"lam": 0.5}, PRESET["qwen"])
    good = subprocess.run([str(exe), str(cfg), str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.startswith("merged ") and "verified" in good.stdout, good.stderr
    assert json.loads((tmp_path / "out" / "cgm_merge.json").read_text())["tool"] == "cgm-merge"
