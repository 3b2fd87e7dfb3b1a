"""Chunked kernels for the streaming merge: CGM soft mixing and linear interpolation over a tensor in
slices of `CHUNK` elements, with preallocated scratch, bit-identical to the registry's functions.

Why: a whole-tensor `soft_mix` allocates about ten fresh full-size temporaries per tensor, and fresh memory
costs about 3 GB/s on the project's machine class (a page fault per 4 KiB), against tens of GB/s for memory
that is reused and stays in cache. Here every temporary is a slice of a few scratch tensors allocated once.

What makes it bit-identical (tested against `cgm.soft_mix` and `merge.interpolation.linear` on random
tensors of every float dtype, sizes that are not multiples of the chunk, and zero curvature):
  * the same torch operations in the same order, element by element: `alpha * h_pt`, `h_ft + num`,
    `num / den` where den > 0 and alpha/(1+alpha) elsewhere, `torch.lerp(w_ft, w_pt, lam)` in float32
    (float64 for float64 weights), then one cast to w_ft's dtype; every operation is elementwise, so
    slicing does not change any result;
  * weights are cast to float32 *before* w_pt - w_ft is formed (inside lerp), never subtracted in bf16.
The input checks are made per slice (aminmax: finite non-negative curvature that is not zero everywhere, a
finite result); when one fails the kernel returns None and the caller runs the reference on the whole
tensor, which raises the reference's own error message (or, in the rare cases the kernel declines, such as
curvature near the float32 limit, computes the reference's result).

Statistics per tensor (for cgm_merge.json): mean_lam (the Eq. 8 ratio for CGM, the hyperparameter for
linear), n_delta (entries where w_pt != w_ft) and reverted (of those, entries whose result equals w_pt).
"""
from __future__ import annotations

import math
import torch

CHUNK = 1 << 18          # elements per slice (1 MiB of float32): fastest of 2^14..2^18 measured here


class Scratch:
    """Work tensors of CHUNK elements, allocated once per dtype and reused for every tensor."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._t: dict[tuple, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, slot: int) -> torch.Tensor:
        key = (dtype, slot)
        if key not in self._t:
            self._t[key] = torch.empty(self.chunk, dtype=dtype)
        return self._t[key]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._t.values())


def _as(x: torch.Tensor, dt: torch.dtype, buf: torch.Tensor) -> torch.Tensor:
    """x in dtype dt: x itself when it already is, else a copy-cast into buf (what x.to(dt) computes)."""
    return x if x.dtype == dt else buf[:x.numel()].copy_(x)


def _finite(x: torch.Tensor) -> bool:
    mn, mx = torch.aminmax(x)
    return bool(mn > -math.inf) and bool(mx < math.inf)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _lerp_store(w_pt: torch.Tensor, w_ft: torch.Tensor, weight, out: torch.Tensor, s: Scratch, stats: dict
                ) -> bool:
    """One slice of the reference's `torch.lerp(w_ft.to(dt), w_pt.to(dt), weight).to(w_ft.dtype)`, stored into
    out (cast again when the output dtype differs); counts, bit for bit, entries with w_pt != w_ft and, of
    those, entries whose result equals w_pt. False when the result is not finite (a weight was not)."""
    dt = torch.promote_types(w_ft.dtype, torch.float32)
    m = w_ft.numel()
    wp32, wf32 = _as(w_pt, dt, s.get(dt, 0)), _as(w_ft, dt, s.get(dt, 1))
    r = out if out.dtype == dt and w_ft.dtype == dt else s.get(dt, 6)[:m]
    torch.lerp(wf32, wp32, weight, out=r)
    if not _finite(r):
        return False
    res = r if r.dtype == w_ft.dtype else s.get(w_ft.dtype, 7)[:m].copy_(r)
    if res.data_ptr() != out.data_ptr():
        out.copy_(res)
    bits = _BITS[w_ft.element_size()]
    differ, same = s.get(torch.float32, 8)[:m], s.get(torch.float32, 9)[:m]
    torch.ne(w_pt.view(bits), w_ft.view(bits), out=differ)
    torch.eq(res.view(bits), w_pt.view(bits), out=same)
    stats["n_delta"] += int(differ.sum())                  # exact: a float32 sum of <= 2^24 ones
    stats["reverted"] += int(torch.dot(differ, same))
    return True


def _slices(n: int, chunk: int):
    for i in range(0, n, chunk):
        yield slice(i, min(n, i + chunk))


FLOAT32_MAX = torch.finfo(torch.float32).max


def new_stats() -> dict:
    """Accumulators of a tensor merged in several calls (blocks): pass the same dict to every call."""
    return {"n": 0, "lam_sum": 0.0, "n_delta": 0, "reverted": 0, "any_pt": False, "any_ft": False}


def _finish(acc: dict, mean_lam: float | None = None) -> dict:
    n = acc["n"]
    return {"n": n, "n_delta": acc["n_delta"], "reverted": acc["reverted"],
            "mean_lam": mean_lam if mean_lam is not None else (acc["lam_sum"] / n if n else 0.0)}


def soft_mix_chunked(w_pt: torch.Tensor, w_ft: torch.Tensor, h_pt: torch.Tensor, h_ft: torch.Tensor,
                     alpha: float, out: torch.Tensor, s: Scratch, acc: dict | None = None, last: bool = True
                     ) -> dict | None:
    """out[:] = cgm.soft_mix(w_pt, w_ft, h_pt, h_ft, alpha) (cast to out's dtype), all four inputs and out
    flat tensors of one length. Returns the statistics, or None when the inputs need the reference (invalid
    values, or curvature so large that alpha * h could overflow): the caller then runs `soft_mix` itself,
    which raises the reference's error or computes the reference's result.

    A tensor may come in consecutive blocks: pass one `acc` (new_stats()) to every call and last=True with
    the final block; the whole-tensor check (curvature not zero everywhere) is made then.

    Two shortcuts, both exact: since h >= 0 and alpha >= 0, den = h_ft + alpha h_pt >= num >= 0, so
    `den > 0` fails only where num = den = 0, which is exactly where num / den is NaN (as long as den is
    finite, which the overflow guard ensures): nan_to_num puts alpha/(1+alpha) there, as the reference's
    `where` does. And a non-finite weight always makes the lerp non-finite, so checking the result checks
    the weights.
    """
    dt = torch.promote_types(w_ft.dtype, torch.float32)
    fallback = alpha / (1.0 + alpha)
    acc = acc if acc is not None else new_stats()
    acc["n"] += w_ft.numel()
    for sl in _slices(w_ft.numel(), s.chunk):
        hp32, hf32 = _as(h_pt[sl], dt, s.get(dt, 2)), _as(h_ft[sl], dt, s.get(dt, 3))
        lo_pt, hi_pt = (float(v) for v in torch.aminmax(hp32))
        lo_ft, hi_ft = (float(v) for v in torch.aminmax(hf32))
        if not (lo_pt >= 0 and lo_ft >= 0 and alpha * hi_pt + hi_ft < FLOAT32_MAX / 2):
            return None                                    # negative, NaN, Inf, or near overflow
        acc["any_pt"] = acc["any_pt"] or hi_pt > 0
        acc["any_ft"] = acc["any_ft"] or hi_ft > 0
        num, den = s.get(dt, 4)[:hp32.numel()], s.get(dt, 5)[:hp32.numel()]
        torch.mul(hp32, alpha, out=num)                    # alpha * h_pt
        torch.add(hf32, num, out=den)                      # h_ft + alpha * h_pt
        torch.nan_to_num_(num.div_(den), nan=fallback, posinf=math.inf, neginf=-math.inf)   # lam, Eq. 8
        acc["lam_sum"] += float(num.sum())
        if not _lerp_store(w_pt[sl], w_ft[sl], num, out[sl], s, acc):
            return None
    if not last:
        return acc
    if acc["n"] and not (acc["any_pt"] and acc["any_ft"]):
        return None                                        # a curvature that is zero everywhere
    return _finish(acc)


def linear_chunked(w_pt: torch.Tensor, w_ft: torch.Tensor, lam: float, out: torch.Tensor, s: Scratch,
                   acc: dict | None = None, last: bool = True) -> dict | None:
    """out[:] = merge.interpolation.linear: torch.lerp(w_ft, w_pt, lam) in float32, cast to w_ft's dtype.
    None when a weight is not finite (the caller runs the reference, which raises). Blocks: as soft_mix_chunked."""
    acc = acc if acc is not None else new_stats()
    acc["n"] += w_ft.numel()
    for sl in _slices(w_ft.numel(), s.chunk):
        if not _lerp_store(w_pt[sl], w_ft[sl], lam, out[sl], s, acc):
            return None
    return _finish(acc, float(lam)) if last else acc
