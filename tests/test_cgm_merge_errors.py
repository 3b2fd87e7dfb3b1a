"""Bad input to cgm-merge: every case is refused with one line "error: ...", exit status 2, nothing written
beside the output folder, and the inputs unchanged."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cgm_min.cli import run
from cgm_min.cli.merge import main
from cgm_min.io import writer
from cgm_min.io.writer import sha256_file

from cgm_merge_fixtures import make_family, make_sharded_llama, write_config
from cgm_merge_fixtures import private_hash_cache  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"llava": make_family(root / "llava", "llava"), "llama": make_sharded_llama(root / "llama")}


def fresh(pristine, tmp_path, which="llava") -> dict[str, Path]:
    """A private copy of the inputs, free to be damaged."""
    src = pristine[which]
    root = Path(os.path.commonpath([str(p) for p in src.values()]))
    shutil.copytree(root, tmp_path / "in")
    return {k: tmp_path / "in" / Path(v).relative_to(root) for k, v in src.items()}


def hashes(folder: Path) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def edit(path: Path, change) -> None:
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def first(sd: dict, part: str) -> str:
    return next(n for n in sd if part in n)


def refused(tmp_path, capsys, argv_cfg, expect: str, out: Path | None = None, monkeypatch=None) -> str:
    out = out or tmp_path / "merged"
    before_listing = sorted(os.listdir(out.parent)) if out.parent.exists() else None
    before = hashes(tmp_path / "in") if (tmp_path / "in").exists() else {}
    code = run(main, [str(argv_cfg), str(out), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and expect in lines[0], lines[0]
    if before_listing is not None:
        assert sorted(os.listdir(out.parent)) == before_listing          # no output, no staging folder left
    if before:
        assert hashes(tmp_path / "in") == before                          # inputs untouched
    return lines[0]


# Each case damages a private copy of the inputs and/or writes a config; returns (config, expected text).
def case_missing_folder(p, t):
    return write_config(t / "m.yaml", {**p, "pt": t / "nope"}), "no such file or folder"


def case_missing_config(p, t):
    return t / "absent.yaml", "no config file"


def case_missing_curvature(p, t):
    shutil.rmtree(p["h_ft"])
    return write_config(t / "m.yaml", p), "curvature.fine_tuned: no such file or folder"


def case_corrupt_safetensors(p, t):
    f = p["ft"] / "model.safetensors"
    f.write_bytes(b"\x07" * 64 + f.read_bytes()[64:])
    return write_config(t / "m.yaml", p), "not a safetensors file"


def case_truncated_safetensors(p, t):
    f = p["pt"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return write_config(t / "m.yaml", p), "truncated"


def case_shard_missing_from_index(p, t):
    shard = sorted(p["ft"].glob("model-*.safetensors"))[1]
    shard.unlink()
    return write_config(t / "m.yaml", p, merge_set={"patterns": ["model.layers.1.*"]}), f"shard {shard.name} listed in"


def case_mismatched_names(p, t):
    edit(p["ft"] / "model.safetensors", lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)))
    return write_config(t / "m.yaml", p), "hold different tensors"


def case_mismatched_shapes(p, t):
    edit(p["ft"] / "model.safetensors", lambda sd: sd.__setitem__(first(sd, "layers.0.mlp.up"), torch.zeros(3, 3)))
    return write_config(t / "m.yaml", p), "shape [336, 128] in pre_trained but [3, 3] in fine_tuned"


def case_mismatched_dtypes(p, t):
    def change(sd):
        n = first(sd, "norm.weight")
        sd[n] = sd[n].half()
    edit(p["ft"] / "model.safetensors", change)
    return write_config(t / "m.yaml", p), "dtype F32 in pre_trained but F16 in fine_tuned"


def _curvature(p, t, value, role="h_pt", params=None):
    def change(sd):
        n = first(sd, "layers.3.mlp.up")
        if value == "zero":
            sd[n] = torch.zeros_like(sd[n])
        elif value == "shape":
            sd[n] = torch.ones(5)
        else:
            sd[n][7, 3] = value
    edit(p[role] / "model.safetensors", change)
    return write_config(t / "m.yaml", p, parameters=params or {"alpha": 0.5})


def case_curvature_nan(p, t):
    return _curvature(p, t, float("nan")), "h_pt contains NaN or Inf"


def case_curvature_inf(p, t):
    return _curvature(p, t, float("inf"), "h_ft"), "h_ft contains NaN or Inf"


def case_curvature_nan_normalised_alpha(p, t):
    return _curvature(p, t, float("nan"), params={"alpha_normalised": 1.0}), "contains NaN or Inf"


def case_curvature_negative(p, t):
    return _curvature(p, t, -1e-3), "h_pt has negative entries"


def case_curvature_all_zero(p, t):
    return _curvature(p, t, "zero", "h_ft"), "h_ft is zero everywhere"


def case_curvature_wrong_shape(p, t):
    return _curvature(p, t, "shape"), "has shape [5] but the model's tensor has [336, 128]"


def case_curvature_does_not_cover(p, t):
    return (write_config(t / "m.yaml", p, merge_set={"patterns": ["model.language_model.layers.1.*"]}),
            "does not cover the merge set")


def case_weights_nan(p, t):
    def change(sd):
        sd[first(sd, "layers.2.mlp.down")][0, 0] = float("nan")
    edit(p["ft"] / "model.safetensors", change)
    return write_config(t / "m.yaml", p), "w_ft contains NaN or Inf"


def case_alpha_out_of_range(p, t):
    return write_config(t / "m.yaml", p, parameters={"alpha": -1.0}), "alpha must be in [0, inf)"


def case_k_out_of_range(p, t):
    return write_config(t / "m.yaml", p, "cgm_dagger", {"alpha": 1.0, "k": 1.5}), "k must be in [0, 1]"


def case_unknown_method(p, t):
    return write_config(t / "m.yaml", p, "slerp", {}), "unknown method 'slerp'"


def case_method_needing_data(p, t):
    return write_config(t / "m.yaml", p, "wanda", {"k": 0.5}), "needs activations at merge time"


def case_unknown_hyperparameter(p, t):
    return write_config(t / "m.yaml", p, "linear", {"lam": 0.5, "beta": 1}), "unknown hyperparameters ['beta']"


def case_pattern_matches_nothing(p, t):
    return (write_config(t / "m.yaml", p, merge_set={"patterns": ["model.language_model.layers.*", "decoder.*"]}),
            "pattern 'decoder.*' matches no tensor")


def case_preset_deeper_than_model(p, t):
    return write_config(t / "m.yaml", p, merge_set={"preset": "llava-1.5"}), "merges the last 12 decoder layers"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused(pristine, tmp_path, capsys, name):
    which = "llama" if name == "shard_missing_from_index" else "llava"
    paths = fresh(pristine, tmp_path, which)
    cfg, expect = CASES[name](paths, tmp_path)
    refused(tmp_path, capsys, cfg, expect)


def test_existing_output_folder(pristine, tmp_path, capsys):
    paths = fresh(pristine, tmp_path)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    refused(tmp_path, capsys, write_config(tmp_path / "m.yaml", paths), "exists; pass --overwrite")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"


def test_output_inside_an_input(pristine, tmp_path, capsys):
    paths = fresh(pristine, tmp_path)
    refused(tmp_path, capsys, write_config(tmp_path / "m.yaml", paths), "overlaps the fine_tuned input",
            out=paths["ft"] / "merged")


def test_full_disk_while_writing(pristine, tmp_path, capsys, monkeypatch):
    """The disk fills up in the middle of the weights: ENOSPC from the writer."""
    paths = fresh(pristine, tmp_path)
    real, calls = writer.pwrite_all, []
    monkeypatch.setattr(writer, "STAGE_BYTES", writer.PAGE)    # a write every page

    def filling(fd, data, offset):
        calls.append(len(data))
        if len(calls) > 10:                       # the header and the first pages of tensors made it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    monkeypatch.setattr(writer, "pwrite_all", filling)
    refused(tmp_path, capsys, write_config(tmp_path / "m.yaml", paths), "No space left on device")
    assert len(calls) > 10


def test_full_disk_before_writing(pristine, tmp_path, capsys, monkeypatch):
    paths = fresh(pristine, tmp_path)
    real = os.statvfs

    def almost_full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, 10, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))
    monkeypatch.setattr(os, "statvfs", almost_full)
    refused(tmp_path, capsys, write_config(tmp_path / "m.yaml", paths), "not enough free space")


def test_bad_curvature_in_a_later_block(pristine, tmp_path, capsys, monkeypatch):
    """Tensors streamed in blocks of 1000 entries: NaN in the sixth block of a tensor, after five were
    written, is refused like any other."""
    from cgm_min.io import streaming
    monkeypatch.setattr(streaming, "BLOCK", 1000)
    paths = fresh(pristine, tmp_path, "llama")
    shard = next(f for f in sorted(paths["h_ft"].glob("*.safetensors"))
                 if "model.layers.2.mlp.down_proj.weight" in load_file(f))

    def change(sd):
        sd["model.layers.2.mlp.down_proj.weight"].view(-1)[5555] = float("nan")
    edit(shard, change)
    cfg = write_config(tmp_path / "m.yaml", paths, parameters={"alpha": 0.5},
                       merge_set={"patterns": ["model.layers.2.*"]})
    refused(tmp_path, capsys, cfg, "h_ft contains NaN or Inf")
