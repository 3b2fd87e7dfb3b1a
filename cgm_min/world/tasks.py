"""The miniature world's tasks: small rendered images with short questions, standing in for the paper's
benchmarks.

Every sample is a pure function of (task name, split, index, world seed): its random numbers come from
`numpy.random.default_rng` seeded with a CRC-32 of the task name and the three integers (never Python's
salted `hash()`), so a sample is the same on every machine and in every process.

Images are 32 x 32 RGB. Objects are large (radius 5-7 px) and sit in one of the four 16 x 16 quadrants,
so they line up with the vision towers' patch grids (LLaVA patch 8, Qwen patch 4 merged 2 x 2).

Two kinds of tasks:
  general  the skills the pre-trained model should keep (the paper's "pre-training" suite: VQAv2, GQA,
           POPE, MMBench, ...); their mean is Pre-Avg.
  target   the downstream skill that fine-tuning teaches (the paper's OKVQA, Flickr30k, LaTeX-OCR).

Splits. `train`, `calibration`, `validation` and `heldout` are disjoint in content: every sample has a
content key (its latent factors: colours, shapes, quadrants, sizes, jitters, operands, or the data-set row
for the handwritten digits), the key's CRC-32 picks a bucket in 0..99 (0-79 train, 80-84 calibration,
85-89 validation, 90-99 held-out), and a sample is redrawn (next attempt) until its key falls in its split's buckets. Hence no
(image, question) pair of the held-out split ever occurs in training. Two consequences: the handwritten
digits are split by row of scikit-learn's data set (1797 rows), and addition, a text-only skill whose image
is a blank of one random shade, is split by (operand pair, shade). Addition is a skill to keep, like the
paper's general suite, not a test of generalisation: all 100 operand pairs occur in training, and a held-out
sample is a known pair asked over a blank shade never paired with it in training. (Splitting by operand pair
alone would leave about 9 unseen pairs in the held-out split: a score in steps of 1/9 that measures
extrapolation.)

What each split is for: `train` trains; `calibration` measures curvature and activation statistics
(h_pt: 8 samples per general task); `validation` chooses the hyperparameters of a merge; `heldout` reports.
(`validation` was carved out of the former calibration buckets 85-89, so the train and held-out samples,
and with them the shipped checkpoints, are unchanged.)

Scores (exact and relaxed match, Pre-Avg, Hscore, Avg) live in `cgm_min.evaluate.scores`; this module
only sorts wrong answers by kind (`answer_kind`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..evaluate import scores

IMAGE_SIZE = 32
SPLITS = ("train", "calibration", "heldout", "validation")      # (order fixes each split's seed id)
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}
_BUCKETS = {"train": (0, 80), "calibration": (80, 85), "validation": (85, 90), "heldout": (90, 100)}

COLOURS = {            # name -> RGB centre; each sample jitters every channel by up to +-15
    "red": (215, 35, 35),
    "green": (40, 185, 55),
    "blue": (45, 85, 235),
    "yellow": (235, 220, 45),
    "purple": (145, 55, 205),
    "orange": (250, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4}        # knowledge, not in the pixels
COLOUR_CODE = {c: i + 1 for i, c in enumerate(COLOURS)}                 # red 1 ... orange 6


@dataclass(frozen=True)
class Sample:
    """One question about one image. `answer` is the reference text (no end token)."""
    task: str
    split: str
    index: int
    image: Image.Image = field(repr=False, compare=False)
    question: str
    answer: str
    meta: Mapping = field(default_factory=dict, repr=False, compare=False)

    def content_bytes(self) -> bytes:
        """The (image, question) pair as bytes: what 'disjoint splits' is checked on."""
        return self.image.tobytes() + b"\x00" + self.question.encode()


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                      # "general" or "target"
    stands_for: str                # the paper benchmark(s) it stands in for
    skill: str                     # one line for the book's mapping table
    template: str                  # the question template, distinct per task
    draw: Callable = field(repr=False)   # (rng) -> (latent dict, content key str)
    render: Callable = field(repr=False)  # (latent) -> (image, question, answer)
    answers: tuple = ()            # the closed answer set (empty for free text)
    finite_rows: int | None = None   # tasks backed by a fixed data set (digits): number of rows

    @property
    def as_dict(self) -> dict:
        return {"task": self.name, "kind": self.kind, "stands_for": self.stands_for, "skill": self.skill,
                "prompt": self.template, "answers": " / ".join(self.answers) if self.answers else "free text"}


# ----------------------------------------------------------------------------------------------
# Deterministic randomness.

def stable_hash(*parts) -> int:
    """CRC-32 of the parts joined by '|': the same on every machine and process (unlike hash())."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def sample_rng(task: str, split: str, index: int, attempt: int = 0, world_seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([stable_hash(task), _SPLIT_ID[split], int(index), int(attempt), int(world_seed)])


def split_of_key(task: str, key: str) -> str:
    b = stable_hash(task, key) % 100
    for s, (lo, hi) in _BUCKETS.items():
        if lo <= b < hi:
            return s
    raise AssertionError(b)


# ----------------------------------------------------------------------------------------------
# Rendering.

def _background(rng) -> tuple:
    g = int(rng.integers(0, 40))
    return (g, g, g)


def _object(rng, quadrant=None, shape=None, colour=None) -> dict:
    """Latent factors of one object: shape, colour (name and jittered RGB), quadrant, radius, offset."""
    return {"shape": shape if shape is not None else SHAPES[rng.integers(len(SHAPES))],
            "colour": colour if colour is not None else list(COLOURS)[rng.integers(len(COLOURS))],
            "quadrant": int(quadrant if quadrant is not None else rng.integers(4)),
            "radius": int(rng.integers(5, 8)), "dx": int(rng.integers(-1, 2)), "dy": int(rng.integers(-1, 2)),
            "jitter": [int(v) for v in rng.integers(-15, 16, size=3)]}


def _rgb(obj) -> tuple:
    return tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj["colour"]], obj["jitter"]))


def draw_object(draw: ImageDraw.ImageDraw, obj: Mapping) -> None:
    q, r = obj["quadrant"], obj["radius"]
    cx, cy = 8 + 16 * (q % 2) + obj["dx"], 8 + 16 * (q // 2) + obj["dy"]
    fill = _rgb(obj)
    if obj["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj["shape"] == "square":
        s = round(r * 0.85)
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj["shape"] == "diamond":
        draw.polygon([(cx, cy - r - 1), (cx + r + 1, cy), (cx, cy + r + 1), (cx - r - 1, cy)], fill=fill)
    else:
        raise ValueError(obj["shape"])


def render_scene(objects: Sequence[Mapping], background: tuple) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    d = ImageDraw.Draw(img)
    for o in objects:
        draw_object(d, o)
    return img


def _scene_key(objects, background) -> str:
    return repr([sorted(o.items()) for o in objects]) + repr(background)


def _one_object(rng):
    lat = {"objects": [_object(rng)], "background": _background(rng)}
    return lat, _scene_key(lat["objects"], lat["background"])


def _scene(lat):
    return render_scene(lat["objects"], lat["background"])


# ----------------------------------------------------------------------------------------------
# The tasks. Each `draw` returns (latent, content key); each `render` returns (image, question, answer).

def _r_colour(lat):
    return _scene(lat), "What colour is the object?", lat["objects"][0]["colour"]


def _r_shape(lat):
    return _scene(lat), "What shape is the object?", lat["objects"][0]["shape"]


def _r_position(lat):
    q = lat["objects"][0]["quadrant"]
    return _scene(lat), "Is the object on the left or the right?", "left" if q % 2 == 0 else "right"


PRESENCE_QUERY = "red"     # one fixed class: every presence question asks about it


def _d_presence(rng):
    present = bool(rng.integers(2))
    n = int(rng.integers(1, 4))
    others = [c for c in COLOURS if c != PRESENCE_QUERY]
    cols = [others[i] for i in rng.permutation(len(others))[:n]]
    if present:
        cols[int(rng.integers(n))] = PRESENCE_QUERY
    objs = [_object(rng, quadrant=q, colour=c) for q, c in zip(rng.permutation(4)[:n], cols)]
    lat = {"objects": objs, "background": _background(rng)}
    return lat, _scene_key(objs, lat["background"])


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _r_presence(lat):
    present = any(o["colour"] == PRESENCE_QUERY for o in lat["objects"])
    return (_scene(lat), f"Is there {_a(PRESENCE_QUERY)} object in the image? Answer yes or no.",
            "yes" if present else "no")


def _d_count(rng):
    n = int(rng.integers(1, 5))
    objs = [_object(rng, quadrant=q) for q in rng.permutation(4)[:n]]
    lat = {"objects": objs, "background": _background(rng)}
    return lat, _scene_key(objs, lat["background"])


def _r_count(lat):
    return _scene(lat), "How many objects are there?", str(len(lat["objects"]))


def _d_addition(rng):
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    lat = {"a": a, "b": b, "background": _background(rng)}
    return lat, f"{a}+{b}|{lat['background'][0]}"


def _r_addition(lat):
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), lat["background"])   # text-only skill: a blank image
    return img, f"What is {lat['a']} plus {lat['b']}?", str(lat["a"] + lat["b"])


CHOICE_OPTIONS = {"shape": SHAPES, "count": ("1", "2", "3", "4")}
LETTERS = ("A", "B", "C", "D")


def _d_choice(rng):
    kind = ("shape", "count")[int(rng.integers(2))]
    if kind == "shape":
        lat, key = _one_object(rng)
    else:
        lat, key = _d_count(rng)
    lat["kind"] = kind
    return lat, key + kind


def _r_choice(lat):
    opts = " ".join(f"({L}) {o}" for L, o in zip(LETTERS, CHOICE_OPTIONS[lat["kind"]]))
    if lat["kind"] == "shape":
        q, true = "Which shape is shown?", lat["objects"][0]["shape"]
    else:
        q, true = "How many objects are shown?", str(len(lat["objects"]))
    return _scene(lat), f"{q} {opts}. Answer with a letter.", LETTERS[CHOICE_OPTIONS[lat["kind"]].index(true)]


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits   # ships with scikit-learn: 1797 8x8 handwritten digits
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(int)


def _d_digit(rng):
    images, _ = _digits()
    row = int(rng.integers(len(images)))
    lat = {"row": row, "colour": list(COLOURS)[rng.integers(len(COLOURS))], "jitter": [0, 0, 0],
           "background": _background(rng)}
    return lat, f"row{row}"          # the data-set row alone decides the split: a digit image is never shared


def _r_digit(lat):
    images, target = _digits()
    ink = np.array(_rgb({"colour": lat["colour"], "jitter": lat["jitter"]}), np.float32)
    a = np.kron(images[lat["row"]] / 16.0, np.ones((4, 4), np.float32))[..., None]   # 8x8 -> 32x32
    bg = np.array(lat["background"], np.float32)
    img = Image.fromarray((a * ink + (1 - a) * bg).round().astype(np.uint8), "RGB")
    return img, "Which digit is written here?", str(int(target[lat["row"]]))


def _r_corners(lat):
    return _scene(lat), "How many corners does this shape have?", str(CORNERS[lat["objects"][0]["shape"]])


def _r_code(lat):
    return _scene(lat), "What is the code of this colour?", str(COLOUR_CODE[lat["objects"][0]["colour"]])


def _r_caption(lat):
    o = lat["objects"][0]
    side = "left" if o["quadrant"] % 2 == 0 else "right"
    return _scene(lat), "Describe the image in one sentence.", f"{_a(o['colour'])} {o['shape']} on the {side}."


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("colour", "general", "VQAv2 (attribute questions)", "name the colour of the one object",
         "What colour is the object?", _one_object, _r_colour, tuple(COLOURS)),
    Task("shape", "general", "GQA (object recognition)", "name the shape of the one object",
         "What shape is the object?", _one_object, _r_shape, SHAPES),
    Task("position", "general", "GQA (spatial relations)", "say whether the object is left or right",
         "Is the object on the left or the right?", _one_object, _r_position, ("left", "right")),
    Task("presence", "general", "POPE (object existence, yes/no)", "is a red object among the 1-3 objects",
         "Is there a red object in the image? Answer yes or no.", _d_presence, _r_presence, ("yes", "no")),
    Task("count", "general", "VQAv2 (counting)", "count 1-4 objects",
         "How many objects are there?", _d_count, _r_count, ("1", "2", "3", "4")),
    Task("addition", "general", "text-only language skill (ScienceQA-style reasoning, no visual input)",
         "add two one-digit numbers (all 100 pairs are seen in training); the image is blank",
         "What is {a} plus {b}?", _d_addition, _r_addition, tuple(str(i) for i in range(19))),
    Task("choice", "general", "MMBench (lettered multiple choice)",
         "the letter of the right option (shape, or number of objects; options in a fixed order)",
         "Which shape is shown? / How many objects are shown? (A) ... (D) .... Answer with a letter.", _d_choice, _r_choice,
         LETTERS),
    Task("digit", "general", "TextVQA / VizWiz (reading)", "read a real handwritten digit (scikit-learn digits)",
         "Which digit is written here?", _d_digit, _r_digit, tuple(str(i) for i in range(10)), finite_rows=1797),
    Task("corners", "target", "OKVQA (knowledge not visible in the image)",
         "how many corners the shape has (circle 0, triangle 3, square and diamond 4)",
         "How many corners does this shape have?", _one_object, _r_corners, ("0", "3", "4")),
    Task("colour_code", "target", "LaTeX-OCR (a new mapping from what is seen to a code)",
         "a code per colour (red 1, green 2, blue 3, yellow 4, purple 5, orange 6)",
         "What is the code of this colour?", _one_object, _r_code, tuple(str(i) for i in range(1, 7))),
    Task("caption", "target", "Flickr30k (captioning: a new, long answer format)",
         "describe colour, shape and side in a fixed sentence",
         "Describe the image in one sentence.", _one_object, _r_caption),
]}

GENERAL = tuple(n for n, t in TASKS.items() if t.kind == "general")
TARGETS = tuple(n for n, t in TASKS.items() if t.kind == "target")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {list(TASKS)}")
    return TASKS[name]


def make_sample(task: str, split: str, index: int, world_seed: int = 0) -> Sample:
    """Sample `index` of `split` of `task`: drawn from its own seed until its content key lies in `split`."""
    t = get_task(task)
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for attempt in range(10_000):
        lat, key = t.draw(sample_rng(task, split, index, attempt, world_seed))
        if split_of_key(task, key) == split:
            img, q, a = t.render(lat)
            return Sample(task, split, int(index), img, q, a, {"key": key, **lat})
    raise RuntimeError(f"{task}: no {split} sample after 10000 attempts")


def make_samples(task: str, split: str, n: int, start: int = 0, world_seed: int = 0) -> list[Sample]:
    return [make_sample(task, split, i, world_seed) for i in range(start, start + n)]


def eval_set(tasks: Iterable[str] = GENERAL, split: str = "heldout", n: int = 200, world_seed: int = 0
             ) -> dict[str, list[Sample]]:
    """The fixed evaluation samples: indices 0..n-1 of `split` for each task."""
    return {t: make_samples(t, split, n, world_seed=world_seed) for t in tasks}


def tokenizer_corpus(world_seed: int = 0, per_task: int = 300) -> list[str]:
    """Texts for training the byte-level BPE: every task's questions and answers (also the targets'
    and also the multiple-choice letters and all numbers), from the train split only."""
    texts = []
    for name in TASKS:
        for s in make_samples(name, "train", per_task, world_seed=world_seed):
            texts += [s.question, s.answer, " " + s.answer]
    texts += [str(i) for i in range(100)] + [" " + str(i) for i in range(100)]
    return texts


# ----------------------------------------------------------------------------------------------
# Sorting wrong answers.

ANSWER_KINDS = ("correct", "format", "own task", "target", "other")


def answer_kind(task: str, generated: str, answer: str, target: str | None = None) -> str:
    """What a generated answer is, for telling lost skills from a format or target takeover:

    correct   exact match
    format    relaxed match only: the right answer, then more text (the end token was not emitted)
    own task  a wrong answer of the question's own task (a wrong colour, count, digit): a lost skill
    target    one of the `target` task's answers that the question's task never gives: the target took over
    other     anything else (an answer of another task, an unknown word)
    """
    if scores.exact_match(generated, answer):
        return "correct"
    if scores.relaxed_match(generated, answer):
        return "format"
    out, own = generated.strip(), get_task(task).answers
    if target is not None and out in get_task(target).answers and out not in own:
        return "target"
    return "own task" if out in own else "other"


def task_table(tasks: Iterable[str] = TASKS):
    """The mapping "miniature task -> paper benchmark" as a DataFrame (for the book)."""
    import pandas as pd
    return pd.DataFrame([get_task(t).as_dict for t in tasks]).set_index("task")
