"""Writing safetensors shard by shard, with an index file as `save_pretrained` writes it.

A shard is written front to back: the header first (every offset is known from the planned dtypes and
shapes), then each tensor's bytes in header order, straight from the tensor's memory (`write_tensor`) or
from another file by `copy_file_range` (`copy_tensor`, for tensors that pass through unchanged). Nothing is
held beyond the tensor being written. The files go into an `AtomicOutputDir`, so a shard is never seen half
written.

    entries = [("a.weight", "BF16", (4, 8)), ("a.bias", "F32", (4,))]
    with ShardWriter(fd, entries, metadata={"format": "pt"}) as w:
        w.write_tensor("a.weight", t1)
        w.copy_tensor("a.bias", src_fd, src_offset)

`build_header(entries, metadata)` gives the header bytes (8-byte length + JSON padded with spaces to a
multiple of 8, as the safetensors library writes it); `index_json(weight_map, total_size)` the index.
`write_tensors(out, tensors, shard_of)` writes a whole dict (fixtures, curvature files).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import torch

from .reader import DTYPES, dtype_code


def build_header(entries: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None,
                 ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes, {name: (begin, end) data offsets}) for tensors stored in the order of `entries`."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = {}, 0
    for name, code, shape in entries:
        n = DTYPES[code][1]
        for d in shape:
            n *= int(d)
        offsets[name] = (pos, pos + n)
        header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor's elements in row-major order (a view when it is contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_all(fd: int, data: memoryview) -> None:
    """os.write until every byte is written (a full disk raises OSError ENOSPC)."""
    done, n = 0, len(data)
    while done < n:
        done += os.write(fd, data[done:done + (1 << 30)])


class ShardWriter:
    """Writes one safetensors file into the open file descriptor `fd`, tensor by tensor, in the order of
    `entries` ((name, dtype code, shape) triples). `header` may be given verbatim (the header of a file
    with the same entries and offsets, e.g. the fine-tuned model's shard when dtypes are unchanged)."""

    def __init__(self, fd: int, entries: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, header: bytes | None = None, name: str = "shard"):
        self.fd, self.name = fd, name
        built, self.offsets = build_header(entries, metadata)
        self.header = header if header is not None else built
        self.order = [e[0] for e in entries]
        self.codes = {e[0]: e[1] for e in entries}
        self.next = self._size = self._left = self._start = 0
        write_all(fd, memoryview(self.header))

    def begin(self, name: str) -> int:
        """Start the next tensor (it must be the next in header order); returns its size in bytes. Its bytes
        then come in any number of `write` calls, and `end` checks that all of them came."""
        if self.next >= len(self.order) or self.order[self.next] != name:
            want = self.order[self.next] if self.next < len(self.order) else "nothing more"
            raise RuntimeError(f"{self.name}: tensors must be written in header order; got {name!r}, expected {want!r}")
        begin, end = self.offsets[name]
        self.next += 1
        self._size = self._left = end - begin
        self._start = len(self.header) + begin
        return self._size

    def write(self, data: memoryview) -> None:
        if len(data) > self._left:
            raise RuntimeError(f"{self.name}: {self.order[self.next - 1]!r} gets more bytes than the header says")
        write_all(self.fd, data)
        self._left -= len(data)

    def end(self) -> None:
        if self._left:
            raise RuntimeError(f"{self.name}: {self.order[self.next - 1]!r} is {self._left} bytes short")

    def rewind(self) -> None:
        """Write the current tensor again from its first byte."""
        os.lseek(self.fd, self._start, os.SEEK_SET)
        self._left = self._size

    def write_tensor(self, name: str, t: torch.Tensor) -> int:
        """Write the next tensor from memory; its dtype and size must match the header."""
        n = self.begin(name)
        if dtype_code(t.dtype) != self.codes[name] or t.numel() * t.element_size() != n:
            raise RuntimeError(f"{self.name}: {name!r} is {t.dtype} with {t.numel()} elements, the header says "
                               f"{self.codes[name]} and {n} bytes")
        self.write(tensor_bytes(t))
        self.end()
        return n

    def copy_tensor(self, name: str, src_fd: int, src_offset: int) -> int:
        """Write the next tensor by copying its bytes from another file (kernel-side copy_file_range)."""
        n = self.begin(name)
        done = 0
        try:
            while done < n:
                got = os.copy_file_range(src_fd, self.fd, n - done, src_offset + done)
                if got <= 0:
                    raise ValueError(f"{self.name}: unexpected end of the source file while copying {name!r}")
                done += got
        except OSError as err:
            if err.errno not in (18, 22, 38, 95) or done:     # EXDEV EINVAL ENOSYS EOPNOTSUPP: fall back
                raise
            buf = bytearray(min(n, 64 << 20))
            view = memoryview(buf)
            while done < n:
                k = os.preadv(src_fd, [view[:min(len(buf), n - done)]], src_offset + done)
                if k <= 0:
                    raise ValueError(f"{self.name}: unexpected end of the source file while copying {name!r}")
                write_all(self.fd, view[:k])
                done += k
        self._left = 0
        return n

    def close(self) -> None:
        self.end()
        if self.next != len(self.order):
            raise RuntimeError(f"{self.name}: {len(self.order) - self.next} tensors were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()


def index_json(weight_map: Mapping[str, str], total_size: int, metadata: Mapping | None = None) -> str:
    """The text of a `model.safetensors.index.json` (metadata.total_size = bytes of tensor data)."""
    meta = {**(metadata or {}), "total_size": int(total_size)}
    return json.dumps({"metadata": meta, "weight_map": dict(weight_map)}, indent=2) + "\n"


def write_tensors(out, tensors: Mapping[str, torch.Tensor], shard_of: Mapping[str, str] | None = None,
                  metadata: Mapping[str, str] | None = None, index_name: str = "model.safetensors.index.json"
                  ) -> list[str]:
    """Write `tensors` (a mapping; values are fetched one at a time, in order) into files of an
    AtomicOutputDir `out`: into `shard_of[name]` files plus an index file, or one `model.safetensors` when
    `shard_of` is None. Returns the file names written."""
    files: dict[str, list[str]] = {}
    for name in tensors:
        files.setdefault(shard_of[name] if shard_of else "model.safetensors", []).append(name)
    total, written = 0, []
    for fname, names in files.items():
        entries = []
        for n in names:
            t = tensors[n]
            entries.append((n, dtype_code(t.dtype), tuple(t.shape)))
        fd = out.create(fname)
        with ShardWriter(fd, entries, metadata, name=fname) as w:
            for n in names:
                total += w.write_tensor(n, tensors[n])
        written.append(fname)
    if shard_of:
        out.write_text(index_name, index_json({n: shard_of[n] for n in tensors}, total))
        written.append(index_name)
    return written


def sha256_fd(fd: int, block: int = 8 << 20, stop=None) -> str | None:
    """SHA-256 of a whole open file (read with pread into one reused buffer; the offset is not moved).
    `stop`: a threading.Event that abandons the hash (returns None) when set."""
    h, buf = hashlib.sha256(), bytearray(block)
    view, pos = memoryview(buf), 0
    while True:
        if stop is not None and stop.is_set():
            return None
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            return h.hexdigest()
        h.update(view[:n])
        pos += n


def sha256_file(path: str | os.PathLike) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)
