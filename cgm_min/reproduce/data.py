"""The chain's reader of the local data format (written by `data_scripts.real`, documented in
data_scripts/README.md):

    DATA_DIR/TARGET/SPLIT/data.jsonl     {"id", "image": "images/<file>" or null, "question", "answers": [...]}
    DATA_DIR/TARGET/SPLIT/images/...     (the calibration set: target "calibration", with a "task" field)
    DATA_DIR/TARGET/manifest.json        {"target", "source", "splits", "sha256"}, verified by data_scripts.real

A `Record` has what `world.models.Encoder` needs (image, question, answer: the first reference), so the
miniature and the real data go through the same batching, training, curvature and scoring code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

BLANK = (32, 32)          # the image of a text-only question (the miniatures' blank image size)


@dataclass(frozen=True)
class Record:
    id: str
    question: str
    answers: tuple[str, ...]
    image_path: Path | None = None
    task: str | None = None
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def answer(self) -> str:
        """The training target: the first reference answer."""
        return self.answers[0]

    @property
    def image(self) -> Image.Image:
        if self.image_path is None:
            return Image.new("RGB", BLANK, (255, 255, 255))
        with Image.open(self.image_path) as im:
            return im.convert("RGB")


def split_file(data_dir: str | Path, target: str, split: str) -> Path:
    return Path(data_dir) / target / split / "data.jsonl"


def read_split(data_dir: str | Path, target: str, split: str, limit: int | None = None) -> list[Record]:
    """The records of DATA_DIR/TARGET/SPLIT (the first `limit`); one-line errors for a missing file or a bad line."""
    path = split_file(data_dir, target, split)
    if not path.is_file():
        raise FileNotFoundError(f"no {target} {split} split: {path} is missing (prepare it with data_scripts)")
    from data_scripts.real.local import iter_numbered
    out = []
    for i, d in iter_numbered(path.parent):
        if limit is not None and len(out) >= limit:
            break
        try:
            answers = tuple(str(a) for a in d["answers"])
            if not answers or not isinstance(d["question"], str):
                raise ValueError
            image = d.get("image")
            img = None if image is None else path.parent / image
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}, line {i}: not a record with id, question, answers "
                             f"(a non-empty list) and image") from None
        if img is not None and not img.is_file():
            raise FileNotFoundError(f"{path}, line {i}: the image {image} is missing")
        out.append(Record(str(d.get("id", i)), d["question"], answers, img, d.get("task")))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def verify(data_dir: str | Path, target: str) -> dict:
    """The target's manifest after `data_scripts.real.verify` checked every file's SHA-256."""
    from data_scripts.real import verify as verify_files
    return verify_files(data_dir, target)
