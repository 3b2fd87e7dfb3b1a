"""A miniature task (cgm_min.world.tasks) exported in the real data's local format, so the tiny chain reads
its data through the same reader as a GPU run reads OKVQA or Flickr30k."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

from .local import Example, write_target

DEFAULT_N = 64              # samples of a target task's split
CALIBRATION_N = 8           # samples of each general task (the paper: 8 per task)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def export_miniature(task: str, split: str, out_dir: str | os.PathLike, n: int | None = None,
                     world_seed: int = 0, overwrite: bool = False) -> Path:
    """Write `n` samples of `split` of the miniature `task` to `<out_dir>/<task>/<split>/` in the local
    format (PNG images, the task's question, its answer). `task="calibration"` writes `n` (default 8)
    samples of `split` of every general task, each line with its task name, as target `calibration`.
    The split name is kept (`train`, `calibration`, `heldout`, `validation`)."""
    return export_miniature_splits(task, {split: n}, out_dir, world_seed, overwrite)


def export_miniature_splits(task: str, splits: Mapping[str, int | None], out_dir: str | os.PathLike,
                            world_seed: int = 0, overwrite: bool = False) -> Path:
    """`export_miniature` of several splits of one task ({split: n}) into one target folder with one
    manifest (what `verify` checks)."""
    from cgm_min.world import tasks as mt
    if not splits:
        raise ValueError("no split to export")
    for split in splits:
        if split not in mt.SPLITS:
            raise ValueError(f"split must be one of {', '.join(mt.SPLITS)}, got {split!r}")
    if task == "calibration":
        names, default = mt.GENERAL, CALIBRATION_N
    else:
        mt.get_task(task)
        names, default = (task,), DEFAULT_N
    counts = {s: default if n is None else n for s, n in splits.items()}
    for count in counts.values():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"n must be an integer >= 1, got {count!r}")

    def pairs():
        for split, count in counts.items():
            for name in names:
                for s in mt.make_samples(name, split, count, world_seed=world_seed):
                    yield split, Example(f"{name}-{s.index}", s.question, [s.answer], _png(s.image),
                                         task=name if task == "calibration" else None)

    each = " per task" if task == "calibration" else ""
    source = (f"cgm_min.world.tasks: {', '.join(names)}, "
              + "; ".join(f"split {split}, {count} samples{each}" for split, count in counts.items())
              + f", world_seed {world_seed}")
    return write_target(out_dir, task, source, pairs(), overwrite)
