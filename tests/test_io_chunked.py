"""The chunked CGM / linear kernels of the streaming merge equal the registry's functions bit for bit."""
from __future__ import annotations

import pytest
import torch

from cgm_min import cgm
from cgm_min.io.chunked import Scratch, linear_chunked, new_stats, soft_mix_chunked
from cgm_min.merge import TensorInputs, get_method

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(BITS[t.element_size()])


def inputs(n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_pt = torch.randn(n, generator=g).to(dtype)
    w_ft = (w_pt.double() + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    w_ft[::7] = w_pt[::7]                                       # entries that did not move
    h_pt = torch.rand(n, generator=g) ** 4
    h_ft = torch.rand(n, generator=g) ** 4
    h_pt[::5] = 0                                               # no pre-training curvature
    h_ft[::3] = 0
    h_pt[::15] = h_ft[::15] = 0                                 # no curvature at all: lam = alpha/(1+alpha)
    return w_pt, w_ft, h_pt, h_ft


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0, 250.0])
def test_soft_mix_chunked_is_soft_mix(dtype, alpha):
    n = 10_007                                                  # not a multiple of the chunk
    w_pt, w_ft, h_pt, h_ft = inputs(n, dtype)
    ref = cgm.soft_mix(w_pt, w_ft, h_pt, h_ft, alpha)
    for chunk in (64, 1000, 1 << 18):
        out = torch.empty(n, dtype=dtype)
        st = soft_mix_chunked(w_pt, w_ft, h_pt, h_ft, alpha, out, Scratch(chunk))
        assert st is not None and torch.equal(bits(out), bits(ref)), (dtype, alpha, chunk)
    lam = cgm.revert_ratio(h_pt, h_ft, alpha)
    assert st["mean_lam"] == pytest.approx(float(lam.double().mean()), rel=1e-5)
    differ = bits(w_pt) != bits(w_ft)
    assert st["n_delta"] == int(differ.sum())
    assert st["reverted"] == int((differ & (bits(ref) == bits(w_pt))).sum())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cast_output_is_reference_then_cast(out_dtype):
    w_pt, w_ft, h_pt, h_ft = inputs(3001, torch.bfloat16 if out_dtype == torch.float32 else torch.float32)
    ref = cgm.soft_mix(w_pt, w_ft, h_pt, h_ft, 0.5).to(out_dtype)
    out = torch.empty(3001, dtype=out_dtype)
    soft_mix_chunked(w_pt, w_ft, h_pt, h_ft, 0.5, out, Scratch(512))
    assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_linear_chunked_is_registry_linear(dtype, lam):
    w_pt, w_ft, _, _ = inputs(5003, dtype, seed=1)
    ref = get_method("linear").fn(TensorInputs("t", w_pt, w_ft), lam=lam)
    out = torch.empty(5003, dtype=dtype)
    assert linear_chunked(w_pt, w_ft, lam, out, Scratch(333)) is not None
    assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("label, which, index, value", [
    ("negative h_pt", 2, 1500, -1.0), ("NaN h_ft", 3, 3, float("nan")), ("Inf w_pt", 0, 1999, float("inf")),
    ("NaN w_ft", 1, 700, float("nan")), ("h near float32 overflow", 2, 5, 3e38)])
def test_kernels_decline_what_the_reference_must_judge(label, which, index, value):
    ts = list(inputs(2000, torch.float32))
    ts[which][index] = value
    assert soft_mix_chunked(*ts, 1.0, torch.empty(2000), Scratch(256)) is None, label
    if which < 2:
        assert linear_chunked(ts[0], ts[1], 0.5, torch.empty(2000), Scratch(256)) is None, label


def test_all_zero_curvature_is_declined():
    w_pt, w_ft, _, h_ft = inputs(2000, torch.float32)
    assert soft_mix_chunked(w_pt, w_ft, torch.zeros(2000), h_ft, 1.0, torch.empty(2000), Scratch(256)) is None


def test_a_tensor_in_blocks_equals_one_call():
    w_pt, w_ft, h_pt, h_ft = inputs(10_007, torch.bfloat16, seed=3)
    whole = torch.empty(10_007, dtype=torch.bfloat16)
    st = soft_mix_chunked(w_pt, w_ft, h_pt, h_ft, 0.8, whole, Scratch(512))
    parts, acc, edges = torch.empty(10_007, dtype=torch.bfloat16), new_stats(), [0, 3000, 3001, 9000, 10_007]
    for a, b in zip(edges, edges[1:]):
        got = soft_mix_chunked(w_pt[a:b], w_ft[a:b], h_pt[a:b], h_ft[a:b], 0.8, parts[a:b], Scratch(512), acc,
                               last=b == 10_007)
    assert torch.equal(bits(parts), bits(whole))
    assert {k: got[k] for k in ("n", "n_delta", "reverted")} == {k: st[k] for k in ("n", "n_delta", "reverted")}
    assert got["mean_lam"] == pytest.approx(st["mean_lam"], rel=1e-6)
    zeros = torch.zeros(10_007)                     # zero curvature in every block: declined at the last one
    acc = new_stats()
    assert soft_mix_chunked(w_pt[:5000], w_ft[:5000], zeros[:5000], h_ft[:5000], 1.0, parts[:5000], Scratch(512),
                            acc, last=False) is not None
    assert soft_mix_chunked(w_pt[5000:], w_ft[5000:], zeros[5000:], h_ft[5000:], 1.0, parts[5000:], Scratch(512),
                            acc, last=True) is None
