"""Evaluation through lmms-eval: a project-owned model class for the miniature (and real) LLaVA-1.5 and
Qwen2.5-VL checkpoints, and the paper's score table.

    from cgm_min.evaluate.lmms_adapter import CGMMini, evaluate_lmms, paper_scores
    lm = CGMMini(model=model, processor=processor)           # or CGMMini(pretrained="path/to/checkpoint")
    df = evaluate_lmms(lm, include_path="build/mini_data")   # tidy: task, metric, score, n
    paper_scores(df, target="caption")                        # Pre-Avg, Target, Hscore (Eq. 15), Avg (Eq. 14)
    lm.swap_weights(merged_state)                             # next model of a merge sweep, no reload

The tasks come from `data_scripts/build_mini_data.py` (one lmms-eval YAML per miniature task). The model
class is registered in lmms-eval as "cgm_mini": in-process, `simple_evaluate(model="cgm_mini",
model_args="pretrained=DIR")` works once this module is imported; on the command line lmms-eval finds it
through the package's entry point (group "lmms_eval.models": cgm_mini = cgm_min.evaluate.lmms_adapter:lmms_manifest):

    python -m lmms_eval --model cgm_mini --model_args pretrained=DIR --batch_size 64 \
        --include_path build/mini_data --tasks mini_general,mini_targets

Why not lmms-eval's own backends: `llava_hf` fails on log-likelihood requests with transformers 5 and
`qwen2_5_vl` needs torchvision, which cannot be used with the CPU build of torch. This class evaluates both
families with the project's own processors and prompts (`world.models.Encoder`: the family's chat template
around the task's question, exactly as in training) and the project's batched greedy decoding
(`decoding.generate`: left padding, stop at the family's end token, keep the text before it).

Only `generate_until` is implemented; log-likelihood and multi-round requests raise NotImplementedError.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.api.registry import register_model  # noqa: E402

from ..world import models as mm  # noqa: E402
from ..world import tasks as mt  # noqa: E402
from . import decoding  # noqa: E402
from . import scores  # noqa: E402

MODEL_NAME = "cgm_mini"
TASK_PREFIX = "mini_"             # lmms-eval task name = "mini_" + miniature task name
METRICS = ("exact_match", "relaxed_match")
DEFAULT_BATCH_SIZE = 64           # = decoding.generate's default, so the batches (and outputs) are the same


class _Query:
    """What `world.models.Encoder.prompts` needs from a sample (the image and the question), with a key
    naming the document; the image is read from the data set only when it is needed."""
    __slots__ = ("key", "question", "_load", "_image")

    def __init__(self, key, question, load):
        self.key, self.question, self._load, self._image = key, question, load, None

    @property
    def image(self):
        if self._image is None:
            self._image = self._load()
        return self._image


class _CachingEncoder(mm.Encoder):
    """`world.models.Encoder` that remembers the processor output of each batch of documents: a merge sweep
    evaluates the same documents in the same batches again and again, and only the weights change."""

    def __init__(self, processor, family, enabled: bool = True):
        super().__init__(processor, family)
        self.enabled = enabled
        self._batches: dict[tuple, object] = {}

    def prompts(self, samples):
        keys = tuple(getattr(s, "key", None) for s in samples)
        if not self.enabled or None in keys:
            return super().prompts(samples)
        if keys not in self._batches:
            self._batches[keys] = super().prompts(samples)
        return self._batches[keys]

    def clear(self):
        self._batches.clear()


def _dtype(value):
    if isinstance(value, torch.dtype) or value is None:
        return value or torch.float32
    name = str(value).replace("torch.", "")
    if name == "auto":
        return torch.float32
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"{MODEL_NAME}: unknown dtype {value!r}")
    return getattr(torch, name)


@register_model(MODEL_NAME)
class CGMMini(lmms):
    """lmms-eval model class for LLaVA-1.5 / Qwen2.5-VL checkpoints loaded with `world.models.load_family`.

    Construct it from an already loaded model (`CGMMini(model=m, processor=p)`: nothing is copied, the
    adapter evaluates `m` as it is now) or from a checkpoint directory (`CGMMini(pretrained=DIR)`, also
    reachable as lmms-eval model_args "pretrained=DIR,batch_size=64"). The family is read from the model's
    config. Greedy decoding only; `max_new_tokens` comes from each task's generation_kwargs.

    For a merge sweep keep one adapter and call `swap_weights(state)` between evaluations: it copies the
    tensors into the loaded model in place (names and shapes checked), so nothing is reloaded.
    """

    is_simple = True

    def __init__(self, pretrained: str | os.PathLike | None = None, model=None, processor=None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, device: str | None = "cpu",
                 device_map: str | None = "cpu", dtype="float32", threads: int | str | None = None,
                 cache_inputs: bool | str = True, max_batch_size=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"{MODEL_NAME}: unknown model_args {sorted(kwargs)}; it takes pretrained, batch_size, "
                            "device, device_map, dtype, threads, cache_inputs")
        if (pretrained is None) == (model is None):
            raise ValueError(f"{MODEL_NAME}: give exactly one of pretrained=PATH or model=(a loaded model)")
        if model is not None and processor is None:
            raise ValueError(f"{MODEL_NAME}: a loaded model needs its processor (processor=...)")
        if device_map not in (None, "", "cpu") and device_map != device:
            raise ValueError(f"{MODEL_NAME}: device_map={device_map!r} is not supported; use device=... "
                             "(the model is placed on one device)")
        if threads not in (None, ""):
            torch.set_num_threads(int(threads))
        if pretrained is not None:
            model, processor = self._load(pretrained, _dtype(dtype))
        self.family = mm.family_of(model)
        self._model = model.eval()
        self.processor = processor
        self.encoder = _CachingEncoder(processor, self.family,
                                       enabled=str(cache_inputs).lower() not in ("false", "0", "no"))
        self.pretrained = None if pretrained is None else str(pretrained)
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size in (None, "", "auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"{MODEL_NAME}: batch_size must be >= 1, got {batch_size!r}")
        self._device = torch.device(device or "cpu")
        if next(self._model.parameters()).device != self._device:
            self._model.to(self._device)
        self.last_generations: dict[tuple[str, int], str] = {}   # (lmms task, doc_id) -> generated text
        self.generate_seconds = 0.0                                # time spent in generate_until (total)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that model_args win over the command line's own options (lmms-eval's
        --batch_size, default 1, would otherwise clash with model_args batch_size)."""
        from lmms_eval import utils
        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------------------------------
    # Loading and weights.

    @staticmethod
    def _load(pretrained, dtype):
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{MODEL_NAME}: pretrained={str(pretrained)!r} is not a checkpoint directory (no config.json). "
                "Expected a LLaVA-1.5 or Qwen2.5-VL directory written by save_pretrained / world.models.save_family.")
        try:
            mm.family_of(json.loads((path / "config.json").read_text()))
        except ValueError as e:
            raise ValueError(f"{MODEL_NAME}: pretrained={str(pretrained)!r}: {e}") from None
        return mm.load_family(path, dtype=dtype)

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached copy of the loaded model's weights (to restore them after a sweep)."""
        return {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    @torch.no_grad()
    def swap_weights(self, state: Mapping[str, torch.Tensor], strict: bool = False) -> list[str]:
        """Copy `state` into the loaded model in place; return the names copied.

        Names are the in-memory ones (`model.state_dict()`, e.g. `model.language_model.layers.3.mlp.up_proj.weight`);
        `state` may hold a subset of them (e.g. only the merged tensors) unless `strict`. Every name must exist
        and every shape match, otherwise nothing is copied. Values are cast to the model's dtype and device.
        """
        target = self._model.state_dict(keep_vars=True)
        unknown = [k for k in state if k not in target]
        if unknown:
            on_disk = any(k.startswith(("language_model.", "vision_tower.")) for k in unknown)
            hint = (" (these look like on-disk checkpoint names: load the checkpoint with world.models.load_family "
                    "and take model.state_dict())") if on_disk else ""
            raise KeyError(f"swap_weights: {len(unknown)} name(s) not in the model, e.g. {unknown[:3]}{hint}")
        bad = [f"{k}: {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in state.items()
               if tuple(v.shape) != tuple(target[k].shape)]
        if bad:
            raise ValueError(f"swap_weights: shape mismatch for {len(bad)} tensor(s), e.g. {bad[:3]}")
        if strict:
            missing = [k for k in target if k not in state]
            if missing:
                raise KeyError(f"swap_weights(strict=True): {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        for k, v in state.items():
            if not torch.is_tensor(v):
                raise TypeError(f"swap_weights: {k} is a {type(v).__name__}, not a tensor")
            t = target[k]
            t.copy_(v.to(device=t.device, dtype=t.dtype))
        return list(state)

    load_state_dict = swap_weights

    # ------------------------------------------------------------------------------------------
    # lmms-eval interface.

    def clean(self):
        """lmms-eval calls this after every evaluation; the base class would delete the model (it deletes
        every nn.Module attribute). Keep it: the adapter is reused across evaluations."""
        return None

    def generate_until(self, requests) -> list[str]:
        """Batched greedy decoding. Requests are grouped by (task, generation settings) and kept in document
        order, so each task is decoded in the same batches as `decoding.generate(model, encoder, samples,
        max_new_tokens, batch_size)` on that task's samples: identical outputs."""
        t0 = time.perf_counter()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            _, gen_kwargs, _, doc_id, task, split = req.args
            groups[(task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(i)
        out: list[str | None] = [None] * len(requests)
        for (task, split, _), idx in groups.items():
            idx.sort(key=lambda i: requests[i].args[3])
            gen_kwargs = dict(requests[idx[0]].args[1])
            max_new = self._check_gen_kwargs(gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            docs = self.task_dict[task][split]
            fingerprint = getattr(docs, "_fingerprint", id(docs))
            queries = []
            for i in idx:
                context, _, doc_to_visual, doc_id, _, _ = requests[i].args
                queries.append(_Query((task, split, fingerprint, doc_id, context),
                                      context, self._visual_loader(task, docs, doc_id, doc_to_visual)))
            texts = decoding.generate(self._model, self.encoder, queries, max_new_tokens=max_new,
                                      batch_size=self.batch_size)
            for i, text in zip(idx, texts):
                for stop in until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[i] = text
                self.last_generations[(task, requests[i].args[3])] = text
        self.generate_seconds += time.perf_counter() - t0
        return out

    @staticmethod
    def _visual_loader(task, docs, doc_id, doc_to_visual):
        def load():
            visuals = doc_to_visual(docs[doc_id])
            if len(visuals) != 1:
                raise ValueError(f"{MODEL_NAME}: {task} doc {doc_id} has {len(visuals)} visuals; exactly one "
                                 "image per document is supported")
            return visuals[0]
        return load

    @staticmethod
    def _check_gen_kwargs(gen_kwargs: Mapping) -> int:
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            raise ValueError(f"{MODEL_NAME}: greedy decoding only (do_sample=False, temperature=0); "
                             f"got {dict(gen_kwargs)}")
        if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
            raise ValueError(f"{MODEL_NAME}: beam search is not supported (num_beams=1)")
        return int(gen_kwargs.get("max_new_tokens", 16))

    def loglikelihood(self, requests):
        raise NotImplementedError(
            f"{MODEL_NAME} implements generate_until only: log-likelihood requests (output_type loglikelihood or "
            "multiple_choice) are not supported. The miniature tasks are generate_until tasks; for a "
            "multiple-choice benchmark use a generate_until variant that asks for the option letter.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME}: multi-round generation is not supported (single-turn "
                                  "generate_until only)")


def lmms_manifest():
    """The lmms-eval (>= 0.7) registry entry; usable as a Python entry point of group "lmms_eval.models"."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.CGMMini")


def _register_v2() -> None:
    """Make `simple_evaluate(model="cgm_mini")` find the class: lmms-eval 0.7 resolves model names through
    lmms_eval.models.MODEL_REGISTRY_V2, not through api.registry."""
    mod = sys.modules.get("lmms_eval.models")
    if mod is not None and not hasattr(mod, "MODEL_REGISTRY_V2"):
        return   # lmms_eval.models is importing this module through its entry point; it registers the manifest
    from lmms_eval.models import MODEL_REGISTRY_V2
    MODEL_REGISTRY_V2.register_manifest(lmms_manifest(), overwrite=True)


_register_v2()


# ----------------------------------------------------------------------------------------------
# Evaluation in-process.

_TASK_CACHE: dict[tuple, tuple] = {}


def _manifest(include_path: Path) -> dict:
    f = include_path / "manifest.json"
    if not f.is_file():
        raise FileNotFoundError(f"{include_path} has no manifest.json: build the tasks first with "
                                f"`python data_scripts/build_mini_data.py --out {include_path}`")
    return json.loads(f.read_text())


def resolve_tasks(tasks: str | Sequence[str] | None, include_path) -> list[str]:
    """Miniature task names from names like "colour", "mini_colour", the groups "mini_general" /
    "mini_targets", or None (every built task)."""
    man = _manifest(Path(include_path))
    built = list(man["tasks"])
    if tasks is None:
        return built
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = []
    for name in tasks:
        if name in man.get("groups", {}):
            out += man["groups"][name]
            continue
        t = name[len(TASK_PREFIX):] if name.startswith(TASK_PREFIX) and name[len(TASK_PREFIX):] in built else name
        if t not in built:
            raise KeyError(f"task {name!r} is not built in {include_path} (built: {built}; groups: "
                           f"{list(man.get('groups', {}))})")
        out.append(t)
    return list(dict.fromkeys(out))


def _task_objects(include_path: Path, tasks: Sequence[str], verbosity: str = "WARNING"):
    """(TaskManager, [lmms-eval Task objects]) for `tasks`; each task (and its data set) is loaded once per
    build of `include_path` and reused by later calls."""
    root = include_path.resolve()
    key = (str(root), (root / "manifest.json").stat().st_mtime_ns)
    if key not in _TASK_CACHE:
        from lmms_eval.tasks import TaskManager
        _TASK_CACHE[key] = (TaskManager(verbosity, include_path=str(root), include_defaults=False), {})
    tm, loaded = _TASK_CACHE[key]
    missing = [TASK_PREFIX + t for t in tasks if TASK_PREFIX + t not in loaded]
    if missing:
        loaded.update(tm.load_task_or_group(missing))
    return tm, [loaded[TASK_PREFIX + t] for t in tasks]


def evaluate_lmms(model_or_adapter, tasks: str | Sequence[str] | None = None, include_path="build/mini_data",
                  limit: int | float | None = None, *, processor=None, batch_size: int | None = None,
                  verbosity: str = "WARNING", log_samples: bool = False, quiet: bool = True):
    """Evaluate one model on miniature tasks through lmms-eval's evaluator, in-process.

    `model_or_adapter`: a CGMMini, a (model, processor) pair, a loaded model with `processor=...`, or a
    checkpoint directory. `tasks`: see `resolve_tasks` (default: all built tasks). The lmms-eval Task
    objects (and their data sets) are built once per include_path and reused, so repeated calls (a merge
    sweep) pay only for generation and scoring. lmms-eval's global seeding is switched off (greedy decoding
    needs no randomness, and the caller's torch / numpy / random state is left as it was).

    Returns a tidy DataFrame with columns task (miniature name), metric (exact_match, relaxed_match),
    score (in [0, 1]) and n; `df.attrs` holds "seconds" (total), "generate_seconds" and, with
    `log_samples`, "samples" (lmms-eval's per-document logs). `quiet` hides lmms-eval's per-task progress bars.
    """
    import pandas as pd
    from lmms_eval.evaluator import simple_evaluate

    t0 = time.perf_counter()
    lm = _as_adapter(model_or_adapter, processor, batch_size)
    include_path = Path(include_path)
    names = resolve_tasks(tasks, include_path)
    tm, task_objs = _task_objects(include_path, names, verbosity)
    gen0 = lm.generate_seconds
    # process_with_media=False: scoring reads the documents without decoding their images (it needs the answer)
    with _quiet_progress(quiet):
        res = simple_evaluate(model=lm, tasks=list(task_objs), task_manager=tm, limit=limit, bootstrap_iters=0,
                              log_samples=log_samples, verbosity=verbosity, random_seed=None, numpy_random_seed=None,
                              torch_random_seed=None, fewshot_random_seed=None, process_docs_parallel=1,
                              cli_args=argparse.Namespace(process_with_media=False))
    rows = []
    for t in names:
        r = res["results"][TASK_PREFIX + t]
        n = res["n-samples"][TASK_PREFIX + t]["effective"]
        for m in METRICS:
            rows.append({"task": t, "metric": m, "score": float(r[f"{m},none"]), "n": int(n)})
    df = pd.DataFrame(rows, columns=["task", "metric", "score", "n"])
    df.attrs["seconds"] = time.perf_counter() - t0
    df.attrs["generate_seconds"] = lm.generate_seconds - gen0
    if log_samples:
        df.attrs["samples"] = res.get("samples", {})
    return df


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """Silence the progress bars lmms-eval draws for every task (its modules' own `tqdm` name)."""
    if not quiet:
        yield
        return
    import lmms_eval.api.task as lt
    import lmms_eval.evaluator as le
    saved = {m: m.tqdm for m in (lt, le)}

    def silent(bar):
        return lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})
    try:
        for m, bar in saved.items():
            m.tqdm = silent(bar)
        yield
    finally:
        for m, bar in saved.items():
            m.tqdm = bar


def _as_adapter(obj, processor=None, batch_size=None) -> CGMMini:
    if isinstance(obj, CGMMini):
        if batch_size is not None:
            obj.batch_size = int(batch_size)
        return obj
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if isinstance(obj, (str, os.PathLike)):
        return CGMMini(pretrained=obj, **kw)
    if isinstance(obj, tuple) and len(obj) == 2:
        return CGMMini(model=obj[0], processor=obj[1], **kw)
    if isinstance(obj, torch.nn.Module):
        return CGMMini(model=obj, processor=processor, **kw)
    raise TypeError(f"evaluate_lmms: expected a CGMMini, (model, processor), a model with processor=..., or a "
                    f"checkpoint path; got {type(obj).__name__}")


def paper_scores(df, target: str, general: Iterable[str] | None = None, scale: float = 100.0):
    """The paper's table from `evaluate_lmms` output: per-task scores, Pre-Avg (mean over the general tasks),
    Target, Hscore (Eq. 15) and Avg (Eq. 14), one row per metric (and per model when `df` has a "model"
    column, e.g. several evaluate_lmms results concatenated with df.assign(model=label)).

    `general` defaults to the general tasks present in `df` (all of world.tasks.GENERAL for a full run).
    """
    import pandas as pd
    if target not in set(df["task"]):
        raise KeyError(f"target {target!r} not in the evaluated tasks {sorted(set(df['task']))}")
    present = set(df["task"])
    general = [t for t in mt.GENERAL if t in present] if general is None else list(general)
    if not general:
        raise ValueError("no general task in the results: Pre-Avg is undefined")
    keys = (["model"] if "model" in df.columns else []) + ["metric"]
    results, index = {}, []
    for key, sub in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        label = " | ".join(str(k) for k in key)
        results[label] = dict(zip(sub["task"], sub["score"]))
        index.append(key)
    table = scores.paper_table(results, target, general, scale=scale)
    table.index = (pd.MultiIndex.from_tuples(index, names=keys) if len(keys) > 1
                   else pd.Index([k[0] for k in index], name="metric"))
    return table
