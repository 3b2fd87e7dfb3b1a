"""Expected cost of each step of a recipe, from FLOPs and bytes: what `--dry-run` prints and the reproducing
guide's table shows. Estimates, not measurements; every assumption is a named constant below.

Parameter counts: the real models' from `cgm_min.real.architectures.parameter_counts` (the published
configs on the meta device); a miniature's from its checkpoint's safetensors header. With N_lm the language
model's parameters (embeddings and lm_head included), N_vis the vision tower's, N_ms the merge set's, T the
language-model tokens of one sample (image tokens + text) and P the vision tower's patches:

    fine-tuning, per sample   2 N_vis P  +  2 N_lm T (forward)  +  2 N_lm T (activation gradients: the trained
                              projector / merger sits before the decoder, so the backward pass crosses every
                              decoder layer)  +  2 N_ms T (weight gradients)  +  2 N_lm T (gradient
                              checkpointing's second forward, when on)
    h_pt, per sample (Fisher) the same without checkpointing; Hutchinson: a forward, a double backward and
                              `probes` Hessian-vector products per batch (each about two backward passes)
    merge                     streams bytes (CPU and disk, no GPU): both checkpoints' merge set, h_pt and h_ft
                              read, the merged checkpoint written
    evaluation, per document  2 N_vis P + 2 N_lm (T + generated tokens)

GPU-hours = FLOPs / (ASSUMED_PEAK_FLOPS x utilisation) / 3600, summed over GPUs (wall time = GPU-hours /
GPUs for the data-parallel steps, fine-tuning and h_pt; the evaluation runs on the main process's GPU). Memory per GPU: frozen weights in the published dtype; the trained ones
as float32 master weights + float32 gradients + AdamW's two float32 moments + the float32 h_ft sum; with
activations estimated after Korthikanti et al. (2022): 34 h T bytes per layer and sample in bf16 (plus
5 a T^2 for attention scores, a = heads, dropped: SDPA does not store them) for the recomputed layer and 2 h T
per layer for the checkpoints, and float32 logits (2 x 4 V T bytes: logits and their gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

# ---- assumptions (stated in the guide next to every estimate) ----------------------------------------
ASSUMED_GPU = "NVIDIA A100 80 GB"
ASSUMED_PEAK_FLOPS = 312e12           # dense bf16 peak of that GPU
UTILISATION = {"finetune": 0.35, "curvature": 0.20, "evaluate": 0.10}   # fraction of peak reached
ASSUMED_DISK_BYTES_PER_S = 1.0e9      # the merge streams at about 1 GB/s (CPU, no GPU)
QWEN_IMAGE_SIDE = 448                 # Qwen2.5-VL sees images at their size; assume 448 x 448 pixels
MINIATURE_IMAGE_SIDE = 32             # the miniatures' images are 32 x 32
TEXT_TOKENS = {"okvqa": 60, "flickr30k": 70, "latex_ocr": 120, "calibration": 60}   # prompt + answer
GENERATED_TOKENS = {"exact_match": 8, "anls": 16, "pope_accuracy": 2, "gpt_eval_score": 2}  # else 32
# Training records per target when the data folder is not there to count: OK-VQA train2014 questions;
# Flickr30k Karpathy train images (one record per image, five reference captions); LaTeX_OCR train rows.
ASSUMED_TRAIN_RECORDS = {"okvqa": 9009, "flickr30k": 29000, "latex_ocr": 68686}
# Documents per evaluation task (approximate sizes of the lmms-eval splits / the local test split).
ASSUMED_EVAL_DOCS = {"vqav2_val": 214354, "gqa": 12578, "vizwiz_vqa_val": 4319, "scienceqa_img": 2017,
                     "textvqa_val": 5000, "pope": 9000, "mmbench_en_dev": 4329, "mmbench_cn_dev": 4329,
                     "ok_vqa_val2014": 5046, "flickr30k_test": 31784, "infovqa_val": 2801, "latex_ocr": 7632}
MODELS_EVALUATED_EXTRA = 2            # the pre-trained and the fine-tuned model are scored besides the merges
GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """What the estimates need of a model."""
    total: int
    language_model: int
    vision_tower: int
    merge_set: int
    hidden: int
    layers: int
    vocab: int
    image_tokens: int                 # language-model tokens of one image
    patches: int                      # vision-tower positions of one image
    bytes_per_param: int              # published dtype
    largest: int = 0                  # entries of the largest merged tensor (the streaming merge's buffers)


@dataclass(frozen=True)
class StepCost:
    step: str
    what: str
    flops: float
    gpu_hours: float
    memory_gb: float                  # per GPU (the merge: CPU memory)
    device: str = "GPU"


def real_shapes(backbone: str) -> Shapes:
    """A real backbone's shapes from its published config on the meta device (the paper's merge set)."""
    import torch
    from ..io.reader import numel
    from ..real.architectures import get_real, in_memory_shapes, merge_set_names, real_config, stored_dtype
    shapes = in_memory_shapes(backbone)
    return _shapes(real_config(backbone), {n: numel(s) for n, s in shapes.items()},
                   merge_set_names(backbone, "in-memory"), get_real(backbone).vision_prefix,
                   torch.tensor([], dtype=stored_dtype(backbone)).element_size(), QWEN_IMAGE_SIDE)


def checkpoint_shapes(model_path: Path, merge_set) -> Shapes:
    """A (miniature) checkpoint's shapes from its config.json and safetensors header (no weights read)."""
    from transformers import AutoConfig
    from ..io.layouts import canonical_names
    from ..io.reader import DTYPES, Checkpoint
    cfg = AutoConfig.from_pretrained(str(model_path))
    with Checkpoint(model_path, "model") as ck:
        canon = canonical_names(cfg.model_type, ck.names)
        sizes = {c: ck.info(s).numel for c, s in canon.items()}
        width = DTYPES[ck.info(next(iter(ck.names))).dtype][1]
    vision = "model.vision_tower." if cfg.model_type == "llava" else "model.visual."
    return _shapes(cfg, sizes, merge_set.resolve(cfg.model_type, list(canon)), vision, width,
                   MINIATURE_IMAGE_SIDE)


def _shapes(cfg, sizes: Mapping[str, int], merged: Sequence[str], vision_prefix: str, bytes_per_param: int,
            qwen_side: int) -> Shapes:
    """Shapes from a transformers config, {in-memory name: entries} of every stored tensor and the merged
    names. The vision tower counts its projector / merger; a LLaVA image is the CLIP tower's fixed grid, a
    Qwen2.5-VL image `qwen_side` pixels square, its patches merged spatial_merge_size^2 to a token."""
    from ..io.layouts import PROJECTOR_PREFIX
    text, vis = cfg.text_config, cfg.vision_config
    if cfg.model_type == "llava":
        side = vis.image_size // vis.patch_size
        patches = image_tokens = side * side
    else:
        side = qwen_side // vis.patch_size
        patches = side * side
        image_tokens = patches // (vis.spatial_merge_size ** 2)
    projector = PROJECTOR_PREFIX[cfg.model_type]
    vision = sum(n for c, n in sizes.items() if c.startswith(vision_prefix) or c.startswith(projector))
    total = sum(sizes.values())
    return Shapes(total, total - vision, vision, sum(sizes[c] for c in merged), text.hidden_size,
                  text.num_hidden_layers, text.vocab_size, image_tokens, patches, bytes_per_param,
                  max(sizes[c] for c in merged))


def _hours(flops: float, step: str) -> float:
    return flops / (ASSUMED_PEAK_FLOPS * UTILISATION[step]) / 3600


def _activations(s: Shapes, tokens: int, micro: int, checkpointing: bool) -> float:
    per_layer = 34 * s.hidden * tokens * micro * 2          # bf16 bytes of one layer's saved activations
    stored = (2 * s.hidden * tokens * micro * s.layers + per_layer) if checkpointing else per_layer * s.layers
    return stored + 2 * 4 * s.vocab * tokens * micro


def train_records(recipe) -> int:
    """The training records: counted in the data folder when it is there, else the assumption above."""
    from .data import split_file
    if recipe.data_dir is not None:
        f = split_file(recipe.data_dir, recipe.target, "train")
        if f.is_file():
            with f.open() as fh:
                return sum(1 for line in fh if line.strip())
    if recipe.scale == "tiny":
        return recipe.finetune.max_samples or 0
    return ASSUMED_TRAIN_RECORDS[recipe.target]


def step_costs(recipe, shapes: Shapes | None = None, n_train: int | None = None) -> list[StepCost]:
    """The cost of every step of `recipe` (see the module docstring for the model)."""
    s = shapes or (real_shapes(recipe.backbone) if recipe.scale == "paper"
                   else checkpoint_shapes(Path(recipe.model), recipe.merge_set))
    ft, cv, ev = recipe.finetune, recipe.curvature, recipe.evaluate
    T = s.image_tokens + TEXT_TOKENS.get(recipe.target, 60)
    n = n_train if n_train is not None else train_records(recipe)
    seen = n * ft.epochs
    if ft.max_steps is not None:
        seen = min(seen, ft.max_steps * ft.global_batch)
    vis = 2 * s.vision_tower * s.patches
    fwd = vis + 2 * s.language_model * T
    per_sample = fwd + 2 * s.language_model * T + 2 * s.merge_set * T
    ck = ft.gradient_checkpointing and recipe.scale == "paper"
    train_flops = seen * (per_sample + (2 * s.language_model * T if ck else 0))
    frozen = (s.total - s.merge_set) * s.bytes_per_param
    trained = s.merge_set * (4 + 4 + 8 + (4 if ft.h_ft else 0))
    micro = ft.micro_batch if not ft.h_ft else 1            # h_ft runs one sample at a time
    mem_ft = frozen + trained + _activations(s, T, micro, ck)
    cal = cv.n_per_task * len(recipe.evaluate.general)
    if cv.estimator == "fisher":
        cal_flops = cal * per_sample
    else:
        batches = -(-cal // cv.micro_batch)
        cal_flops = cal * (fwd + 2 * 2 * s.language_model * T) + batches * cv.probes * cv.micro_batch * 2 * (
            2 * s.language_model * T)
    mem_cv = s.total * s.bytes_per_param + s.merge_set * (4 + s.bytes_per_param) + _activations(
        s, T, 1 if cv.estimator == "fisher" else cv.micro_batch, False)
    merge_bytes = len(recipe.merge) * (s.total * s.bytes_per_param * 2 + s.merge_set * (s.bytes_per_param + 8))
    # the streaming merge holds a few tensors at once: w_pt, w_ft, h_pt, h_ft and the result of the largest
    # merged tensor in float32, read-ahead and write-behind doubling it
    mem_merge = 2 * s.largest * 4 * 5
    eval_flops, docs = 0.0, 0
    for t in (*ev.general, ev.target):
        d = ASSUMED_EVAL_DOCS.get(t.task, 0) if recipe.scale == "paper" else (ev.limit or 0)
        d = min(d, ev.limit) if ev.limit else d
        gen = GENERATED_TOKENS.get(t.metric[0], 32)
        eval_flops += d * (vis + 2 * s.language_model * (T + gen))
        docs += d
    models = len(recipe.merge) + MODELS_EVALUATED_EXTRA
    eval_flops *= models
    mem_ev = s.total * s.bytes_per_param + _activations(s, T, ev.batch_size, False) / s.layers
    return [
        StepCost("finetune", f"{seen:,.0f} samples ({ft.epochs:g} epoch(s)), merge set {s.merge_set / 1e6:,.0f} M "
                 f"params" + (", h_ft" if ft.h_ft else ""), train_flops, _hours(train_flops, "finetune"), mem_ft / GB),
        StepCost("curvature", f"h_pt from {cal} calibration samples ({cv.estimator})", cal_flops,
                 _hours(cal_flops, "curvature"), mem_cv / GB),
        StepCost("merge", f"{len(recipe.merge)} merge(s), {merge_bytes / GB:,.1f} GB streamed", 0.0,
                 merge_bytes / ASSUMED_DISK_BYTES_PER_S / 3600, mem_merge / GB, device="CPU + disk"),
        StepCost("evaluate", f"{models} models x {docs:,} documents", eval_flops, _hours(eval_flops, "evaluate"),
                 mem_ev / GB),
    ]


def plan_text(recipe, costs: Sequence[StepCost] | None = None) -> str:
    """The dry run's plan: one line per step with its GPU-hours and memory, then the assumptions."""
    costs = costs or step_costs(recipe)
    lines = [f"recipe {recipe.name} ({recipe.scale}): {recipe.backbone} on {recipe.target}, "
             f"merge set {recipe.merge_set.describe()}, {recipe.gpus} GPU(s) assumed"]
    lines.append("  data        check the local data folder (checksums) or export the miniature tasks")
    for c in costs:
        wall = c.gpu_hours / (recipe.gpus if c.step in ("finetune", "curvature") else 1)   # evaluate: one GPU
        unit = "GPU-h" if c.device == "GPU" else "h (CPU)"
        lines.append(f"  {c.step:<11} {c.gpu_hours:9.3g} {unit:<7} (wall {wall:.3g} h)  "
                     f"{c.memory_gb:7.1f} GB  {c.flops:9.3g} FLOP  {c.what}")
    lines.append("  results     the results table (cgm_min.experiments.results schema)")
    lines.append(assumptions_text())
    return "\n".join(lines)


def assumptions_text() -> str:
    u = ", ".join(f"{k} {v:.0%}" for k, v in UTILISATION.items())
    return (f"assumed: {ASSUMED_GPU}, {ASSUMED_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak, utilisation {u}; "
            f"merge streaming {ASSUMED_DISK_BYTES_PER_S / 1e9:g} GB/s")


def cost_table(recipes: Sequence) -> "pd.DataFrame":
    """One row per (recipe, step): GPU-hours and memory per GPU (the reproducing guide's table)."""
    import pandas as pd
    rows = []
    for r in recipes:
        for c in step_costs(r):
            rows.append({"recipe": r.name, "step": c.step, "device": c.device, "GPU-hours": c.gpu_hours,
                         "memory (GB)": c.memory_gb, "TFLOP": c.flops / 1e12, "what": c.what})
    return pd.DataFrame(rows)


def shipped_recipes(folder: str | Path | None = None, scale: str = "paper") -> list:
    """The recipes in recipes/ of the given scale (paths not checked: planning only)."""
    from .recipes import load_recipe
    folder = Path(folder) if folder else Path(__file__).resolve().parents[2] / "recipes"
    out = [load_recipe(p, check_paths=False) for p in sorted(folder.glob("*.yaml"))]
    return [r for r in out if r.scale == scale]


def markdown_table(recipes: Sequence) -> str:
    """The guide's cost table as Markdown (rendered by the book, checked by a test against step_costs)."""
    df = cost_table(recipes)
    lines = ["| recipe | step | device | hours | memory (GB) | what |", "|---|---|---|---:|---:|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['recipe']} | {r['step']} | {r['device']} | {r['GPU-hours']:.3g} | "
                     f"{r['memory (GB)']:.1f} | {r['what']} |")
    return "\n".join(lines)


def shapes_summary(recipes: Sequence) -> Mapping[str, Shapes]:
    return {r.backbone: real_shapes(r.backbone) for r in recipes if r.scale == "paper"}


# ----------------------------------------------------------------------------------------------
# The reproducing guide's table, rendered from the code between two markers.

START, END = "<!-- cost-table: generated by python -m cgm_min.reproduce.costs -->", "<!-- cost-table: end -->"


def guide_block(recipes: Sequence | None = None) -> str:
    recipes = shipped_recipes() if recipes is None else recipes
    return f"{START}\n{markdown_table(recipes)}\n\n{assumptions_text()}.\n{END}"


def update_guide(path: str | Path) -> bool:
    """Rewrite the block between the markers of the guide at `path`; returns whether it changed."""
    path = Path(path)
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no cost-table markers")
    new = text[:text.index(START)] + guide_block() + text[text.index(END) + len(END):]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    guide = Path(__file__).resolve().parents[2] / "book" / "reproducing.md"
    print(f"{guide}: {'updated' if update_guide(guide) else 'up to date'}")
