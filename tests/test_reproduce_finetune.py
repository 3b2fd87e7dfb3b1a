"""Fine-tuning with Trainer: h_ft is the per-sample empirical Fisher (a brute-force per-sample loop agrees;
the square of micro-batch gradients does not), and accumulating it changes neither the gradient the
optimizer sees nor which tensors are trained."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cgm_min.reproduce import finetune as ft
from cgm_min.reproduce.recipes import load_recipe
from cgm_min.world import models as mm
from cgm_min.world import tasks as mt

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"llava": ("tiny-llava-corners", "corners"), "qwen": ("tiny-qwen-caption", "caption")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setting(request):
    """(recipe, samples); Qwen2.5-VL's stacked image patches are split per sample by cgm.split_samples."""
    name, task = FAMILIES[request.param]
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    # one optimizer step of 4 samples, 2 per forward pass (so 2 accumulation steps of a 2-sample loop)
    r = replace(r, finetune=replace(r.finetune, global_batch=4, micro_batch=2, max_steps=1, warmup_ratio=0.0))
    return r, mt.make_samples(task, "train", 4)


def brute_force(recipe, samples):
    """mean over samples of (d loss_n / d w)^2 at w_pt, one sample at a time, and the batch-mean gradient."""
    model, processor, names, _ = ft.load_for_training(recipe, recipe.model)
    enc = mm.Encoder(processor)
    params = dict(model.named_parameters())
    sq = {n: torch.zeros_like(params[n]) for n in names}
    mean = {n: torch.zeros_like(params[n]) for n in names}
    for s in samples:
        loss = model(**enc.batch([s])).loss
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            sq[n] += g ** 2 / len(samples)
            mean[n] += g / len(samples)
    return sq, mean


class GradCapture:
    """Records the merge-set gradients the optimizer is about to apply."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _C(TrainerCallback):
            grads = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return _C()


def run(recipe, samples, h_ft, tmp_path):
    from transformers import Trainer
    model, processor, names, _ = ft.load_for_training(recipe, recipe.model)
    cap = GradCapture()
    # no gradient clipping, so that the captured gradient is the accumulated one
    args = ft.training_arguments(recipe, tmp_path, 1, disable_tqdm=True, max_grad_norm=0.0)
    trainer = ft._trainer_class()(model=model, args=args, train_dataset=ft.Records(samples),
                                  data_collator=ft.Collate(mm.Encoder(processor)), callbacks=[cap], h_ft=h_ft)
    assert isinstance(trainer, Trainer)
    trainer.train()
    return trainer, cap.grads, names


def test_h_ft_is_the_per_sample_fisher(setting, tmp_path):
    recipe, samples = setting
    torch.set_num_threads(1)
    sq, mean = brute_force(recipe, samples)
    trainer, grads, names = run(recipe, samples, True, tmp_path)
    h, count = trainer.h_ft()
    assert count == 4 and set(h) == set(names)
    for n in names:
        scale = sq[n].abs().max()
        assert scale > 0
        torch.testing.assert_close(h[n], sq[n], rtol=1e-4, atol=1e-6 * float(scale))
    # what a batch-gradient estimator would give, (mean gradient)^2, is smaller (Jensen), here by far more
    # than the tolerance above: the per-sample gradients are not all alike
    ratio = sum(float(h[n].sum()) for n in names) / sum(float((mean[n] ** 2).sum()) for n in names)
    assert ratio > 1.1
    # and the optimizer saw the batch-mean gradient of the per-sample losses
    for n in names:
        torch.testing.assert_close(grads[n], mean[n], rtol=1e-4, atol=1e-5 * float(mean[n].abs().max()))


def test_plain_training_sees_the_same_gradient(setting, tmp_path):
    recipe, samples = setting
    _, with_h, names = run(recipe, samples, True, tmp_path / "a")
    trainer, plain, _ = run(recipe, samples, False, tmp_path / "b")
    assert not trainer.h_sum
    assert set(plain) == set(names)                    # only the merge set is trained
    for n in names:
        torch.testing.assert_close(plain[n], with_h[n], rtol=1e-4, atol=1e-5 * float(with_h[n].abs().max()))


def test_per_sample_loss_is_the_models_loss(setting):
    recipe, samples = setting
    model, processor = mm.load_family(recipe.model)
    enc = mm.Encoder(processor)
    b = enc.batch(samples)
    with torch.no_grad():
        per = ft.per_sample_loss(model, b)
        ref = torch.stack([model(**enc.batch([s])).loss for s in samples])
    torch.testing.assert_close(per, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe_name, backbone", [("llava-1.5-7b-okvqa", "llava-1.5-7b"),
                                                   ("qwen2.5-vl-3b-latex_ocr", "qwen2.5-vl-3b")])
def test_trained_tensors_of_the_real_models(recipe_name, backbone):
    """On the real architectures (meta device, no weights): the tensors the chain trains and measures are
    the paper's merge set, the ones cgm-merge merges."""
    from cgm_min.real.architectures import meta_model, parameter_counts
    from cgm_min.real.architectures import merge_set_names as paper_merge_set
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", check_paths=False)
    net = meta_model(backbone)
    names = ft.merge_set_names(net, recipe.merge_set)
    assert names == paper_merge_set(backbone, "in-memory")
    params = dict(net.named_parameters())
    assert sum(params[n].numel() for n in names) == parameter_counts(backbone)["merge_set"]
