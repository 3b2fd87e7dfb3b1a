"""Miniature LLaVA-1.5 and Qwen2.5-VL: the real `transformers` classes at tiny sizes.

  LLaVA-1.5   LlavaForConditionalGeneration: CLIP vision tower (patch 8 on 32x32 -> 16 image tokens)
              + two-layer MLP projector (`model.multi_modal_projector`) + Llama decoder.
  Qwen2.5-VL  Qwen2_5_VLForConditionalGeneration: Qwen2.5-VL vision tower (patch 4, 2x2 merge -> 16 image
              tokens) + patch merger (`model.visual.merger`) + Qwen2 decoder with M-RoPE.

Everything the real checkpoints have is here too, saved in the standard Hugging Face layout
(config.json + model.safetensors, tokenizer.json, processor_config.json, chat_template.jinja), so
`load_family(path)` loads a miniature and a real checkpoint's directory the same way, and
`merge_param_names(model)` selects "the last N decoder layers + projector" by the real parameter names.

Three facts learned the hard way (see the book's miniature-world chapter):
  * a 2-layer CLIP tower must use `vision_feature_layer=-1` (-2 would use only its first layer);
  * Qwen's rotary split `mrope_section` must give the width axis high frequencies at head_dim 32
    ([1, 1, 14]): with the default-style [4, 6, 6] left and right look alike and spatial tasks stay at chance;
  * Qwen inputs must carry `mm_token_type_ids` (the processor returns them): without them transformers
    silently falls back to 1-D positions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          LlavaProcessor, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
from transformers.processing_utils import ProcessorMixin  # noqa: E402

FAMILIES = ("llava", "qwen")
MODEL_TYPE = {"llava": "llava", "qwen": "qwen2_5_vl"}
IMAGE_SIZE = 32

# ----------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE trained offline on the task texts (tiny vocabulary, no download).

SPECIAL_TOKENS = {
    "llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "qwen": ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|image_pad|>", "<|video_pad|>"],
}
END_TOKEN = {"llava": "</s>", "qwen": "<|im_end|>"}

# Chat templates in each family's real format. Message content may be a string (used verbatim, as
# lmms-eval passes it) or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = {
    "llava": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}USER: {% elif message['role'] == 'assistant' -%}ASSISTANT:"
        "{%- else -%}{{ message['role'] | upper }}: {% endif -%}"
        "{%- if message['content'] is string -%}"
        "{%- if message['role'] == 'assistant' %} {% endif -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
        "{%- elif part['type'] == 'text' -%}{%- if message['role'] == 'assistant' %} {% endif -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}</s>{%- else %} {% endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
    ),
    "qwen": (
        "{%- for message in messages -%}"
        "<|im_start|>{{ message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
}
# How an answer follows the generation prompt: LLaVA-1.5 puts a space after "ASSISTANT:".
ANSWER_PREFIX = {"llava": " ", "qwen": ""}


def train_tokenizer(family: str, corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenizer), trained on `corpus`, with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    specials = SPECIAL_TOKENS[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(corpus) + ["USER: ASSISTANT: user assistant system\n"]
    tok.train_from_iterator(texts, trainer)
    if family == "llava":     # Llama tokenizers start every sequence with <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
    """The Qwen2.5-VL processor without its video processor (which needs torchvision, unusable with the CPU
    torch build). Images and text behave exactly as in `Qwen2_5_VLProcessor`; videos are not supported."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_processor(family: str, corpus: Iterable[str] | None = None, vocab_size: int = 1024):
    """A fresh processor (tokenizer trained on `corpus`, default: the miniature tasks' corpus)."""
    check_family(family)
    if corpus is None:
        from .tasks import tokenizer_corpus
        corpus = tokenizer_corpus()
    tok = train_tokenizer(family, corpus, vocab_size)
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE["llava"])
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    ip = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)
    return ImageOnlyQwen25VLProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE["qwen"])


# ----------------------------------------------------------------------------------------------
# Models.

SIZES = {
    # hidden sizes and depths; ~1.2-1.6 M parameters. "small" is the shipped size.
    "small": dict(vision_hidden=128, vision_layers=2, vision_ffn=512, text_hidden=128, text_layers=4, text_ffn=336,
                  heads=4, kv_heads=4, qwen_vision_ffn=256, tie_embeddings=False),
    # twice the decoder width (hidden 256, FFN 672; ~4 M parameters): the capacity knob of the merge experiment
    "wide": dict(vision_hidden=128, vision_layers=2, vision_ffn=512, text_hidden=256, text_layers=4, text_ffn=672,
                 heads=4, kv_heads=4, qwen_vision_ffn=256, tie_embeddings=False),
    # a few-tensor model for unit tests
    "test": dict(vision_hidden=32, vision_layers=1, vision_ffn=64, text_hidden=32, text_layers=2, text_ffn=64,
                 heads=2, kv_heads=2, qwen_vision_ffn=64, tie_embeddings=False),
}


def build_model(family: str, processor, size: str = "small", seed: int = 0, **overrides):
    """A randomly initialised miniature (initialisation seeded by `seed`)."""
    check_family(family)
    s = {**SIZES[size], **overrides}
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    if family == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"],
                                           num_hidden_layers=s["vision_layers"], num_attention_heads=s["heads"],
                                           image_size=IMAGE_SIZE, patch_size=8),
            text_config=LlamaConfig(vocab_size=len(tok), hidden_size=s["text_hidden"], intermediate_size=s["text_ffn"],
                                    num_hidden_layers=s["text_layers"], num_attention_heads=s["heads"],
                                    num_key_value_heads=s["kv_heads"], max_position_embeddings=256,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id),
            image_token_index=ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
            projector_hidden_act="gelu", tie_word_embeddings=s["tie_embeddings"])
        cls = LlavaForConditionalGeneration
    else:
        head_dim = s["text_hidden"] // s["heads"]
        # M-RoPE (temporal, height, width) split of the head_dim/2 rotary frequencies: the width axis takes
        # the highest frequencies, so that one image column differs visibly from the next
        mrope = [1, 1, head_dim // 2 - 2]
        cfg = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=s["text_hidden"], intermediate_size=s["text_ffn"],
                             num_hidden_layers=s["text_layers"], num_attention_heads=s["heads"],
                             num_key_value_heads=s["kv_heads"], max_position_embeddings=256,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                             bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                             pad_token_id=ids("<|endoftext|>")),
            vision_config=dict(depth=s["vision_layers"], hidden_size=s["vision_hidden"],
                               intermediate_size=s["qwen_vision_ffn"], num_heads=s["heads"],   # gated MLP
                               out_hidden_size=s["text_hidden"], patch_size=4, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=IMAGE_SIZE,
                               fullatt_block_indexes=[s["vision_layers"] - 1]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=s["tie_embeddings"])
        cls = Qwen2_5_VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    # generation defaults: greedy, stop at the family's end token
    model.generation_config.eos_token_id = ids(END_TOKEN[family])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    return model.eval()


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def family_of(model_or_config) -> str:
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = cfg["model_type"] if isinstance(cfg, dict) else cfg.model_type
    for fam, t in MODEL_TYPE.items():
        if mt == t:
            return fam
    raise ValueError(f"not a LLaVA or Qwen2.5-VL model: model_type {mt!r}")


def n_params(model, names: Iterable[str] | None = None) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in (params if names is None else names))


# ----------------------------------------------------------------------------------------------
# Saving and loading (the same code path for miniatures and real checkpoints).

def save_family(model, processor, path: str | os.PathLike) -> Path:
    """save_pretrained of model (safetensors) and processor into one directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of a checkpoint folder, or a one-line error naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: it has no config.json")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err.msg} at line {err.lineno})") from None


def load_processor(path: str | os.PathLike, family: str | None = None):
    family = family or family_of(read_config(path))
    cls = LlavaProcessor if family == "llava" else ImageOnlyQwen25VLProcessor
    return cls.from_pretrained(str(path))


def load_family(path: str | os.PathLike, dtype=torch.float32):
    """(model, processor) from a directory holding a LLaVA or Qwen2.5-VL checkpoint, miniature or real.

    The family is read from config.json. The Qwen processor is the image-only subclass (no torchvision),
    whose `from_pretrained` reads a real checkpoint's tokenizer and image-processor files as well.
    """
    path = Path(path)
    family = family_of(read_config(path))
    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2_5_VLForConditionalGeneration
    model = cls.from_pretrained(str(path), dtype=dtype).eval()
    return model, load_processor(path, family)


# The pre-trained miniatures shipped in the repository (made by `cgm-train pretrain`, with a
# provenance manifest: `cgm-provenance verify checkpoints/NAME`). "wide" is the capacity knob of the merge
# experiment (decoder hidden 256); it exists for LLaVA only (the checkpoints must stay within 40 MB).
CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
SHIPPED = {("llava", "small"): "mini-llava-1.5", ("qwen", "small"): "mini-qwen2.5-vl",
           ("llava", "wide"): "mini-llava-1.5-wide"}


def shipped_checkpoint(family: str, size: str = "small") -> Path:
    """The directory of the shipped pre-trained miniature of `family` at `size`."""
    check_family(family)
    if (family, size) not in SHIPPED:
        raise ValueError(f"no shipped {family} miniature of size {size!r}; shipped: "
                         f"{sorted(f'{f}/{s}' for f, s in SHIPPED)}")
    path = CHECKPOINT_DIR / SHIPPED[family, size]
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shipped {family} miniature is missing: no model.safetensors in {path}. "
                                f"Make one with `cgm-train pretrain --family {family} --size {size} --out DIR`.")
    return path


# ----------------------------------------------------------------------------------------------
# The merge set: "last N decoder layers + projector", by the real models' parameter names.

PROJECTOR_PREFIX = {"llava": "model.multi_modal_projector.", "qwen": "model.visual.merger."}
LAYER_PREFIX = "model.language_model.layers."


def n_text_layers(model) -> int:
    cfg = model.config.text_config
    return int(cfg.num_hidden_layers)


def merge_param_names(model, n_layers: int | None = None) -> list[str]:
    """Names of the fine-tuned / merged parameters: the last `n_layers` decoder layers
    (`model.language_model.layers.{i}.*`) and the projector (`model.multi_modal_projector.*` for LLaVA,
    `model.visual.merger.*` for Qwen2.5-VL). Default: half of the decoder layers (the paper: LLaVA-1.5-7B
    last 12 of 32 + projector; Qwen2.5-VL-3B last 6 of 36 + merger)."""
    family = family_of(model)
    total = n_text_layers(model)
    n = total // 2 if n_layers is None else int(n_layers)
    if not 0 <= n <= total:
        raise ValueError(f"n_layers must lie in [0, {total}], got {n}")
    layers = {str(i) for i in range(total - n, total)}
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(PROJECTOR_PREFIX[family]):
            names.append(name)
        elif name.startswith(LAYER_PREFIX) and name[len(LAYER_PREFIX):].split(".", 1)[0] in layers:
            names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# Prompts and batches.

def messages_for(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class Encoder:
    """Turns task samples into model inputs, with per-question prompt caching.

    `batch(samples, with_answers=True)` -> BatchFeature with labels: the prompt (image tokens included)
    and padding are -100, the loss is on the answer tokens + the end token. Padding is on the right for
    training and teacher-forced evaluation; `prompts(samples)` pads on the left for generation.
    """

    def __init__(self, processor, family: str | None = None):
        self.processor = processor
        self.tok = processor.tokenizer
        self.family = family or ("llava" if isinstance(processor, LlavaProcessor) else "qwen")
        self.end = END_TOKEN[self.family]
        self.end_id = self.tok.convert_tokens_to_ids(self.end)
        self._prompt, self._answer = {}, {}

    def prompt(self, question: str) -> str:
        if question not in self._prompt:
            self._prompt[question] = self.processor.apply_chat_template(
                messages_for(question), add_generation_prompt=True, tokenize=False)
        return self._prompt[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer:
            self._answer[answer] = self.tok(ANSWER_PREFIX[self.family] + answer, add_special_tokens=False)["input_ids"] + [self.end_id]
        return self._answer[answer]

    def answer_text(self, answer: str) -> str:
        return ANSWER_PREFIX[self.family] + answer + self.end

    def full_text(self, sample) -> str:
        """Prompt + answer + end token as one string (what `batch` encodes, as text)."""
        return self.prompt(sample.question) + self.answer_text(sample.answer)

    def _call(self, images, texts, side):
        self.tok.padding_side = side
        try:
            return self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        finally:
            self.tok.padding_side = "right"

    def batch(self, samples: Sequence, with_answers: bool = True, answer_ids: Sequence[Sequence[int]] | None = None):
        """Right-padded model inputs. The processor encodes image + prompt; the answer's token ids (answer
        prefix + answer + end token, or `answer_ids` when given) are appended, so the label positions never
        depend on how a tokenizer would split the prompt/answer boundary."""
        images = [s.image for s in samples]
        enc = self._call(images, [self.prompt(s.question) for s in samples], "right")
        if not with_answers:
            return enc
        answers = [self.answer_ids(s.answer) for s in samples] if answer_ids is None else [list(a) for a in answer_ids]
        lengths = enc["attention_mask"].sum(1).tolist()
        width = max(L + len(a) for L, a in zip(lengths, answers))
        n = len(samples)
        ids = torch.full((n, width), self.tok.pad_token_id, dtype=enc["input_ids"].dtype)
        mask = torch.zeros((n, width), dtype=enc["attention_mask"].dtype)
        labels = torch.full((n, width), -100, dtype=torch.long)
        extra = {k: torch.zeros((n, width), dtype=enc[k].dtype) for k in ("mm_token_type_ids", "token_type_ids")
                 if k in enc}
        for i, (L, a) in enumerate(zip(lengths, answers)):
            ids[i, :L] = enc["input_ids"][i, :L]
            ids[i, L:L + len(a)] = torch.tensor(a, dtype=ids.dtype)
            mask[i, :L + len(a)] = 1
            labels[i, L:L + len(a)] = ids[i, L:L + len(a)]
            for k, v in extra.items():
                v[i, :L] = enc[k][i, :L]
        enc["input_ids"], enc["attention_mask"], enc["labels"] = ids, mask, labels
        for k, v in extra.items():
            enc[k] = v
        return enc

    def prompts(self, samples: Sequence):
        """Left-padded prompts (no answers) for batched generation."""
        return self._call([s.image for s in samples], [self.prompt(s.question) for s in samples], "left")
