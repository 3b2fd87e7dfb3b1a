"""Readers of the paper's data sets as their publishers distribute them, into the local format (local.py).

Every reader takes a folder the user has downloaded (nothing is fetched here) and yields local.Example
objects per split. Formats (field names as the publishers use them; see data_scripts/README.md):

okvqa      official  OpenEnded_mscoco_{train,val}2014_questions.json {"questions": [{"image_id", "question",
                     "question_id"}]} + mscoco_{train,val}2014_annotations.json {"annotations": [{"question_id",
                     "answers": [{"answer", "raw_answer", "answer_confidence", "answer_id"}], ...}]} + COCO
                     images {train2014,val2014}/COCO_<sub>_<image_id:012d>.jpg            -> splits train, val
           parquet   lmms-lab/OK-VQA (lmms-eval ok_vqa_val2014): question_id, image {bytes, path}, question,
                     answers [str], question_type, answer_type                          -> split val
flickr30k  karpathy  dataset_flickr30k.json {"images": [{"filename", "imgid", "split", "sentids",
                     "sentences": [{"raw", "tokens", "imgid", "sentid"}]}]} + flickr30k-images/<filename>
                                                                                        -> train, val, test
           parquet   lmms-lab/flickr30k (lmms-eval flickr30k_test): image, caption [str], sentids [str],
                     img_id, filename (+ split, in copies that keep Karpathy's split); without a split column the
                     Karpathy JSON, when present in the folder, assigns splits; otherwise all is `test`
latex_ocr  parquet   unsloth/LaTeX_OCR: image, text; files data/{train,test}-*.parquet  -> train, test
calibration parquet  one folder per lmms-eval task (<source>/<task>/**.parquet, the task's dataset as
                     lmms-eval loads it); n samples per task (seeded)                    -> split calibration
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .local import Example

# Prompts: those of the lmms-eval tasks the targets are evaluated with (their `default` lmms_eval_specific_kwargs;
# a test compares them with the installed lmms-eval's task files).
VQA_SHORT = "\nAnswer the question using a single word or phrase."
VQA_UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + VQA_SHORT
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "\n请直接使用所提供的选项字母作为答案回答。"
MMBENCH_SYS = "There are several options:"
FLICKR_PROMPT = "Provide a one-sentence caption for the provided image."            # flickr30k_test
# LaTeX-OCR has no lmms-eval task; the instruction of Unsloth's vision fine-tuning notebook on this data set.
LATEX_PROMPT = "Write the LaTeX representation for this image."

# <split>-00000-of-00001.parquet; older `datasets` uploads add a content hash: <split>-00000-of-00001-<hex>.parquet
PARQUET_SPLIT = re.compile(r"^([A-Za-z0-9_]+?)[-_]\d{5}[-_]of[-_]\d{5}(?:-[0-9a-f]{8,})?\.parquet$"
                           r"|^([A-Za-z0-9_]+)\.parquet$")


def _fail(msg: str):
    raise ValueError(msg)


def by_frequency(answers: Sequence[str]) -> list[str]:
    """All answers, the most frequent first (ties: first given), the rest in their order: the first is the
    majority answer (VQA's training target) and the multiset is kept (VQA accuracy counts repeats)."""
    answers = [str(a) for a in answers]
    if not answers:
        return []
    top = Counter(answers).most_common()[0][1]
    first = next(a for a in answers if answers.count(a) == top)
    rest = list(answers)
    rest.remove(first)
    return [first] + rest


# ----------------------------------------------------------------------------------------------
# Parquet (Hugging Face `datasets` layout: image columns are structs {bytes, path}).

def parquet_files(folder: Path, what: str) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*.parquet") if p.is_file())
    if not files:
        _fail(f"{what}: no .parquet files under {folder}")
    return files


def parquet_split(path: Path) -> str:
    """The split a Hugging Face parquet file holds, from its name (`test-00000-of-00009.parquet` -> test)."""
    m = PARQUET_SPLIT.match(path.name)
    if not m:
        _fail(f"{path.name}: cannot tell its split from the file name (expected <split>-00000-of-00001.parquet)")
    return m.group(1) or m.group(2)


def parquet_rows(path: Path, columns: Sequence[str], what: str, batch: int = 256) -> Iterator[dict]:
    import pyarrow.parquet as pq
    try:
        f = pq.ParquetFile(path)
    except Exception as err:                      # pyarrow raises several types for a damaged file
        _fail(f"{what}: {path.name} is not a readable parquet file ({type(err).__name__})")
    missing = [c for c in columns if c not in f.schema_arrow.names]
    if missing:
        _fail(f"{what}: {path.name} has no column {missing[0]!r} (columns: {', '.join(f.schema_arrow.names)})")
    for b in f.iter_batches(batch_size=batch, columns=list(columns)):
        yield from b.to_pylist()


def image_bytes(value, what: str) -> bytes:
    """The encoded bytes of a `datasets` Image cell ({bytes, path})."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
        return bytes(value["bytes"])
    _fail(f"{what}: an image cell without bytes (got {type(value).__name__}); the parquet must embed the images")


def _schema(path: Path) -> list[str]:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).schema_arrow.names


def _json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        _fail(f"{what}: {path.name} is not valid JSON")


def _find(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.rglob(pattern) if p.is_file())


# ----------------------------------------------------------------------------------------------
# OK-VQA

OKVQA_SPLITS = {"train2014": "train", "val2014": "val"}
Pairs = Iterator[tuple[str, Example]]


def okvqa(source: Path) -> tuple[str, Pairs]:
    if _find(source, "OpenEnded_mscoco_*2014_questions.json"):
        return "OK-VQA questions/annotations JSON + COCO 2014 images", okvqa_official(source)
    return "lmms-lab/OK-VQA parquet (lmms-eval ok_vqa_val2014)", okvqa_parquet(parquet_files(source, "okvqa"))


def okvqa_official(source: Path) -> Pairs:
    for sub, split in OKVQA_SPLITS.items():
        qs = _find(source, f"OpenEnded_mscoco_{sub}_questions.json")
        if not qs:
            continue
        an = _find(source, f"mscoco_{sub}_annotations.json")
        if not an:
            _fail(f"okvqa: {qs[0].name} has no mscoco_{sub}_annotations.json beside it")
        questions = _json(qs[0], "okvqa").get("questions")
        annotations = _json(an[0], "okvqa").get("annotations")
        if not isinstance(questions, list) or not isinstance(annotations, list):
            _fail(f"okvqa: {qs[0].name} needs a 'questions' list and {an[0].name} an 'annotations' list")
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
        images = [d for d in (source / sub, source / "images" / sub, source / "coco" / sub) if d.is_dir()]
        if not images:
            _fail(f"okvqa: no COCO image folder {sub}/ under {source} (unpack {sub}.zip there)")
        for q in questions:
            qid = q["question_id"]
            if qid not in answers:
                _fail(f"okvqa: question {qid} has no annotation in {an[0].name}")
            img = images[0] / f"COCO_{sub}_{int(q['image_id']):012d}.jpg"
            if not img.is_file():
                _fail(f"okvqa: image {img.name} of question {qid} is missing from {images[0]}")
            yield split, Example(str(qid), q["question"] + VQA_UNANSWERABLE, by_frequency(answers[qid]),
                                 img.read_bytes())


def okvqa_parquet(files: Sequence[Path]) -> Pairs:
    for path in files:
        split = OKVQA_SPLITS.get(parquet_split(path), parquet_split(path))
        for r in parquet_rows(path, ("question_id", "image", "question", "answers"), "okvqa"):
            yield split, Example(str(r["question_id"]), r["question"] + VQA_UNANSWERABLE,
                                 by_frequency(r["answers"]), image_bytes(r["image"], "okvqa"))


# ----------------------------------------------------------------------------------------------
# Flickr30k

KARPATHY = "dataset_flickr30k.json"


def _karpathy(path: Path) -> list[dict]:
    images = _json(path, "flickr30k").get("images")
    if not isinstance(images, list):
        _fail(f"flickr30k: {path.name} has no 'images' list (Karpathy split format)")
    return images


def flickr30k(source: Path) -> tuple[str, Pairs]:
    karpathy = _find(source, KARPATHY)
    if not list(source.rglob("*.parquet")):
        if not karpathy:
            _fail(f"flickr30k: neither parquet files nor {KARPATHY} under {source}")
        folders = [p for p in source.rglob("*") if p.is_dir() and p.name in ("flickr30k-images", "flickr30k_images")]
        if not folders:
            _fail(f"flickr30k: no flickr30k-images/ folder under {source}")
        return "Karpathy split JSON + Flickr30k images", flickr30k_karpathy(_karpathy(karpathy[0]), folders[0])
    how = "lmms-lab/flickr30k parquet (lmms-eval flickr30k_test)"
    split_of = {im["filename"]: im["split"] for im in _karpathy(karpathy[0])} if karpathy else {}
    return (how + (", split by Karpathy's JSON" if karpathy else ""),
            flickr30k_parquet(parquet_files(source, "flickr30k"), split_of))


def flickr30k_karpathy(images: list[dict], folder: Path) -> Pairs:
    for im in images:
        img = folder / im["filename"]
        if not img.is_file():
            _fail(f"flickr30k: image {im['filename']} is missing from {folder}")
        caps = [s["raw"] for s in im["sentences"]]
        yield im["split"], Example(Path(im["filename"]).stem, FLICKR_PROMPT, caps, img.read_bytes())


def flickr30k_parquet(files: Sequence[Path], split_of: Mapping[str, str]) -> Pairs:
    for path in files:
        cols = ["image", "caption", "filename"] + (["split"] if "split" in _schema(path) else [])
        for r in parquet_rows(path, cols, "flickr30k"):
            if "split" in r:
                split = r["split"]
            elif split_of:
                if r["filename"] not in split_of:
                    _fail(f"flickr30k: {r['filename']} is not in {KARPATHY}")
                split = split_of[r["filename"]]
            else:
                split = parquet_split(path)
            yield split, Example(Path(r["filename"]).stem, FLICKR_PROMPT, r["caption"],
                                 image_bytes(r["image"], "flickr30k"))


# ----------------------------------------------------------------------------------------------
# LaTeX-OCR

def latex_ocr(source: Path) -> tuple[str, Pairs]:
    return "unsloth/LaTeX_OCR parquet", _latex_rows(parquet_files(source, "latex_ocr"))


def _latex_rows(files: Sequence[Path]) -> Pairs:
    count: Counter = Counter()
    for path in files:
        split = parquet_split(path)
        for r in parquet_rows(path, ("image", "text"), "latex_ocr"):
            yield split, Example(f"{split}-{count[split]:06d}", LATEX_PROMPT, [r["text"]],
                                 image_bytes(r["image"], "latex_ocr"))
            count[split] += 1


# ----------------------------------------------------------------------------------------------
# Calibration: n samples of each general task, from the lmms-eval task datasets.

def _options(r: Mapping, letters: str = "ABCDE") -> str:
    opts = [f"{c}. {r[c]}" for c in letters if r.get(c) not in (None, "", "nan")]
    return MMBENCH_SYS + "\n" + "\n".join(opts)


def _mmbench(post: str) -> Callable[[Mapping], tuple[str, list[str]]]:
    def conv(r):
        hint = r.get("hint")
        head = f"{hint} {r['question']}" if hint not in (None, "", "nan") else r["question"]
        return f"{head} {_options(r)}\n{post}", [r["answer"]]
    return conv


def _sqa(r: Mapping) -> tuple[str, list[str]]:
    letters = [chr(ord("A") + i) for i in range(len(r["choices"]))]
    choices = "\n".join(f"{c}. {t}" for c, t in zip(letters, r["choices"]))
    ctx = f"Context: {r['hint']}\n" if r.get("hint") else ""
    return f"{ctx}{r['question']}\n{choices}{OPTION_LETTER}", [letters[int(r["answer"])]]


# lmms-eval task -> (dataset as lmms-eval loads it, its split, columns read, doc -> (prompt, answers))
CALIBRATION_TASKS: dict[str, tuple[str, str, tuple[str, ...], Callable]] = {
    "vqav2_val": ("lmms-lab/VQAv2", "validation", ("question_id", "question", "answers"),
                  lambda r: (r["question"] + VQA_SHORT, by_frequency([a["answer"] for a in r["answers"]]))),
    "gqa": ("lmms-lab/GQA testdev_balanced_instructions + testdev_balanced_images", "testdev",
            ("id", "imageId", "question", "answer"), lambda r: (r["question"] + VQA_SHORT, [r["answer"]])),
    "vizwiz_vqa_val": ("lmms-lab/VizWiz-VQA", "val", ("question_id", "question", "answers"),
                       lambda r: (r["question"] + VQA_UNANSWERABLE, by_frequency(r["answers"]))),
    "scienceqa_img": ("lmms-lab/ScienceQA ScienceQA-IMG", "test", ("question", "choices", "answer", "hint"), _sqa),
    "textvqa_val": ("lmms-lab/textvqa", "validation", ("question_id", "question", "answers"),
                    lambda r: (r["question"].capitalize() + VQA_SHORT, by_frequency(r["answers"]))),
    "pope": ("lmms-lab/POPE", "test", ("question_id", "question", "answer"),
             lambda r: (r["question"].strip() + VQA_SHORT, [r["answer"]])),
    "mmbench_en_dev": ("lmms-lab/MMBench en", "dev", ("index", "question", "hint", "answer", "A", "B", "C", "D"),
                       _mmbench(OPTION_LETTER.lstrip("\n"))),
    "mmbench_cn_dev": ("lmms-lab/MMBench cn", "dev", ("index", "question", "hint", "answer", "A", "B", "C", "D"),
                       _mmbench(OPTION_LETTER_CN.lstrip("\n"))),
    "infovqa_val": ("lmms-lab/DocVQA InfographicVQA", "validation", ("questionId", "question", "answers"),
                    lambda r: (r["question"] + VQA_SHORT, by_frequency(r["answers"]))),
    "ok_vqa_val2014": ("lmms-lab/OK-VQA", "val2014", ("question_id", "question", "answers"),
                       lambda r: (r["question"] + VQA_UNANSWERABLE, by_frequency(r["answers"]))),
}
# The paper's general suites (N = 8): Tables 1-3, and Table 4 (Qwen2.5-VL-3B, LaTeX-OCR).
SUITES = {
    "llava": ("vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val", "pope", "mmbench_en_dev",
              "mmbench_cn_dev"),
    "qwen-latex": ("vqav2_val", "gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val", "pope", "infovqa_val",
                   "ok_vqa_val2014"),
}
ID_COLUMN = {"vqav2_val": "question_id", "gqa": "id", "vizwiz_vqa_val": "question_id", "textvqa_val": "question_id",
             "pope": "question_id", "mmbench_en_dev": "index", "mmbench_cn_dev": "index",
             "infovqa_val": "questionId", "ok_vqa_val2014": "question_id"}


def _task_files(source: Path, task: str) -> list[Path]:
    folder = source / task
    if not folder.is_dir():
        _fail(f"calibration: no folder {task}/ under {source} (the parquet files of lmms-eval's {task} dataset "
              f"{CALIBRATION_TASKS[task][0]}, split {CALIBRATION_TASKS[task][1]})")
    files = parquet_files(folder, f"calibration {task}")
    split = CALIBRATION_TASKS[task][1]
    named = [p for p in files if PARQUET_SPLIT.match(p.name) and parquet_split(p) == split]
    return named or files


def _pick(files: Sequence[Path], task: str, n: int, seed: int) -> list[tuple[int, Path, int]]:
    """n (global index, file, row in file) drawn without replacement by a seeded generator."""
    import pyarrow.parquet as pq
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in files]
    total = sum(sizes)
    if total < n:
        _fail(f"calibration: {task} has {total} rows, fewer than the {n} asked for")
    chosen = sorted(random.Random(f"{seed}:{task}").sample(range(total), n))
    out, start = [], 0
    for p, s in zip(files, sizes):
        out += [(g, p, g - start) for g in chosen if start <= g < start + s]
        start += s
    return out


def _rows_at(path: Path, rows: Sequence[int], columns: Sequence[str], what: str) -> list[dict]:
    """Rows `rows` (sorted indices) of a parquet file; only those rows become Python objects."""
    import pyarrow.parquet as pq
    f = pq.ParquetFile(path)
    missing = [c for c in columns if c not in f.schema_arrow.names]
    if missing:
        _fail(f"{what}: {path.name} has no column {missing[0]!r} (columns: {', '.join(f.schema_arrow.names)})")
    out, start = [], 0
    for b in f.iter_batches(batch_size=256, columns=list(columns)):
        out += [b.slice(i - start, 1).to_pylist()[0] for i in rows if start <= i < start + b.num_rows]
        start += b.num_rows
    return out


def calibration(source: Path, tasks: Sequence[str] = SUITES["llava"], n_per_task: int = 8, seed: int = 0
                ) -> tuple[str, Pairs]:
    unknown = [t for t in tasks if t not in CALIBRATION_TASKS]
    if unknown:
        _fail(f"calibration: unknown task {unknown[0]!r}; known: {', '.join(CALIBRATION_TASKS)}")
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        _fail(f"calibration: n_per_task must be an integer >= 1, got {n_per_task!r}")
    files = {t: _task_files(source, t) for t in tasks}          # every folder checked before anything is written
    how = f"{n_per_task} samples (seed {seed}) of each of the lmms-eval tasks {', '.join(tasks)}"
    return how, _calibration_rows(files, n_per_task, seed)


def _calibration_rows(files: Mapping[str, list[Path]], n: int, seed: int) -> Pairs:
    for task, paths in files.items():
        _, _, cols, conv = CALIBRATION_TASKS[task]
        if task == "gqa":                      # questions and images are two tables, joined on imageId
            ifiles = [p for p in paths if {"id", "image"} <= set(_schema(p)) and "imageId" not in _schema(p)]
            paths = [p for p in paths if "imageId" in _schema(p)]
            if not paths or not ifiles:
                _fail("calibration: gqa needs the testdev_balanced_instructions and testdev_balanced_images parquet "
                      "files under gqa/")
        picked = _pick(paths, task, n, seed)
        docs = []
        for path in dict.fromkeys(p for _, p, _ in picked):
            want = [i for _, p, i in picked if p == path]
            docs += _rows_at(path, want, cols + (() if task == "gqa" else ("image",)), f"calibration {task}")
        if task == "gqa":
            need = {d["imageId"] for d in docs}
            images: dict[str, bytes] = {}
            for p in ifiles:
                for r in parquet_rows(p, ("id", "image"), "calibration gqa"):
                    if r["id"] in need:
                        images[r["id"]] = image_bytes(r["image"], "calibration gqa")
        for (g, _, _), d in zip(picked, docs):
            prompt, answers = conv(d)
            if task == "gqa":
                if d["imageId"] not in images:
                    _fail(f"calibration: gqa image {d['imageId']} is not in the testdev_balanced_images files")
                img = images[d["imageId"]]
            else:
                img = image_bytes(d["image"], f"calibration {task}")
            sid = str(d[ID_COLUMN[task]]) if task in ID_COLUMN else f"row{g}"
            yield "calibration", Example(f"{task}-{sid}", prompt, answers, img, task=task)


READERS: dict[str, Callable[..., tuple[str, Pairs]]] = {
    "okvqa": okvqa, "flickr30k": flickr30k, "latex_ocr": latex_ocr, "calibration": calibration}


def read_source(target: str, source: Path, **options) -> tuple[str, Pairs]:
    """(a description of the source, the (split, example) pairs it holds). Checks what it can up front."""
    if target not in READERS:
        _fail(f"unknown target {target!r}; targets: {', '.join(READERS)}")
    source = Path(source)
    if not source.is_dir():
        _fail(f"{target}: source {source} is not a folder")
    if options and target != "calibration":
        _fail(f"{target} takes no options ({', '.join(options)})")
    return READERS[target](source, **options)
