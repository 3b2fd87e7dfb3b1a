"""The measurement half of cgm_min.cgm, checked against brute force:

* diag_fisher against a per-sample loop of ordinary backward passes on a tiny Llama built offline from a
  config (and shown to differ from the squared batch gradient);
* hutchinson_diag_hessian against the exact Hessian diagonal of a tiny MLP;
* bookkeeping: no .grad left, requires_grad flags and train/eval mode restored, zeros for parameters
  without gradient, float32 output for a bf16 model;
* split_samples on a Qwen2-VL style batch.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cgm_min.cgm import diag_fisher, hutchinson_diag_hessian, split_samples

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 8


def make_llama(seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    # a parameter that never enters the loss, so it gets no gradient
    model.register_parameter("unused_scale", nn.Parameter(torch.ones(3)))
    return model


@pytest.fixture(scope="module")
def llama_template():
    return make_llama()


@pytest.fixture
def llama(llama_template):
    return copy.deepcopy(llama_template)


def llama_batches(seed: int = 0, sizes=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


PARAMS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
          "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight", "unused_scale"]


def brute_force_fisher(model, batches, names):
    """mean over samples of the squared gradient, one ordinary backward pass per sample."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    count = 0
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            model.zero_grad(set_to_none=True)
            model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
            for n in names:
                if params[n].grad is not None:
                    acc[n] += params[n].grad.double() ** 2
            count += 1
    return {n: a / count for n, a in acc.items()}


def squared_batch_gradient(model, batches, names):
    """(gradient of the mean loss over all samples)^2: what a batch-level estimator computes."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    ids = torch.cat([b["input_ids"] for b in batches])
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g.double() ** 2) for n, g in zip(names, grads)}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------------------------
# diag_fisher

def test_diag_fisher_matches_per_sample_brute_force(llama):
    batches = llama_batches()
    fisher = diag_fisher(llama, batches, PARAMS, progress=False)
    ref = brute_force_fisher(llama, batches, PARAMS)
    assert list(fisher) == PARAMS
    for n in PARAMS:
        assert fisher[n].shape == dict(llama.named_parameters())[n].shape
        assert fisher[n].dtype == torch.float32
        torch.testing.assert_close(fisher[n].double(), ref[n], rtol=1e-4, atol=1e-12 * float(ref[n].max()) + 1e-20)
        if n != "unused_scale":
            assert (fisher[n] > 0).any(), n
    assert torch.equal(fisher["unused_scale"], torch.zeros(3))     # no gradient: zeros
    # embedding rows of tokens that never occur as an input with a next token to predict get no gradient
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[torch.cat([b["input_ids"][:, :-1].flatten() for b in batches])] = True
    assert (fisher["model.embed_tokens.weight"][~seen] == 0).all()
    assert (fisher["model.embed_tokens.weight"][seen].sum(dim=1) > 0).all()


def test_diag_fisher_is_not_the_squared_batch_gradient(llama):
    batches = llama_batches(seed=1)
    names = PARAMS[:3]
    fisher = diag_fisher(llama, batches, names, progress=False)
    sq = squared_batch_gradient(llama, batches, names)
    for n in names:
        # per-sample gradients partly cancel in their mean: the squared mean is far smaller
        assert rel_err(sq[n], fisher[n]) > 0.5, n
        assert float(sq[n].sum()) < 0.5 * float(fisher[n].sum()), n


def test_diag_fisher_depends_on_how_samples_are_batched_only_through_the_samples(llama):
    """The same five samples in other batches give the same Fisher (it is a mean over samples)."""
    a = llama_batches(seed=2, sizes=(3, 2))
    ids = torch.cat([b["input_ids"] for b in a])
    b = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1]), "labels": ids[i:i + 1]}
         for i in range(5)]
    fa = diag_fisher(llama, a, PARAMS[:2], progress=False)
    fb = diag_fisher(llama, b, PARAMS[:2], progress=False)
    for n in fa:
        torch.testing.assert_close(fa[n], fb[n], rtol=1e-5, atol=0)


@pytest.mark.parametrize("train_mode", [True, False])
def test_diag_fisher_restores_model_state(llama, train_mode):
    llama.train(train_mode)
    params = dict(llama.named_parameters())
    params["model.embed_tokens.weight"].requires_grad_(False)      # frozen, but asked for
    params["model.layers.0.mlp.up_proj.weight"].requires_grad_(False)   # frozen, not asked for
    flags = {n: p.requires_grad for n, p in params.items()}
    fisher = diag_fisher(llama, llama_batches(seed=3), PARAMS, progress=False)
    assert llama.training is train_mode
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert all(p.grad is None for p in llama.parameters())
    assert (fisher["model.embed_tokens.weight"] > 0).any()       # frozen parameters are still measured
    # and the whole model, when param_names is None
    everything = diag_fisher(llama, llama_batches(seed=3, sizes=(1,)), progress=False)
    assert set(everything) == set(params)
    assert all(p.grad is None for p in llama.parameters())


def test_diag_fisher_under_no_grad(llama):
    """Called from code that runs under torch.no_grad(), it still measures gradients."""
    batches = llama_batches(seed=4, sizes=(2,))
    ref = diag_fisher(llama, batches, PARAMS[:1], progress=False)
    with torch.no_grad():
        got = diag_fisher(llama, batches, PARAMS[:1], progress=False)
    torch.testing.assert_close(got[PARAMS[0]], ref[PARAMS[0]], rtol=0, atol=0)
    assert torch.is_grad_enabled()


def test_diag_fisher_bf16_model_gives_float32(llama):
    batches = llama_batches(seed=5)
    f32 = diag_fisher(llama, batches, PARAMS, progress=False)
    model16 = llama.to(torch.bfloat16)
    f16 = diag_fisher(model16, batches, PARAMS, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    for n in PARAMS:
        assert f16[n].dtype == torch.float32 and torch.isfinite(f16[n]).all()
        if n != "unused_scale":
            assert rel_err(f16[n], f32[n]) < 0.1, n     # bf16 gradients: about 1% off the float32 ones
    assert all(p.grad is None for p in model16.parameters())


def test_diag_fisher_errors(llama):
    with pytest.raises(ValueError, match=r"param_names not found in the model: \['no\.such\.weight'\]"):
        diag_fisher(llama, llama_batches(), ["lm_head.weight", "no.such.weight"], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        diag_fisher(llama, [], PARAMS, progress=False)


# ----------------------------------------------------------------------------------------------
# hutchinson_diag_hessian

class TinyMLP(nn.Module):
    """3 -> 5 -> 2 with tanh; forward(x=..., labels=...) returns an object with `.loss` (mean squared error)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)
        self.unused = nn.Parameter(torch.ones(4))
        self.double()

    def forward(self, x, labels):
        out = self.l2(torch.tanh(self.l1(x)))
        return SimpleNamespace(loss=((out - labels) ** 2).mean())


def mlp_batches(sizes=(3, 5)):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(n, 3, generator=g, dtype=torch.float64),
             "labels": torch.randn(n, 2, generator=g, dtype=torch.float64)} for n in sizes]


def exact_hessian_diagonal(model, batches, names):
    """diag of the Hessian of the sample-weighted mean loss over the batches, via torch.autograd.functional."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    n_total = sum(b["labels"].shape[0] for b in batches)

    def loss_of(flat):
        chunks = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split(sizes), shapes))))
        full = {**{n: p.detach() for n, p in params.items()}, **chunks}
        return sum(torch.func.functional_call(model, full, (), b).loss * b["labels"].shape[0]
                   for b in batches) / n_total

    flat = torch.cat([params[n].detach().flatten() for n in names])
    H = torch.autograd.functional.hessian(loss_of, flat)
    return H, dict(zip(names, (d.reshape(s) for d, s in zip(torch.diagonal(H).split(sizes), shapes))))


MLP_PARAMS = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]


@pytest.fixture(scope="module")
def mlp_exact():
    """The MLP, its two batches, the exact Hessian of each batch's loss, and the exact diagonal of the
    Hessian of the sample-weighted mean loss."""
    model, batches = TinyMLP(), mlp_batches()
    H, diag = exact_hessian_diagonal(model, batches, MLP_PARAMS)
    H_batches = [exact_hessian_diagonal(model, [b], MLP_PARAMS)[0] for b in batches]
    assert (H - torch.diag(torch.diagonal(H))).abs().max() > 0.05     # a non-diagonal Hessian
    return model, batches, H_batches, diag


def flat(d, names=MLP_PARAMS):
    return torch.cat([d[n].double().flatten() for n in names])


def test_hutchinson_error_shrinks_with_probes(mlp_exact):
    model, batches, _, diag = mlp_exact
    exact = flat(diag)
    errs = {}
    for n_probes in (4, 256):
        errs[n_probes] = sum(
            float((flat(hutchinson_diag_hessian(model, batches, n_probes, MLP_PARAMS, seed=s, progress=False))
                   - exact).norm()) for s in range(3)) / 3 / float(exact.norm())
    # the error falls like 1/sqrt(n_probes): 8x in expectation from 4 to 256 probes
    assert errs[256] < errs[4] / 4, errs
    assert errs[4] > 0.3, errs          # with 4 probes the estimate is visibly noisy


def test_hutchinson_with_many_probes_is_close(mlp_exact):
    model, batches, H_batches, diag = mlp_exact
    n_probes = 1024
    est = hutchinson_diag_hessian(model, batches, n_probes, seed=1, progress=False)
    assert set(est) == set(MLP_PARAMS) | {"unused"}
    assert torch.equal(est["unused"], torch.zeros(4))            # never in the loss: zeros
    for n in MLP_PARAMS:
        assert est[n].dtype == torch.float32 and est[n].shape == diag[n].shape
    err = float((flat(est) - flat(diag)).norm())
    # Var[v_i (H v)_i] = sum_{j != i} H_ij^2 for one Rademacher probe; each batch has its own probes and
    # enters with weight n_b / N, so the expected squared error is sum_b (n_b/N)^2 offdiag(H_b)^2 / n_probes.
    sizes = [b["labels"].shape[0] for b in batches]
    expected_sq = sum((n / sum(sizes)) ** 2 * float((Hb ** 2).sum() - (torch.diagonal(Hb) ** 2).sum())
                      for n, Hb in zip(sizes, H_batches)) / n_probes
    assert err < 3 * expected_sq ** 0.5, (err, expected_sq ** 0.5)
    assert err < 0.1 * float(flat(diag).norm())


def test_hutchinson_is_exact_for_separable_loss():
    """For a loss without cross terms the Hessian is diagonal and one Rademacher probe is exact."""
    class Separable(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

        def forward(self, x, labels):
            return SimpleNamespace(loss=(self.w ** 4).sum() + (labels * self.w ** 2).mean(dim=0).sum())

    model = Separable()
    x, labels = torch.ones(2, 3, dtype=torch.float64), torch.full((2, 3), 2.0, dtype=torch.float64)
    est = hutchinson_diag_hessian(model, [{"x": x, "labels": labels}], 1, progress=False)
    w = model.w.detach()
    torch.testing.assert_close(est["w"].double(), 12 * w ** 2 + 4.0, rtol=1e-6, atol=1e-6)


def test_hutchinson_restores_model_and_leaves_no_grad(mlp_exact):
    model = copy.deepcopy(mlp_exact[0]).train()
    model.l2.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    est = hutchinson_diag_hessian(model, mlp_batches(), 8, ["l2.bias", "l1.weight"], progress=False)
    assert list(est) == ["l2.bias", "l1.weight"]
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # Probes span only the chosen parameters. Restricted to l2.bias, the Hessian of a mean squared error
    # over 2 outputs is exactly the identity (d^2 loss / d b_j^2 = 2 / 2, no cross terms): one probe is exact.
    est = hutchinson_diag_hessian(model, mlp_batches(), 1, ["l2.bias"], progress=False)
    assert torch.equal(est["l2.bias"], torch.ones(2))


def test_hutchinson_same_seed_same_estimate(mlp_exact):
    model, batches = mlp_exact[0], mlp_exact[1]
    a = hutchinson_diag_hessian(model, batches, 3, MLP_PARAMS, seed=7, progress=False)
    b = hutchinson_diag_hessian(model, batches, 3, MLP_PARAMS, seed=7, progress=False)
    c = hutchinson_diag_hessian(model, batches, 3, MLP_PARAMS, seed=8, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in MLP_PARAMS)
    assert not all(torch.equal(a[n], c[n]) for n in MLP_PARAMS)


def test_hutchinson_bad_n_probes(mlp_exact):
    for n_probes in (0, -1, 2.0):
        with pytest.raises(ValueError, match="n_probes must be a positive int"):
            hutchinson_diag_hessian(mlp_exact[0], mlp_batches(), n_probes, progress=False)


def test_hutchinson_runs_on_tiny_llama(llama):
    llama.train()
    est = hutchinson_diag_hessian(llama, llama_batches(seed=6, sizes=(2,)), 2, progress=False)
    params = dict(llama.named_parameters())
    assert set(est) == set(params)
    for n, e in est.items():
        assert e.shape == params[n].shape and e.dtype == torch.float32, n
        assert torch.isfinite(e).all(), n
    assert torch.equal(est["unused_scale"], torch.zeros(3))
    assert (est["model.layers.0.self_attn.q_proj.weight"] != 0).any()
    assert (est["lm_head.weight"] > 0).any()
    assert llama.training and all(p.grad is None for p in llama.parameters())


# ----------------------------------------------------------------------------------------------
# split_samples

def test_split_samples_plain_batch():
    ids = torch.arange(12).reshape(3, 4)
    batch = {"input_ids": ids, "attention_mask": torch.ones(3, 4), "labels": ids + 100,
             "use_cache": False, "logits_to_keep": torch.tensor(0)}
    samples = list(split_samples(batch))
    assert len(samples) == 3
    for i, s in enumerate(samples):
        assert torch.equal(s["input_ids"], ids[i:i + 1]) and torch.equal(s["labels"], ids[i:i + 1] + 100)
        assert s["attention_mask"].shape == (1, 4)
        assert s["use_cache"] is False and s["logits_to_keep"] is batch["logits_to_keep"]


def test_split_samples_qwen2_vl_patches_per_image():
    """pixel_values stacks the patches of all images; image_grid_thw gives (t, h, w) per image."""
    grid = torch.tensor([[1, 2, 2], [1, 4, 2], [2, 2, 2]])     # 4, 8 and 8 patches
    n_patches = [4, 8, 8]
    pixel_values = torch.arange(20 * 6, dtype=torch.float32).reshape(20, 6)
    ids = torch.arange(3 * 5).reshape(3, 5)
    batch = {"input_ids": ids, "attention_mask": torch.ones(3, 5), "labels": ids,
             "pixel_values": pixel_values, "image_grid_thw": grid}
    samples = list(split_samples(batch))
    assert len(samples) == 3
    start = 0
    for i, s in enumerate(samples):
        assert torch.equal(s["pixel_values"], pixel_values[start:start + n_patches[i]])
        assert torch.equal(s["image_grid_thw"], grid[i:i + 1])
        assert torch.equal(s["input_ids"], ids[i:i + 1])
        start += n_patches[i]
    assert torch.equal(torch.cat([s["pixel_values"] for s in samples]), pixel_values)


def test_split_samples_grid_rows_must_match_samples():
    batch = {"labels": torch.zeros(2, 3), "pixel_values": torch.zeros(12, 4),
             "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2], [1, 2, 2]])}
    with pytest.raises(ValueError, match=r"image_grid_thw must have one row per sample \(3 rows for 2 samples\)"):
        list(split_samples(batch))
