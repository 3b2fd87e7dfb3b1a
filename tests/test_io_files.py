"""cgm_min.io: the safetensors reader against the safetensors library, the shard writer, the atomic output
folder (kill -9 included)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cgm_min.io import AtomicOutputDir, Checkpoint, ShardWriter, build_header, write_tensors
from cgm_min.io.reader import Buffer, SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]


def some_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.f32": torch.randn(3, 5, generator=g), "a.bf16": torch.randn(7, generator=g).bfloat16(),
        "b.f16": torch.randn(2, 2, 2, generator=g).half(), "b.f64": torch.randn(4, generator=g).double(),
        "c.i64": torch.arange(6).reshape(2, 3), "c.i8": torch.arange(-3, 3, dtype=torch.int8),
        "c.u8": torch.arange(5, dtype=torch.uint8), "c.bool": torch.tensor([True, False, True]),
        "d.scalar": torch.tensor(2.5), "d.empty": torch.zeros(0, 4),
    }


def test_reader_matches_safetensors_library(tmp_path):
    ts = some_tensors()
    save_file(ts, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    with Checkpoint(tmp_path / "x.safetensors") as ck:
        assert set(ck.names) == set(ts) and ck.metadata == {"format": "pt", "k": "v"} and not ck.sharded
        for name, t in ts.items():
            got = ck.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        view = ck.read("a.f32")
        own = ck.read("a.f32", copy=True)
        ck.read("b.f64")                          # a view is overwritten by the next read, a copy is not
        assert torch.equal(own, ts["a.f32"]) and view.data_ptr() == ck.buffer.data.data_ptr()


def test_written_shards_load_with_safetensors_and_the_reader(tmp_path):
    ts = some_tensors(1)
    shard_of = {n: ("model-00001-of-00002.safetensors" if n < "c" else "model-00002-of-00002.safetensors")
                for n in ts}
    with AtomicOutputDir(tmp_path / "m") as out:
        written = write_tensors(out, ts, shard_of, {"format": "pt"})
    assert sorted(written) == sorted(set(shard_of.values()) | {"model.safetensors.index.json"})
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == shard_of
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    for shard in set(shard_of.values()):
        with safe_open(str(tmp_path / "m" / shard), framework="pt") as f:
            for n in f.keys():
                assert torch.equal(f.get_tensor(n), ts[n])
    with Checkpoint(tmp_path / "m") as ck:
        assert ck.sharded and set(ck.names) == set(ts)
        assert all(torch.equal(ck.read(n), ts[n]) for n in ts)


def test_header_is_safetensors_compatible_and_writer_checks_order(tmp_path):
    entries = [("w", "BF16", (4, 8)), ("b", "F32", (4,))]
    header, offsets = build_header(entries, {"format": "pt"})
    assert len(header) % 8 == 0 and offsets == {"w": (0, 64), "b": (64, 80)}
    fd = os.open(tmp_path / "s.safetensors", os.O_CREAT | os.O_RDWR)
    w = ShardWriter(fd, entries, {"format": "pt"})
    with pytest.raises(RuntimeError, match="header order"):
        w.write_tensor("b", torch.zeros(4))
    with pytest.raises(RuntimeError, match="header says"):
        w.write_tensor("w", torch.zeros(4, 8))               # float32, the header says BF16
    os.close(fd)


CORRUPT = {
    "truncated": lambda raw: raw[:-10],
    "garbage": lambda raw: b"\x00" * 16 + raw,
    "header-not-json": lambda raw: raw[:8] + b"{" * 8 + raw[16:],
    "header-length-huge": lambda raw: (1 << 40).to_bytes(8, "little") + raw[8:],
    "empty": lambda raw: b"",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_or_truncated_files_are_one_line_errors(tmp_path, kind):
    save_file(some_tensors(), tmp_path / "ok.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(CORRUPT[kind]((tmp_path / "ok.safetensors").read_bytes()))
    with pytest.raises(ValueError) as e:
        Checkpoint(bad, "fine_tuned")
    assert "\n" not in str(e.value) and "bad.safetensors" in str(e.value)


def _header_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, why", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "bytes for shape"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "truncated"),
])
def test_inconsistent_headers(tmp_path, header, why):
    with pytest.raises(ValueError, match=why):
        SafetensorsFile(_header_file(tmp_path / "h.safetensors", header, b"\x00" * 12))


def _sharded(tmp_path) -> Path:
    ts = some_tensors(2)
    shard_of = {n: ("s1.safetensors" if n < "c" else "s2.safetensors") for n in ts}
    with AtomicOutputDir(tmp_path / "m") as out:
        write_tensors(out, ts, shard_of)
    return tmp_path / "m"


def test_index_problems(tmp_path):
    m = _sharded(tmp_path)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    (m / "s2.safetensors").rename(m / "away.safetensors")
    with pytest.raises(FileNotFoundError, match="shard s2.safetensors listed in"):
        Checkpoint(m)
    (m / "away.safetensors").rename(m / "s2.safetensors")
    wm = dict(index["weight_map"], **{"a.f32": "s2.safetensors"})
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match="puts 'a.f32' in s2.safetensors"):
        Checkpoint(m)
    wm = {k: v for k, v in index["weight_map"].items() if k != "c.u8"}
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match="missing from model.safetensors.index.json"):
        Checkpoint(m)
    (m / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Checkpoint(m)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        Checkpoint(tmp_path / "nowhere")


def test_direct_reads_equal_buffered_reads(tmp_path, monkeypatch):
    """read_range around the page cache (O_DIRECT where the file system has it) returns the same bytes as a
    pread, for ranges that start and end anywhere; the buffer's memory is page aligned."""
    from cgm_min.io import reader
    monkeypatch.setattr(reader, "MIN_DIRECT", 0)
    monkeypatch.setattr(reader, "is_cached", lambda fd, offset, nbytes: False)
    data = torch.randint(0, 256, (3 * reader.PAGE + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    (tmp_path / "f").write_bytes(data.numpy().tobytes())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    dfd = reader.open_direct(tmp_path / "f")
    buf = Buffer()
    try:
        for off, n in [(0, 10), (8, reader.PAGE), (reader.PAGE - 8, 16), (16, 3 * reader.PAGE + 107), (0, len(data)),
                       (2 * reader.PAGE, reader.PAGE + 123)]:
            head = reader.read_range(fd, dfd, buf, off, n)
            assert buf.data.data_ptr() % reader.PAGE == 0
            assert torch.equal(buf.data[head:head + n], data[off:off + n]), (off, n)
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)


def test_staged_writer_equals_safetensors_and_hashes_what_it_wrote(tmp_path, monkeypatch):
    """Stages of one page, tensors of odd sizes, a copied tensor and a rewound one: the file is byte for byte
    its header and the tensors' bytes (and safetensors reads it); the hash made while writing is the file's (None after a rewind)."""
    import hashlib
    from cgm_min.io import writer
    monkeypatch.setattr(writer, "STAGE_BYTES", writer.PAGE)
    ts = {"a": torch.randn(1000), "b": torch.randn(3001).bfloat16(), "c": torch.arange(7, dtype=torch.int64)}
    save_file(ts, tmp_path / "ref.safetensors")
    entries = [(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype], tuple(t.shape))
               for n, t in ts.items()]
    ref = build_header(entries)[0] + b"".join(writer.tensor_bytes(t).tobytes() for t in ts.values())
    src = SafetensorsFile(tmp_path / "ref.safetensors")
    for rewind in (False, True):
        fd = os.open(tmp_path / f"w{rewind}", os.O_CREAT | os.O_RDWR)
        with ShardWriter(fd, entries) as w:
            w.write_tensor("a", ts["a"])
            w.begin("b")
            w.write(writer.tensor_bytes(ts["b"])[:1001])
            if rewind:
                w.rewind()
                w.write(writer.tensor_bytes(torch.zeros(3001).bfloat16()))
                w.rewind()
                w.write(writer.tensor_bytes(ts["b"])[:1001])
            w.write(writer.tensor_bytes(ts["b"])[1001:])
            w.end()
            w.copy_tensor("c", src.fd, src.infos["c"].start)
        os.close(fd)
        assert (tmp_path / f"w{rewind}").read_bytes() == ref
        with safe_open(str(tmp_path / f"w{rewind}"), framework="pt") as f:
            assert all(torch.equal(f.get_tensor(n), t) for n, t in ts.items())
        assert w.sha256() == (None if rewind else hashlib.sha256(ref).hexdigest())
    src.close()


def test_buffer_grows_and_is_reused():
    b = Buffer(100)
    ptr = b.data.data_ptr()
    b.reserve(50)
    assert b.data.data_ptr() == ptr
    b.reserve(1000)
    assert b.data.numel() == 1000 and b.tensor(8, torch.float32, (2,)).shape == (2,)


# ----------------------------------------------------------------------------------------------
# The atomic output folder.

def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_commits_whole_or_nothing(tmp_path):
    before = listing(tmp_path)
    with pytest.raises(RuntimeError):
        with AtomicOutputDir(tmp_path / "deep" / "out") as out:
            out.write_text("a.txt", "x")
            out.stage()
            raise RuntimeError("boom")
    assert listing(tmp_path) == before                       # no out, no staging, no created parents
    with AtomicOutputDir(tmp_path / "out") as out:
        out.write_text("a.txt", "x")
        assert not (tmp_path / "out").exists()
    assert listing(tmp_path / "out") == ["a.txt"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        AtomicOutputDir(tmp_path / "out")
    with AtomicOutputDir(tmp_path / "out", overwrite=True) as out:
        out.write_text("b.txt", "y")
    assert listing(tmp_path / "out") == ["b.txt"] and listing(tmp_path) == before + ["out"]


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from cgm_min.io import AtomicOutputDir
    out = AtomicOutputDir(sys.argv[1])
    fd = out.create("model.safetensors")
    os.write(fd, b"x" * 100000)
    if sys.argv[2] == "staged":
        out.stage()
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("when", ["writing", "staged"])
def test_kill_9_leaves_nothing_half_written(tmp_path, when):
    script = tmp_path / "k.py"
    script.write_text(KILLED.format(root=str(ROOT)))
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, str(script), str(work / "out"), when], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    left = listing(work)
    if when == "writing":
        assert left == []                                     # O_TMPFILE: unnamed files die with the process
    else:                                                      # killed while verifying: complete files, hidden
        assert left and all(n.startswith(".out.cgm-tmp-") for n in left)
        with AtomicOutputDir(work / "out") as out:            # the next run removes the stale staging folder
            out.write_text("a", "b")
        assert listing(work) == ["out"]


def test_atomic_dir_takes_a_tree(tmp_path):
    """tree(): a named staging folder that takes folders and files by path and another writer's atomic
    folder, alongside files made with create(); committed whole, or removed on an error. A fixed staging
    name (shared by processes) is cleared of what an interrupted run left; a bad one is refused."""
    (tmp_path / ".out.partial" / "old").mkdir(parents=True)          # an interrupted run's leftovers
    with AtomicOutputDir(tmp_path / "out", staging_name=".out.partial") as out:
        folder = out.tree()
        assert folder == tmp_path / ".out.partial" and listing(folder) == []
        (folder / "a" / "b").mkdir(parents=True)
        (folder / "a" / "b" / "c.json").write_text("{}")
        with AtomicOutputDir(folder / "inner") as inner:
            inner.write_text("x.txt", "x")
        out.write_text("top.txt", "t")
        assert not (tmp_path / "out").exists()
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["a", "inner", "top.txt"]
    assert (tmp_path / "out" / "a" / "b" / "c.json").read_text() == "{}"
    assert (tmp_path / "out" / "inner" / "x.txt").read_text() == "x"
    with pytest.raises(RuntimeError):
        with AtomicOutputDir(tmp_path / "two") as out:
            (out.tree() / "sub").mkdir()
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["out"]
    for bad in ("partial", "a/.b", ".."):
        with pytest.raises(ValueError, match="staging_name"):
            AtomicOutputDir(tmp_path / "three", staging_name=bad)
