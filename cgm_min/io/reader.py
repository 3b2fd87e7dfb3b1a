"""Lazy per-tensor reading of safetensors checkpoints: one file, or a folder sharded with an index file.

The header (8-byte little-endian length + JSON) is parsed here, not by the safetensors library, so that
every tensor can be read with one `os.preadv` straight into a buffer that is reused across tensors: no
mmap page faults in 4 KiB steps, no fresh allocation per tensor (fresh memory costs about 3 GB/s on the
project's machine class, reused memory runs at memory bandwidth; see the book's merging page).

    ckpt = Checkpoint("llava-1.5-7b-hf")          # folder with model.safetensors.index.json, or one file
    ckpt.names                                    # tensor names, in file and offset order
    ckpt.info("lm_head.weight")                   # TensorInfo: dtype, shape, file, byte range
    w = ckpt.read("lm_head.weight")               # a view into the reader's buffer, valid until next read
    w = ckpt.read("lm_head.weight", copy=True)    # a tensor of its own

Reads that the page cache cannot serve go around it: when a range is not entirely in the page cache
(`cachestat`), it is read with O_DIRECT into the page-aligned buffer, so a cold read costs no fresh page-cache
memory. On the project's machine class (a KVM guest with free page reporting) memory freed by the guest is
handed back to the host, and filling the page cache again costs about 1 us per 4 KiB page of system time:
buffered cold reads ran at 0.6 GB/s, O_DIRECT reads of the same files at 1.3-2.5 GB/s. Ranges that are cached
are read with a plain pread (10+ GB/s).

Every header is checked when the checkpoint is opened: a truncated file, a corrupt header, overlapping or
out-of-range byte ranges, a shard missing from the index, or an index that disagrees with its shards is a
one-line ValueError (FileNotFoundError for missing paths) before a single tensor is read. Files are opened
read-only and never written.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "U16": (torch.uint16, 2), "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
CODE_OF = {dt: code for code, (dt, _) in DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20          # the safetensors library refuses headers above 100 MB too
INDEX_NAMES = ("model.safetensors.index.json",)
SINGLE_NAMES = ("model.safetensors",)


def numel(shape) -> int:
    """Entries of a tensor of `shape` (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype ("BF16" for torch.bfloat16)."""
    if dtype not in CODE_OF:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return CODE_OF[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype code, shape, file, absolute byte offset and length."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


PAGE = 4096                     # alignment of O_DIRECT offsets, lengths and memory (>= any logical block size)
MIN_DIRECT = 1 << 20            # smaller reads go through the page cache: their fresh memory costs nothing much


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(k, ctypes.c_uint64) for k in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                               "nr_recently_evicted")]


_SYS_CACHESTAT = 451            # the same number on every Linux architecture (added in 6.5)
_cachestat_ok = os.name == "posix" and os.uname().sysname == "Linux"
try:
    _libc = ctypes.CDLL(None, use_errno=True) if _cachestat_ok else None
    _syscall = _libc.syscall if _libc is not None else None
except (OSError, AttributeError):
    _syscall = None


def is_cached(fd: int, offset: int, nbytes: int) -> bool | None:
    """Whether every page of bytes [offset, offset + nbytes) of `fd` is in the page cache (the cachestat
    system call); None when the kernel cannot tell (then callers read through the cache, as before)."""
    global _syscall
    if _syscall is None or nbytes <= 0:
        return None
    rng, st = _CacheStatRange(offset, nbytes), _CacheStat()
    if _syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_long(fd), ctypes.byref(rng), ctypes.byref(st),
                ctypes.c_long(0)) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _syscall = None             # not this kernel (or a sandbox forbids it): stop asking
        return None
    pages = (offset + nbytes + PAGE - 1) // PAGE - offset // PAGE
    return st.nr_cache >= pages


def open_direct(path_or_fd: str | os.PathLike | int, flags: int = os.O_RDONLY) -> int | None:
    """A new O_DIRECT file descriptor on a path (or on the file behind an open descriptor, through
    /proc/self/fd), or None where the file system or platform has no O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return None
    path = f"/proc/self/fd/{path_or_fd}" if isinstance(path_or_fd, int) else path_or_fd
    try:
        return os.open(path, flags | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


class SafetensorsFile:
    """One .safetensors file: its parsed, validated header and an O_RDONLY file descriptor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such file: {self.path}")
        if not self.path.is_file():
            raise IsADirectoryError(f"{self.path} is not a file")
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
            self.header_bytes, self.metadata, self.infos = self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def _fail(self, why: str):
        raise ValueError(f"{self.path}: {why}")

    def _parse(self):
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            self._fail(f"not a safetensors file (only {len(head)} bytes; truncated?)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > self.size:
            self._fail(f"not a safetensors file or truncated (header length {n} with a file of {self.size} bytes)")
        raw = os.pread(self.fd, n, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            self._fail("corrupt safetensors header (not valid JSON)")
        if not isinstance(header, dict):
            self._fail("corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            self._fail("corrupt safetensors header (__metadata__ must map strings to strings)")
        base, infos = 8 + n, {}
        for name, e in header.items():
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                self._fail(f"corrupt safetensors header entry for {name!r}")
            code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if code not in DTYPES:
                self._fail(f"tensor {name!r} has an unknown dtype {code!r}")
            if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                          for d in shape)):
                self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                       for o in offs) or not 0 <= offs[0] <= offs[1]):
                self._fail(f"tensor {name!r} has invalid data_offsets {offs!r}")
            info = TensorInfo(name, code, tuple(shape), self.path, base + offs[0], offs[1] - offs[0])
            if info.nbytes != info.numel * DTYPES[code][1]:
                self._fail(f"tensor {name!r}: {info.nbytes} bytes for shape {tuple(shape)} of {code}")
            if info.start + info.nbytes > self.size:
                self._fail(f"truncated: tensor {name!r} ends at byte {info.start + info.nbytes} but the file has "
                           f"{self.size} bytes")
            infos[name] = info
        ordered = sorted(infos.values(), key=lambda i: (i.start, i.nbytes))
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.start + a.nbytes:
                self._fail(f"corrupt safetensors header: tensors {a.name!r} and {b.name!r} overlap")
        return bytes(head + raw), meta, {i.name: i for i in ordered}

    _dfd: int | None = None
    _dfd_tried = False

    @property
    def dfd(self) -> int | None:
        """An O_DIRECT descriptor of the file (opened on first use), or None where there is none."""
        if not self._dfd_tried:
            self._dfd_tried = True
            self._dfd = open_direct(self.path)
        return self._dfd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None


def pread_into(fd: int, view: memoryview, offset: int, what: str = "file") -> None:
    """Fill `view` from `fd` at `offset` (os.preadv, looping over short reads)."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"{what}: unexpected end of file at byte {offset + done}")
        done += got


def read_range(fd: int, dfd: int | None, buf: "Buffer", offset: int, nbytes: int, what: str = "file") -> int:
    """Bytes [offset, offset + nbytes) of a file into `buf`; returns where they start in it (0, or
    offset % PAGE when they were read with O_DIRECT). `fd` is the file's ordinary descriptor, `dfd` an
    O_DIRECT one (or None). A range entirely in the page cache, a small one, or one that O_DIRECT cannot
    read is read through the cache; any other range is read around it (see the module docstring)."""
    head = offset % PAGE
    if dfd is None or nbytes < MIN_DIRECT or head % 8 or is_cached(fd, offset, nbytes) is not False:
        buf.reserve(nbytes)
        pread_into(fd, buf.view[:nbytes], offset, what)
        return 0
    start, want = offset - head, head + nbytes
    span = (want + PAGE - 1) // PAGE * PAGE
    buf.reserve(span)
    done = 0
    try:
        while done < want:
            got = os.preadv(dfd, [buf.view[done:span]], start + done)
            if got <= 0:
                raise ValueError(f"{what}: unexpected end of file at byte {start + done}")
            done += got
            if done < want and done % PAGE:            # a short read that O_DIRECT cannot continue
                break
    except OSError as err:
        if err.errno != errno.EINVAL:                  # EINVAL: this file refuses O_DIRECT after all
            raise
        done = done // PAGE * PAGE
    if done < want:
        pread_into(fd, buf.view[done:want], start + done, what)
    return head


class Buffer:
    """A byte buffer reused across reads: grows to the largest request, never shrinks. Its memory starts on
    a page boundary (O_DIRECT reads and writes need that)."""

    def __init__(self, nbytes: int = 0):
        self.data = torch.empty(0, dtype=torch.uint8)
        self.view = memoryview(bytearray(0))
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> None:
        if nbytes > self.data.numel():
            raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
            pad = -raw.data_ptr() % PAGE
            self.data = raw[pad:pad + nbytes]
            self.view = memoryview(self.data.numpy()).cast("B")

    def tensor(self, nbytes: int, dtype: torch.dtype, shape, offset: int = 0) -> torch.Tensor:
        """nbytes of the buffer from `offset` as a tensor of `dtype` and `shape` (no copy)."""
        flat = self.data[offset:offset + nbytes]
        return (flat.view(dtype) if nbytes else torch.empty(0, dtype=dtype)).reshape(shape)


def find_weights(path: Path, what: str) -> tuple[Path | None, list[Path]]:
    """(index file or None, safetensors files) of a checkpoint folder or file."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file or folder: {path}")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return path, []
        return None, [path]
    for name in INDEX_NAMES:
        if (path / name).is_file():
            return path / name, []
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0], []
    for name in SINGLE_NAMES:
        if (path / name).is_file():
            return None, [path / name]
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1 and not indexes:
        return None, files
    if not files and not indexes:
        raise FileNotFoundError(f"{what}: no .safetensors weights in {path}")
    raise ValueError(f"{what}: {path} holds several .safetensors files and no single index file; "
                     "name the file or add a model.safetensors.index.json")


class Checkpoint:
    """The tensors of a safetensors checkpoint, read lazily one at a time.

    `path`: a .safetensors file, an index file, or a folder (index-sharded, `model.safetensors`, or a single
    .safetensors file). `what` names the checkpoint in error messages ("fine_tuned", "curvature h_pt").
    """

    def __init__(self, path: str | os.PathLike, what: str = "checkpoint"):
        self.path, self.what = Path(path), what
        self.index_path, files = find_weights(self.path, what)
        self.index: dict | None = None
        self.files: list[SafetensorsFile] = []
        try:
            if self.index_path is not None:
                files = self._read_index()
            self.files = [SafetensorsFile(f) for f in files]
            self.infos: dict[str, TensorInfo] = {}
            for f in self.files:
                for name, info in f.infos.items():
                    if name in self.infos:
                        raise ValueError(f"{what}: tensor {name!r} is stored twice ({self.infos[name].file.name} "
                                         f"and {f.path.name})")
                    self.infos[name] = info
            if self.index is not None:
                self._check_index()
        except BaseException:
            self.close()
            raise
        self._fds = {f.path: f.fd for f in self.files}
        self._files = {f.path: f for f in self.files}
        self.buffer = Buffer()

    # -- index ------------------------------------------------------------------------------------------
    def _read_index(self) -> list[Path]:
        try:
            index = json.loads(self.index_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError(f"{self.what}: {self.index_path} is not valid JSON") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in index["weight_map"].items()):
            raise ValueError(f"{self.what}: {self.index_path} has no valid weight_map")
        if not index["weight_map"]:
            raise ValueError(f"{self.what}: {self.index_path} lists no tensors")
        self.index = index
        folder = self.index_path.parent
        shards = []
        for shard in dict.fromkeys(sorted(index["weight_map"].values())):
            p = folder / shard
            if Path(shard).name != shard or not p.is_file():
                raise FileNotFoundError(f"{self.what}: shard {shard} listed in {self.index_path.name} is missing "
                                        f"from {folder}")
            shards.append(p)
        return shards

    def _check_index(self) -> None:
        wm = self.index["weight_map"]
        for name, shard in wm.items():
            info = self.infos.get(name)
            if info is None or info.file.name != shard:
                raise ValueError(f"{self.what}: {self.index_path.name} puts {name!r} in {shard}, but that shard does "
                                 "not contain it")
        extra = [n for n in self.infos if n not in wm]
        if extra:
            raise ValueError(f"{self.what}: {self.infos[extra[0]].file.name} holds {len(extra)} tensors missing from "
                             f"{self.index_path.name}, e.g. {extra[0]!r}")

    # -- access -----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def metadata(self) -> dict[str, str]:
        """The __metadata__ of the first file (shards written together carry the same)."""
        return dict(self.files[0].metadata) if self.files else {}

    def weight_files(self) -> list[Path]:
        """Every file that holds this checkpoint's tensors, the index file included."""
        return ([self.index_path] if self.index_path else []) + [f.path for f in self.files]

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        if name not in self.infos:
            raise KeyError(f"{self.what}: no tensor {name!r} in {self.path}")
        return self.infos[name]

    def fd(self, name: str) -> int:
        return self._fds[self.info(name).file]

    def file_of(self, name: str) -> SafetensorsFile:
        return self._files[self.info(name).file]

    def read(self, name: str, copy: bool = False, buffer: Buffer | None = None) -> torch.Tensor:
        """Tensor `name`. Without `copy` it is a view into this reader's buffer (or `buffer`), overwritten
        by the next read into the same buffer."""
        info = self.info(name)
        if copy:
            buf = Buffer()
        else:
            buf = buffer or self.buffer
        return self.read_into(name, buf, 0, info.numel, info.shape)

    def read_into(self, name: str, buf: Buffer, first: int, count: int, shape=None) -> torch.Tensor:
        """Entries [first, first + count) of tensor `name` (flat, or in `shape`), read into `buf` (around
        the page cache when they are not in it); a view into `buf`."""
        info = self.info(name)
        size = DTYPES[info.dtype][1]
        f = self._files[info.file]
        head = read_range(f.fd, f.dfd, buf, info.start + first * size, count * size, f"{self.what}: {info.file}")
        return buf.tensor(count * size, info.torch_dtype, (count,) if shape is None else shape, head)

    def prefetch(self, name: str, offset: int = 0, nbytes: int | None = None) -> None:
        """Ask the kernel to start reading bytes [offset, offset + nbytes) of tensor `name` (default: all of
        it) in the background (posix_fadvise WILLNEED): a cold read overlaps the work on earlier bytes. Does
        nothing where the file can be read with O_DIRECT: cold ranges are read around the page cache then, and
        pulling them into it would cost the fresh memory that reading around it saves."""
        info = self.info(name)
        if self._files[info.file].dfd is not None:
            return
        n = max(0, min(info.nbytes - offset, info.nbytes if nbytes is None else nbytes))
        if n and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fds[info.file], info.start + offset, n, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
