"""Fine-tuning the merge set with transformers' Trainer, accumulating h_ft on the way.

    from cgm_min.reproduce.finetune import finetune
    log = finetune(recipe, records, out_dir)     # out_dir/model (checkpoint), out_dir/h_ft (curvature files)

What is trained: the recipe's merge set (cgm-merge's `MergeSet.resolve` on the model's in-memory names, so
the fine-tuned tensors are exactly the merged ones); everything else is frozen. Trainer does the rest:
AdamW, linear warm-up then cosine decay, gradient accumulation to the global batch, bf16 autocast on a GPU
(fp32 on the CPU), gradient checkpointing where the model supports it, and several GPUs when the command
is started by `accelerate launch` (DDP; no distribution code here). On a GPU the frozen weights stay in the
published dtype (bf16) and the trained ones are float32 (master weights: lr 1e-5 updates vanish in bf16);
they are cast back to the published dtype when saved, so the fine-tuned checkpoint has the base's dtypes.

The loss. Every sample's loss is the mean over its answer tokens (`per_sample_loss`, the same number as
`model(**sample).loss`), and the optimised loss is the mean over the samples of a global batch.

h_ft, the empirical Fisher accumulated during training (the paper's practice). With `h_ft` on, each micro
batch is split into single samples (`cgm.split_samples`); each gets its own forward and backward, scaled
by 1 / (samples per optimizer step), so the accumulated gradient is the same as the batched step's. A
gradient hook on every trained parameter receives that sample's gradient g_n (divided back by the scale)
and adds g_n ** 2 in float32, before DDP's reduction and before the optimizer step: h_ft = mean over all
samples seen (every epoch) of g_n ** 2 at the weights of the moment, each process's sums reduced. This is
the per-sample Fisher of `cgm.diag_fisher`, not the square of a micro-batch gradient (tested against a
brute-force per-sample loop). Only the last sample of a micro batch triggers DDP's gradient all-reduce.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..cgm import split_samples


def per_sample_loss(model, inputs: Mapping) -> torch.Tensor:
    """(n,) mean token cross-entropy of each sample of a batch over its labelled positions (labels != -100),
    with the usual causal shift; the same as `model(**sample).loss` for each sample alone."""
    labels = inputs["labels"]
    out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    return ce.sum(1) / (tgt != -100).sum(1).clamp(min=1)


class Records(torch.utils.data.Dataset):
    def __init__(self, records: Sequence):
        self.records = list(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class Collate:
    """Trainer's data collator: `world.models.Encoder.batch` (image + prompt, answer tokens labelled)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, records):
        return dict(self.encoder.batch(records))


def _trainer_class():
    from transformers import Trainer

    class HftTrainer(Trainer):
        """Trainer whose loss is the mean of per-sample losses and which, with `h_ft`, accumulates the
        squared per-sample gradients of the trained parameters (see the module docstring)."""

        def __init__(self, *args, h_ft: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False      # our loss is normalised here, per sample
            self.h_ft_on = h_ft
            self.h_sum: dict[str, torch.Tensor] = {}
            self.h_count = 0
            self._scale: float | None = None
            self._hooks = []
            if h_ft:
                for name, p in self.model.named_parameters():
                    if p.requires_grad:
                        self.h_sum[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                        self._hooks.append(p.register_hook(functools.partial(self._square, name)))

        def _square(self, name: str, grad: torch.Tensor):
            if self._scale is not None:
                h = self.h_sum[name]
                if h.device != grad.device:             # Trainer moved the model after the buffers were made
                    h = self.h_sum[name] = h.to(grad.device)
                h.add_((grad.float() / self._scale) ** 2)
            return None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = per_sample_loss(model, inputs).mean()
            return (loss, None) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not self.h_ft_on:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            inputs = self._prepare_inputs(inputs)
            samples = list(split_samples(inputs))
            scale = 1.0 / (len(samples) * self.current_gradient_accumulation_steps)
            total = torch.zeros((), device=self.args.device)
            for i, sample in enumerate(samples):
                last = i == len(samples) - 1
                sync = contextlib.nullcontext() if last or self.accelerator.num_processes == 1 \
                    else self.accelerator.no_sync(model)
                with sync:
                    with self.compute_loss_context_manager():
                        loss = per_sample_loss(model, sample)[0]
                    self._scale = scale
                    try:
                        self.accelerator.backward(loss * scale)
                    finally:
                        self._scale = None
                total += loss.detach() * scale
                self.h_count += 1
            return total

        def h_ft(self) -> tuple[dict[str, torch.Tensor], int]:
            """({name: mean squared per-sample gradient}, samples): every process's sums reduced."""
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            acc = self.accelerator
            count = torch.tensor(float(self.h_count), device=acc.device)
            if acc.num_processes > 1:
                count = acc.reduce(count, "sum")
            out = {}
            for name, h in self.h_sum.items():
                h = h.to(acc.device)
                if acc.num_processes > 1:
                    h = acc.reduce(h, "sum")
                out[name] = (h / count).cpu()
            return out, int(count.item())

    return HftTrainer


class StepTimer:
    """A TrainerCallback that records the wall time of every optimizer step (CUDA synchronised)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._t = None

            @staticmethod
            def _sync():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()

            def on_step_begin(self, args, state, control, **kw):
                self._sync()
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self._sync()
                self.times.append(time.perf_counter() - self._t)

        return _Timer()


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def merge_set_names(model, merge_set) -> list[str]:
    """The in-memory names of `model`'s parameters in the merge set, as cgm-merge resolves it (so the
    trained, measured and merged tensors are the same ones)."""
    names = [n for n, _ in model.named_parameters()]
    return merge_set.resolve(model.config.model_type, names)


def load_published(model_path, cuda: bool):
    """(model, processor, the checkpoint's published dtype): loaded in that dtype on a GPU, in float32 on the
    CPU."""
    from ..world import models as mm
    cfg = mm.read_config(model_path)
    stored = getattr(torch, cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32)
    model, processor = mm.load_family(model_path, dtype=stored if cuda else torch.float32)
    return model, processor, stored


def load_for_training(recipe, model_path):
    """(model, processor, trained names, the published dtype): the pre-trained checkpoint with only the
    merge set trainable (float32 on a GPU where the checkpoint is bf16)."""
    model, processor, stored = load_published(model_path, cuda=device_kind() == "cuda")
    chosen = merge_set_names(model, recipe.merge_set)
    chosen_set = set(chosen)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen_set)
        if n in chosen_set and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, processor, chosen, stored


def training_arguments(recipe, out_dir: Path, n_processes: int, max_steps: int | None = None, **overrides):
    from transformers import TrainingArguments
    ft = recipe.finetune
    per_step = ft.micro_batch * n_processes
    if ft.global_batch % per_step:
        raise ValueError(f"finetune.global_batch {ft.global_batch} is not a multiple of micro_batch x processes "
                         f"= {ft.micro_batch} x {n_processes}")
    cuda = device_kind() == "cuda"
    steps = max_steps if max_steps is not None else ft.max_steps
    kw = dict(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=ft.micro_batch,
              gradient_accumulation_steps=ft.global_batch // per_step, learning_rate=ft.lr,
              num_train_epochs=ft.epochs, max_steps=steps if steps is not None else -1,
              lr_scheduler_type="cosine", warmup_steps=ft.warmup_ratio, weight_decay=ft.weight_decay,
              bf16=cuda, use_cpu=not cuda, gradient_checkpointing=ft.gradient_checkpointing and cuda,
              gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
              save_strategy="no", report_to="none", logging_steps=1, seed=ft.seed, data_seed=ft.seed,
              ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=True,
              max_grad_norm=1.0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def train(recipe, model, processor, records: Sequence, out_dir: Path, h_ft: bool, max_steps: int | None = None,
          progress: bool = False):
    """Run Trainer on `records`. Returns (trainer, step timer)."""
    from ..world import models as mm
    from .chain import process_state
    n_proc = process_state().num_processes
    args = training_arguments(recipe, out_dir, n_proc, max_steps, disable_tqdm=not progress)
    timer = StepTimer()
    trainer = _trainer_class()(model=model, args=args, train_dataset=Records(records),
                               data_collator=Collate(mm.Encoder(processor)), callbacks=[timer], h_ft=h_ft)
    if not progress:
        from transformers.trainer_callback import PrinterCallback
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer, timer


def finetune(recipe, model_path, records: Sequence, out_dir: str | Path, progress: bool = False) -> dict:
    """Fine-tune the recipe's merge set on `records`; write out_dir/model (checkpoint in the base's dtypes,
    with its processor) and, with finetune.h_ft, out_dir/h_ft (cgm-merge's curvature layout). Only the main
    process writes. Returns the log (also out_dir/log.json)."""
    from ..io.curvature_files import write_curvature
    from ..world import models as mm
    out_dir = Path(out_dir)
    model, processor, names, stored = load_for_training(recipe, model_path)
    t0 = time.perf_counter()
    trainer, timer = train(recipe, model, processor, records, out_dir, recipe.finetune.h_ft, progress=progress)
    seconds = time.perf_counter() - t0
    h, n_h = trainer.h_ft() if recipe.finetune.h_ft else (None, 0)
    acc = trainer.accelerator
    log = {"samples": len(records), "optimizer_steps": trainer.state.global_step, "seconds": seconds,
           "step_seconds": timer.times, "processes": acc.num_processes, "device": device_kind(),
           "trained_tensors": len(names), "trained_parameters": sum(p.numel() for n, p in model.named_parameters()
                                                                   if p.requires_grad),
           "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r], "h_ft_samples": n_h}
    acc.wait_for_everyone()
    if acc.is_main_process:
        net = acc.unwrap_model(trainer.model)
        trained = set(names)
        for n, p in net.named_parameters():
            p.requires_grad_(False)
            if n in trained and p.dtype != stored and device_kind() == "cuda":
                p.data = p.data.to(stored)
        net = net.cpu().eval()
        mm.save_family(net, processor, out_dir / "model")
        if h is not None:
            meta = {"kind": "h_ft", "estimator": "empirical_fisher_during_training", "samples": n_h,
                    "recipe": recipe.name, "target": recipe.target}
            write_curvature(h, out_dir / "model", out_dir / "h_ft", meta, hash_cache=True)
        (out_dir / "log.json").write_text(json.dumps(log, indent=1))
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)        # Trainer's output_dir (nothing saved)
    acc.wait_for_everyone()
    return log


# ----------------------------------------------------------------------------------------------
# The throughput cost of accumulating h_ft.

def hft_overhead(recipe, model_path, records: Sequence, steps: int = 6, repeats: int = 3, out_dir=None) -> dict:
    """Median optimizer-step time of plain training and of training with h_ft accumulation, measured side by
    side: `repeats` alternating short runs of each (`steps` optimizer steps from the same pre-trained
    weights; the first step of every run is a warm-up and not counted). Returns the medians, their ratio
    and the samples per second of each."""
    import tempfile
    times = {"plain": [], "h_ft": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for mode in ("plain", "h_ft"):
                model, processor, _, _ = load_for_training(recipe, model_path)
                _, timer = train(recipe, model, processor, records, Path(out_dir or tmp), mode == "h_ft",
                                 max_steps=steps + 1)
                times[mode] += timer.times[1:]
    med = {m: statistics.median(v) for m, v in times.items()}
    batch = recipe.finetune.global_batch
    return {"median_step_s": med, "samples_per_s": {m: batch / t for m, t in med.items()},
            "overhead": med["h_ft"] / med["plain"] - 1.0, "steps_each": {m: len(v) for m, v in times.items()},
            "global_batch": batch, "micro_batch": recipe.finetune.micro_batch, "device": device_kind()}


def n_optimizer_steps(n_samples: int, epochs: float, global_batch: int) -> int:
    """Optimizer steps of a run (the cost model's count; Trainer rounds the last partial batch up)."""
    return max(1, math.ceil(n_samples / global_batch * epochs))
