"""The merge loop of one output shard: blocks read ahead and written behind on an IO thread while the main
thread computes.

Every tensor of a shard becomes one or more jobs, in header order:
  block  a merged tensor of a chunked method (CGM, linear), in blocks of BLOCK entries: the IO thread reads
         block j + 1 of the four inputs (w_pt, w_ft, h_pt, h_ft) into one of two buffer sets while the main
         thread computes block j into the other, and writes block j - 1 behind it. Memory does not grow
         with the tensor: two sets of BLOCK entries per input, whatever the model.
  whole  a merged tensor of any other method: the whole tensor is read into reused buffers and merged by
         the registry's function (`reference_merge`, which is `merge_state` on one tensor).
  cast   an unmerged tensor in another output dtype; copy: an unmerged tensor, copied by copy_file_range.
All writes go through the one IO thread, in order, so the shard is written front to back. When a kernel
declines a block (invalid values, curvature near the float32 limit, curvature zero everywhere), the queue is
drained and the whole tensor goes to the reference instead, which raises the reference's own error or, in
the rare valid case, rewrites the tensor from its first byte.
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..merge import merge_state
from .chunked import _BITS, Scratch, linear_chunked, new_stats, soft_mix_chunked
from .reader import DTYPES, Buffer, Checkpoint, TensorInfo
from .writer import ShardWriter, tensor_bytes

BLOCK = 1 << 22          # entries per streamed block: 16 MiB of float32
CHUNKED = ("cgm", "linear")


@dataclass
class TensorPlan:
    name: str                    # the fine-tuned model's (and the output's) stored name
    canonical: str               # the in-memory name
    merged: bool
    ft: TensorInfo
    pt: TensorInfo
    out_dtype: str               # safetensors code
    h_pt: TensorInfo | None = None
    h_ft: TensorInfo | None = None

    @property
    def out_nbytes(self) -> int:
        return self.ft.numel * DTYPES[self.out_dtype][1]

    @property
    def bytes_read(self) -> int:
        if not self.merged:
            return self.ft.nbytes
        return self.ft.nbytes + self.pt.nbytes + sum(h.nbytes for h in (self.h_pt, self.h_ft) if h)


def reference_merge(method: str, name: str, w_pt: torch.Tensor, w_ft: torch.Tensor, h_pt: torch.Tensor | None,
                    h_ft: torch.Tensor | None, hyperparameters: Mapping) -> torch.Tensor:
    """`merge_state` on one tensor: the in-memory reference, all of its checks included."""
    curv = ({name: h_pt}, {name: h_ft}) if h_pt is not None else (None, None)
    return merge_state(method, {name: w_pt}, {name: w_ft}, *curv, names=[name], **hyperparameters)[name]


def tensor_stats(w_pt: torch.Tensor, w_ft: torch.Tensor, res: torch.Tensor, block: int = 1 << 20) -> dict:
    """n, n_delta (entries whose bits differ between w_pt and w_ft), reverted (of those, entries whose result
    equals w_pt bit for bit) and mean_lam (the mean of (w - w_ft) / (w_pt - w_ft) over entries whose values
    differ: where the result sits between w_ft (0) and w_pt (1)), in slices of `block` entries."""
    bits = _BITS[w_ft.element_size()]
    p, f, r = w_pt.reshape(-1), w_ft.reshape(-1), res.reshape(-1)
    n = f.numel()
    n_delta = reverted = n_val = 0
    lam_sum = 0.0
    for i in range(0, n, block):
        sp, sf, sr = p[i:i + block], f[i:i + block], r[i:i + block]
        differ = sp.view(bits) != sf.view(bits)
        n_delta += int(differ.sum())
        reverted += int((differ & (sr.view(bits) == sp.view(bits))).sum())
        d = sp.double() - sf.double()
        keep = d != 0
        n_val += int(keep.sum())
        lam_sum += float(((sr.double() - sf.double())[keep] / d[keep]).sum())
    return {"n": n, "n_delta": n_delta, "reverted": reverted, "mean_lam": lam_sum / n_val if n_val else 0.0}


@dataclass
class Job:
    tp: TensorPlan
    kind: str                    # block, whole, cast, copy
    start: int = 0               # first entry of a block
    n: int = 0                   # entries in a block
    last: bool = True            # the tensor's last block


ROLES = ("pt", "ft", "h_pt", "h_ft")


class ShardStreamer:
    """Writes the shards of a merge (see the module docstring). `inputs` maps pt, ft, h_pt, h_ft to their
    open Checkpoints (h_* may be None); `method` and `hyperparameters` are the registry's."""

    def __init__(self, inputs: Mapping[str, Checkpoint | None], method: str, hyperparameters: Mapping,
                 block: int | None = None):
        self.ck, self.method, self.hp = dict(inputs), method, dict(hyperparameters)
        self.block = block or BLOCK
        self.io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgm-merge-io")
        self.sets = [{r: Buffer() for r in ROLES + ("out",)} for _ in range(2)]
        self.scratch = Scratch()
        self.out = Buffer()                               # whole-tensor results and casts
        self._pending: list[concurrent.futures.Future] = []
        self._out_write: concurrent.futures.Future | None = None

    @staticmethod
    def block_bytes(method: str, merged: list[TensorPlan], block: int = BLOCK) -> int:
        """Memory of the two block buffer sets, for a chunked method's merged tensors."""
        if method not in CHUNKED:
            return 0
        per_entry = max((sum(DTYPES[i.dtype][1] for i in (t.pt, t.ft, t.h_pt, t.h_ft) if i is not None)
                         + DTYPES[t.out_dtype][1] for t in merged), default=0)
        return 2 * min(block, max((t.ft.numel for t in merged), default=0)) * per_entry

    def jobs(self, tps) -> list[Job]:
        out = []
        for tp in tps:
            if tp.merged and self.method in CHUNKED:
                n = tp.ft.numel
                starts = range(0, n, self.block) if n else [0]
                out += [Job(tp, "block", i, min(self.block, n - i), i + self.block >= n) for i in starts]
            elif tp.merged:
                out.append(Job(tp, "whole"))
            else:
                out.append(Job(tp, "cast" if tp.out_dtype != tp.ft.dtype else "copy"))
        return out

    # -- IO-thread work -----------------------------------------------------------------------------------
    def _infos(self, tp: TensorPlan) -> dict[str, TensorInfo | None]:
        return {"pt": tp.pt, "ft": tp.ft, "h_pt": tp.h_pt, "h_ft": tp.h_ft}

    def _read_block(self, job: Job, bufs: dict) -> dict[str, torch.Tensor]:
        views = {}
        for role, info in self._infos(job.tp).items():
            if info is None or self.ck.get(role) is None:
                continue
            size = DTYPES[info.dtype][1]
            views[role] = self.ck[role].read_into(info.name, bufs[role], job.start, job.n)
            if not job.last:                        # the block after the next one, from a cold disk meanwhile
                self.ck[role].prefetch(info.name, (job.start + 2 * job.n) * size, job.n * size)
        return views

    @staticmethod
    def _write_block(sw: ShardWriter, job: Job, data: torch.Tensor) -> None:
        if job.start == 0:
            sw.begin(job.tp.name)
        sw.write(tensor_bytes(data))
        if job.last:
            sw.end()

    @staticmethod
    def _rewrite(sw: ShardWriter, job: Job, begun: bool, data: torch.Tensor) -> None:
        if begun:
            sw.rewind()
        else:
            sw.begin(job.tp.name)
        sw.write(tensor_bytes(data))
        sw.end()

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        f = self.io.submit(fn, *args)
        self._pending.append(f)
        return f

    def drain(self) -> None:
        """Wait for every queued read and write; raises the first error of the IO thread."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    # -- main-thread work -----------------------------------------------------------------------------------
    def _whole(self, tp: TensorPlan) -> tuple[torch.Tensor, dict]:
        """The registry's function on the whole tensor, into the reused output buffer."""
        w = {r: self.ck[r].read(info.name) for r, info in self._infos(tp).items()
             if info is not None and self.ck.get(r) is not None}
        res = reference_merge(self.method, tp.canonical, w["pt"], w["ft"], w.get("h_pt"), w.get("h_ft"), self.hp)
        stats = tensor_stats(w["pt"], w["ft"], res)
        return self._to_out(tp, res), stats

    def _to_out(self, tp: TensorPlan, t: torch.Tensor) -> torch.Tensor:
        if self._out_write is not None:
            self._out_write.result()                          # the buffer's previous content is written
        self.out.reserve(tp.out_nbytes)
        return self.out.tensor(tp.out_nbytes, DTYPES[tp.out_dtype][0], (tp.ft.numel,)).copy_(t.reshape(-1))

    def _kernel(self, views: dict, out: torch.Tensor, acc: dict, last: bool) -> dict | None:
        if self.method == "cgm":
            return soft_mix_chunked(views["pt"], views["ft"], views["h_pt"], views["h_ft"], self.hp["alpha"], out,
                                    self.scratch, acc, last)
        return linear_chunked(views["pt"], views["ft"], self.hp["lam"], out, self.scratch, acc, last)

    def write_shard(self, sw: ShardWriter, tps, done: Callable[[TensorPlan, dict | None], None]) -> None:
        """Write the tensors `tps` (the shard's, in header order) into `sw`; `done(tp, stats)` is called once
        per tensor (stats None for unmerged ones) when its last byte is queued."""
        jobs = self.jobs(tps)
        reads: dict[int, concurrent.futures.Future] = {}
        acc: dict | None = None
        skip: TensorPlan | None = None
        for j, job in enumerate(jobs):
            tp = job.tp
            if tp is skip:
                continue
            if job.kind == "block":
                if j not in reads:
                    reads[j] = self._submit(self._read_block, job, self.sets[j % 2])
                if j + 1 < len(jobs) and jobs[j + 1].kind == "block":          # read ahead into the other set
                    reads[j + 1] = self._submit(self._read_block, jobs[j + 1], self.sets[(j + 1) % 2])
                views = reads.pop(j).result()
                if job.start == 0:
                    acc = new_stats()
                bufs = self.sets[j % 2]
                size = DTYPES[tp.out_dtype][1]
                bufs["out"].reserve(job.n * size)
                out = bufs["out"].tensor(job.n * size, DTYPES[tp.out_dtype][0], (job.n,))
                stats = self._kernel(views, out, acc, job.last)
                if stats is None:                     # declined: the reference judges the whole tensor
                    self.drain()
                    reads.clear()
                    data, stats = self._whole(tp)
                    self._rewrite(sw, job, job.start > 0, data)
                    skip = tp
                    done(tp, stats)
                    continue
                self._submit(self._write_block, sw, job, out)
                if job.last:
                    done(tp, stats)
            elif job.kind == "copy":
                src = self.ck["ft"].file_of(tp.name)     # its O_DIRECT descriptor opened here, kept open
                self._submit(sw.copy_tensor, tp.name, src.fd, tp.ft.start, src.dfd)
                done(tp, None)
            else:
                if job.kind == "whole":
                    data, stats = self._whole(tp)
                else:
                    data, stats = self._to_out(tp, self.ck["ft"].read(tp.name)), None
                self._out_write = self._submit(sw.write_tensor, tp.name, data)
                done(tp, stats)
        self.drain()

    def close(self, cancel: bool = False) -> None:
        self.io.shutdown(wait=True, cancel_futures=cancel)
