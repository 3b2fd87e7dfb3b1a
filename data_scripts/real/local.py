"""The local data format every real-data target is prepared into, and its checksums.

    <data_dir>/<target>/manifest.json              written last: {"target", "source", "splits": {split: count},
                                                   "sha256": {relative path: hex}, "format": 1}
    <data_dir>/<target>/<split>/data.jsonl         one JSON object per line:
        {"id": str, "image": "images/<file>" or null, "question": str, "answers": [str, ...]}
        (+ "task": the lmms-eval task name, for the target `calibration`)
    <data_dir>/<target>/<split>/images/<file>      the image bytes exactly as the source stores them

The first answer is the training target; all answers are references for scoring. `question` is the
prompt text the model is given (for the evaluated targets, the lmms-eval task's prompt). A target is
written into a hidden sibling folder and renamed into place when complete, so a folder with a manifest is
always whole; `verify` re-hashes every file and fails with a one-line error on a changed, missing or
unlisted file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from cgm_min.report import file_sha256, replace_dir

FORMAT = 1
TARGETS = ("okvqa", "flickr30k", "latex_ocr", "calibration")
MANIFEST = "manifest.json"
DATA = "data.jsonl"
IMAGE_EXT = {b"\xff\xd8\xff": ".jpg", b"\x89PNG\r\n\x1a\n": ".png", b"GIF87a": ".gif", b"GIF89a": ".gif",
             b"BM": ".bmp", b"RIFF": ".webp"}


def image_ext(data: bytes) -> str:
    """The file extension of encoded image bytes (by their magic number)."""
    for magic, ext in IMAGE_EXT.items():
        if data.startswith(magic):
            return ext
    raise ValueError(f"image bytes of an unknown format (starting {data[:8]!r})")


class Example(dict):
    """One line of data.jsonl, with the encoded image (or None) kept aside."""

    def __init__(self, id: str, question: str, answers: Iterable[str], image: bytes | None = None,
                 task: str | None = None):
        answers = [str(a) for a in answers]
        if not answers:
            raise ValueError(f"example {id}: no answer")
        super().__init__(id=str(id), image=None, question=str(question), answers=answers)
        if task is not None:
            self["task"] = task
        self.image_bytes = image


def _safe_name(id: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in id)
    return keep.strip(".") or "x"


def write_target(data_dir: str | os.PathLike, target: str, source: str,
                 examples: Iterable[tuple[str, Example]], overwrite: bool = False) -> Path:
    """Write `target` under `data_dir` from (split, example) pairs (streamed: one image in memory at a time);
    returns the target folder. Refuses an existing target folder unless `overwrite`; writes into a hidden
    sibling folder and renames it into place, so an error leaves nothing behind."""
    if not target or not all(c.isalnum() or c in "-_" for c in target):
        raise ValueError(f"invalid target name {target!r}")
    data_dir = Path(data_dir)
    final = data_dir / target
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass --overwrite to replace it")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.", dir=data_dir))
    files: dict[str, object] = {}
    try:
        counts: dict[str, int] = {}
        seen: dict[str, set[str]] = {}
        for split, ex in examples:
            if split not in files:
                if not split or not all(c.isalnum() or c in "-_" for c in split):
                    raise ValueError(f"{target}: invalid split name {split!r}")
                (tmp / split / "images").mkdir(parents=True)
                files[split] = open(tmp / split / DATA, "w", encoding="utf-8")
                counts[split], seen[split] = 0, set()
            if ex["id"] in seen[split]:
                raise ValueError(f"{target}/{split}: id {ex['id']!r} occurs twice")
            seen[split].add(ex["id"])
            if ex.image_bytes is not None:
                stem, ext = _safe_name(ex["id"]), image_ext(ex.image_bytes)
                rel = f"images/{stem}" if stem.lower().endswith(ext) else f"images/{stem}{ext}"
                (tmp / split / rel).write_bytes(ex.image_bytes)
                ex["image"] = rel
            files[split].write(json.dumps(dict(ex), ensure_ascii=False) + "\n")
            counts[split] += 1
        for f in files.values():
            f.close()
        if not counts:
            raise ValueError(f"{target}: the source holds no example")
        sha = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "target": target, "source": source, "splits": counts, "sha256": sha}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return replace_dir(tmp, final)
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(data_dir: str | os.PathLike, target: str) -> dict:
    folder = Path(data_dir) / target
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder}: no {MANIFEST} (not prepared, or preparation did not finish)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None
    if not isinstance(m, dict) or not {"target", "splits", "sha256"} <= set(m) or m["target"] != target:
        raise ValueError(f"{path} is not a manifest of target {target!r}")
    return m


def verify(data_dir: str | os.PathLike, target: str) -> dict:
    """Check every file of `target` against its manifest; returns the manifest. One-line ValueError on a
    missing, changed or unlisted file or a wrong example count."""
    folder = Path(data_dir) / target
    m = read_manifest(data_dir, target)
    for rel, digest in m["sha256"].items():
        p = folder / rel
        if not p.is_file():
            raise ValueError(f"{target}: {rel} is listed in {MANIFEST} but missing")
        if file_sha256(p) != digest:
            raise ValueError(f"{target}: {rel} does not match its checksum in {MANIFEST} (changed since prepared)")
    listed = set(m["sha256"]) | {MANIFEST}
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.relative_to(folder).as_posix() not in listed)
    if extra:
        raise ValueError(f"{target}: {extra[0]} is not listed in {MANIFEST} ({len(extra)} unlisted file(s))")
    for split, count in m["splits"].items():
        with open(folder / split / DATA, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
        if n != count:
            raise ValueError(f"{target}/{split}: {n} examples but the manifest says {count}")
    return m


def read_split(data_dir: str | os.PathLike, target: str, split: str, check: bool = True) -> list[dict]:
    """The examples of one split ({"id", "image", "question", "answers"[, "task"]}; `image` relative to the
    split folder). `check` verifies the whole target first."""
    m = verify(data_dir, target) if check else read_manifest(data_dir, target)
    if split not in m["splits"]:
        raise ValueError(f"{target} has no split {split!r}; splits: {', '.join(m['splits'])}")
    return list(iter_split(Path(data_dir) / target / split))


def iter_split(folder: Path) -> Iterator[dict]:
    """The objects of `folder`/data.jsonl, one per non-empty line, read lazily."""
    for _, d in iter_numbered(folder):
        yield d


def iter_numbered(folder: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-empty line of `folder`/data.jsonl (the one parser of the
    format); one-line ValueError naming the line that is not JSON."""
    with open(folder / DATA, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{folder / DATA}: line {i} is not valid JSON") from None
