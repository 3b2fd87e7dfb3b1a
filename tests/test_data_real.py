"""data_scripts.real on fabricated fixtures written here in the exact formats of the published files:
parquet as Hugging Face `datasets` writes it (image columns are structs {bytes, path}), the OK-VQA and
Karpathy JSON files with their real field names, COCO / Flickr30k image file names. Nothing is downloaded."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_scripts.real import export_miniature, prepare, read_split, verify
from data_scripts.real import sources as src
from data_scripts.real.__main__ import main
from cgm_min.cli import run

ROOT = Path(__file__).resolve().parents[1]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12, 4), (29 * i) % 256).save(buf, format="PNG")
    return buf.getvalue()


def cell(data: bytes, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "data.jsonl").read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------
# Fixtures in the published formats.

OKVQA_ANSWERS = ["dog", "puppy", "dog", "dog", "puppy", "dog", "terrier", "dog", "dog", "puppy"]


def okvqa_official(root: Path) -> Path:
    """OpenEnded_mscoco_*2014_questions.json + mscoco_*2014_annotations.json + COCO 2014 images."""
    for sub, qids in (("train2014", (2971475, 2971476, 57150)), ("val2014", (2971580, 5723505))):
        qs, ans = [], []
        for k, qid in enumerate(qids):
            image_id = 297147 + 10 * k + len(sub)
            qs.append({"image_id": image_id, "question": f"What breed is shown {k}?", "question_id": qid})
            answers = OKVQA_ANSWERS[k:] + OKVQA_ANSWERS[:k]
            ans.append({"image_id": image_id, "answer_type": "other", "question_type": "eight",
                        "question_id": qid, "confidence": 3,
                        "answers": [{"answer_id": j + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                                    for j, a in enumerate(answers)]})
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"COCO_{sub}_{image_id:012d}.jpg").write_bytes(jpeg(qid % 97))
        (root / f"OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps(
            {"license": {}, "data_subtype": sub, "task_type": "Open-Ended", "questions": qs, "info": {},
             "data_type": "mscoco"}))
        (root / f"mscoco_{sub}_annotations.json").write_text(json.dumps(
            {"license": {}, "data_subtype": sub, "annotations": ans, "info": {}, "data_type": "mscoco"}))
    return root


def okvqa_parquet(root: Path, n: int = 5) -> Path:
    """lmms-lab/OK-VQA: data/val2014-*.parquet with question_id (string), image, question, answers, types."""
    schema = pa.schema([("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()),
                        ("answers", pa.list_(pa.string())), ("question_type", pa.string()),
                        ("answer_type", pa.string())])
    rows = [{"question_id": str(5723500 + i), "image": cell(jpeg(i)), "question": f"What is this used for {i}?",
             "answers": ["racing"] * 4 + ["sport"] * 6 if i % 2 else ["fun"] * 10, "question_type": "other",
             "answer_type": "other"} for i in range(n)]
    write_parquet(root / "data" / "val2014-00000-of-00001.parquet", rows, schema)
    return root


FLICKR_FILES = [f"{1000092795 + 7 * i}.jpg" for i in range(6)]
FLICKR_SPLITS = ["train", "train", "train", "val", "test", "test"]


def karpathy_json(path: Path) -> Path:
    images = []
    for i, (fn, split) in enumerate(zip(FLICKR_FILES, FLICKR_SPLITS)):
        sents = [{"tokens": ["a", "dog", str(i), str(j)], "raw": f"A dog {i} runs, caption {j}.", "imgid": i,
                  "sentid": 5 * i + j} for j in range(5)]
        images.append({"sentids": [5 * i + j for j in range(5)], "imgid": i, "sentences": sents, "split": split,
                       "filename": fn})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def flickr_parquet(root: Path, with_split: bool = False, shards: int = 2) -> Path:
    """lmms-lab/flickr30k: data/test-0000k-of-0000n.parquet (image, caption, sentids, img_id, filename)."""
    fields = [("image", IMAGE), ("caption", pa.list_(pa.string())), ("sentids", pa.list_(pa.string())),
              ("img_id", pa.string()), ("filename", pa.string())] + ([("split", pa.string())] if with_split else [])
    rows = []
    for i, fn in enumerate(FLICKR_FILES):
        r = {"image": cell(jpeg(i), fn), "caption": [f"A dog {i} runs, caption {j}." for j in range(5)],
             "sentids": [str(5 * i + j) for j in range(5)], "img_id": str(i), "filename": fn}
        if with_split:
            r["split"] = FLICKR_SPLITS[i]
        rows.append(r)
    per = -(-len(rows) // shards)
    for k in range(shards):
        write_parquet(root / "data" / f"test-{k:05d}-of-{shards:05d}.parquet", rows[k * per:(k + 1) * per],
                      pa.schema(fields))
    return root


def latex_parquet(root: Path) -> Path:
    """unsloth/LaTeX_OCR: data/{train,test}-00000-of-00001.parquet with columns image, text."""
    schema = pa.schema([("image", IMAGE), ("text", pa.string())])
    for split, n in (("train", 7), ("test", 3)):
        rows = [{"image": cell(png(i + 50 * (split == "test"))), "text": rf"\frac{{{i}}}{{x_{i}}}"} for i in range(n)]
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows, schema)
    return root


def calibration_source(root: Path, n: int = 12) -> Path:
    """One folder per lmms-eval task with the columns of its dataset (and GQA's two tables)."""
    s, img, ls = pa.string(), IMAGE, pa.list_(pa.string())

    def w(task, name, fields, make):
        write_parquet(root / task / name, [make(i) for i in range(n)], pa.schema(fields))

    vqa_ans = pa.list_(pa.struct([("answer", s), ("answer_confidence", s), ("answer_id", pa.int64())]))
    w("vqav2_val", "validation-00000-of-00001.parquet",
      [("question_type", s), ("multiple_choice_answer", s), ("answers", vqa_ans), ("image_id", pa.int64()),
       ("answer_type", s), ("question_id", pa.int64()), ("question", s), ("image", img)],
      lambda i: {"question_type": "what", "multiple_choice_answer": "red", "image_id": i, "answer_type": "other",
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                             for j, a in enumerate(["blue", "red", "red"])],
                 "question_id": 262148000 + i, "question": f"What color is it {i}?", "image": cell(jpeg(i))})
    # a file of another split in the same folder is ignored
    w("vqav2_val", "testdev-00000-of-00001.parquet",
      [("question_id", pa.int64()), ("question", s), ("image", img)],
      lambda i: {"question_id": i, "question": "unused", "image": cell(jpeg(i))})
    w("gqa/testdev_balanced_instructions", "testdev-00000-of-00001.parquet",
      [("id", s), ("imageId", s), ("question", s), ("answer", s), ("fullAnswer", s), ("isBalanced", pa.bool_())],
      lambda i: {"id": f"20968{i:03d}", "imageId": f"n{161313 + i % 4}", "question": f"Is the cup on the left {i}?",
                 "answer": "no", "fullAnswer": "No, the cup is on the right.", "isBalanced": True})
    w("gqa/testdev_balanced_images", "testdev-00000-of-00001.parquet", [("id", s), ("image", img)],
      lambda i: {"id": f"n{161313 + i}", "image": cell(jpeg(100 + i))})
    w("vizwiz_vqa_val", "val-00000-of-00001.parquet",
      [("question_id", s), ("image", img), ("question", s), ("answers", ls), ("category", s)],
      lambda i: {"question_id": f"VizWiz_val_{i:08d}.jpg", "image": cell(jpeg(i)), "question": f"What is this {i}?",
                 "answers": ["unanswerable", "soup", "soup"], "category": "other"})
    w("scienceqa_img", "test-00000-of-00001-4bca3d3d8e8b8e2c.parquet",        # an older upload's name
      [("image", img), ("question", s), ("choices", ls), ("answer", pa.int8()), ("hint", s), ("task", s),
       ("grade", s), ("subject", s), ("topic", s), ("category", s), ("skill", s), ("lecture", s), ("solution", s)],
      lambda i: {"image": cell(png(i)), "question": f"Which is a mammal {i}?", "choices": ["frog", "whale", "shark"],
                 "answer": 1, "hint": "" if i % 2 else "Look at the picture.", "task": "closed choice",
                 "grade": "grade3", "subject": "natural science", "topic": "biology", "category": "c", "skill": "s",
                 "lecture": "", "solution": ""})
    w("textvqa_val", "validation-00000-of-00001.parquet",
      [("image_id", s), ("question_id", pa.int32()), ("question", s), ("image", img), ("answers", ls),
       ("ocr_tokens", ls), ("set_name", s)],
      lambda i: {"image_id": f"{i:016x}", "question_id": 34602 + i, "question": f"what brand is this {i}?",
                 "image": cell(jpeg(i)), "answers": ["nokia"] * 7 + ["toshiba"] * 3, "ocr_tokens": ["nokia"],
                 "set_name": "val"})
    w("pope", "test-00000-of-00001.parquet",
      [("id", s), ("question_id", s), ("question", s), ("answer", s), ("image_source", s), ("image", img),
       ("category", s)],
      lambda i: {"id": str(i), "question_id": str(i + 1), "question": f" Is there a snowboard in the image {i}? ",
                 "answer": "yes" if i % 2 else "no", "image_source": f"COCO_val2014_{i:012d}", "image": cell(jpeg(i)),
                 "category": "adversarial"})
    mmb = [("index", pa.int64()), ("question", s), ("hint", s), ("answer", s), ("A", s), ("B", s), ("C", s),
           ("D", s), ("category", s), ("image", img), ("source", s), ("L2-category", s), ("comment", s), ("split", s)]
    for task, q in (("mmbench_en_dev", "Which one is a fruit"), ("mmbench_cn_dev", "哪一个是水果")):
        w(task, "dev-00000-of-00001.parquet", mmb,
          lambda i, q=q: {"index": 241 + i, "question": f"{q} {i}?", "hint": "nan" if i % 2 else "A market.",
                          "answer": "B", "A": "stone", "B": "apple", "C": "chair", "D": "nan" if i % 3 else "cup",
                          "category": "object", "image": cell(png(i)), "source": "x", "L2-category": "y",
                          "comment": "nan", "split": "dev"})
    return root


# ----------------------------------------------------------------------------------------------

def test_okvqa_official(tmp_path):
    source = okvqa_official(tmp_path / "src")
    before = tree_hash(source)
    folder = prepare("okvqa", source, tmp_path / "data")
    m = verify(tmp_path / "data", "okvqa")
    assert m["splits"] == {"train": 3, "val": 2}
    train = read_split(tmp_path / "data", "okvqa", "train")
    assert [r["id"] for r in train] == ["2971475", "2971476", "57150"]
    for k, r in enumerate(train):
        given = OKVQA_ANSWERS[k:] + OKVQA_ANSWERS[:k]
        assert r["answers"][0] == "dog" and sorted(r["answers"]) == sorted(given)    # majority first, all 10 kept
        assert r["question"] == f"What breed is shown {k}?" + src.VQA_UNANSWERABLE
        coco = source / "train2014" / f"COCO_train2014_{297147 + 10 * k + 9:012d}.jpg"
        assert (folder / "train" / r["image"]).read_bytes() == coco.read_bytes()
    assert tree_hash(source) == before                                                 # inputs untouched


def test_okvqa_lmms_parquet(tmp_path):
    prepare("okvqa", okvqa_parquet(tmp_path / "src"), tmp_path / "data")
    rows = read_split(tmp_path / "data", "okvqa", "val")
    assert len(rows) == 5 and rows[1]["id"] == "5723501"
    assert rows[1]["answers"][0] == "sport" and rows[1]["answers"].count("racing") == 4
    assert rows[0]["image"].endswith(".jpg")


def test_flickr30k_karpathy_json(tmp_path):
    source = tmp_path / "src"
    karpathy_json(source / src.KARPATHY)
    for i, fn in enumerate(FLICKR_FILES):
        (source / "flickr30k-images").mkdir(parents=True, exist_ok=True)
        (source / "flickr30k-images" / fn).write_bytes(jpeg(i))
    m = prepare("flickr30k", source, tmp_path / "data") and verify(tmp_path / "data", "flickr30k")
    assert m["splits"] == {"train": 3, "val": 1, "test": 2}
    r = read_split(tmp_path / "data", "flickr30k", "val")[0]
    assert r["id"] == "1000092816" and r["question"] == src.FLICKR_PROMPT
    assert r["answers"] == [f"A dog 3 runs, caption {j}." for j in range(5)]


@pytest.mark.parametrize("how", ["split column", "karpathy json", "neither"])
def test_flickr30k_parquet(tmp_path, how):
    source = flickr_parquet(tmp_path / "src", with_split=how == "split column")
    if how == "karpathy json":
        karpathy_json(source / src.KARPATHY)
    m = prepare("flickr30k", source, tmp_path / "data") and verify(tmp_path / "data", "flickr30k")
    want = {"train": 3, "val": 1, "test": 2} if how != "neither" else {"test": 6}     # lmms-lab: one test split
    assert m["splits"] == want
    rows = read_split(tmp_path / "data", "flickr30k", "test")
    assert rows[-1]["id"] == FLICKR_FILES[-1][:-4] and len(rows[-1]["answers"]) == 5


def test_latex_ocr(tmp_path):
    prepare("latex_ocr", latex_parquet(tmp_path / "src"), tmp_path / "data")
    m = verify(tmp_path / "data", "latex_ocr")
    assert m["splits"] == {"test": 3, "train": 7}
    r = read_split(tmp_path / "data", "latex_ocr", "train")[2]
    assert r == {"id": "train-000002", "image": "images/train-000002.png", "question": src.LATEX_PROMPT,
                 "answers": [r"\frac{2}{x_2}"]}
    assert (tmp_path / "data" / "latex_ocr" / "train" / r["image"]).read_bytes() == png(2)


def test_calibration_set(tmp_path):
    source = calibration_source(tmp_path / "src")
    prepare("calibration", source, tmp_path / "a", n_per_task=8, seed=0)
    rows = read_split(tmp_path / "a", "calibration", "calibration")
    suite = src.SUITES["llava"]
    assert [r["task"] for r in rows] == [t for t in suite for _ in range(8)]          # 8 from each task
    assert all(r["image"] for r in rows)
    by_task = {t: [r for r in rows if r["task"] == t] for t in suite}
    vqa = by_task["vqav2_val"][0]
    assert vqa["answers"] == ["red", "blue", "red"] and vqa["question"].endswith(src.VQA_SHORT)
    assert all(r["question"].startswith("What color") for r in by_task["vqav2_val"])  # not the testdev file
    sqa = by_task["scienceqa_img"][0]
    assert sqa["answers"] == ["B"] and "A. frog\nB. whale\nC. shark" in sqa["question"]
    mmb = by_task["mmbench_en_dev"]
    assert all(r["answers"] == ["B"] and "There are several options:\nA. stone\nB. apple" in r["question"] for r in mmb)
    assert all(not r["question"].startswith("nan") for r in mmb)
    assert all(not r["image"].endswith(".jpg.jpg") for r in by_task["vizwiz_vqa_val"])
    gqa = by_task["gqa"]                                    # images joined from the second table by imageId
    gimg = {f"n{161313 + i}": jpeg(100 + i) for i in range(12)}
    folder = tmp_path / "a" / "calibration" / "calibration"
    assert {(folder / r["image"]).read_bytes() for r in gqa} <= set(gimg.values())
    # seeded: the same seed draws the same samples, another seed others
    prepare("calibration", source, tmp_path / "b", n_per_task=8, seed=0)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    prepare("calibration", source, tmp_path / "c", n_per_task=8, seed=1)
    assert [r["id"] for r in read_split(tmp_path / "c", "calibration", "calibration")] != [r["id"] for r in rows]


def test_calibration_refuses_missing_task_folder(tmp_path):
    source = calibration_source(tmp_path / "src")
    with pytest.raises(ValueError, match=r"calibration: no folder infovqa_val/ under"):
        prepare("calibration", source, tmp_path / "data", tasks="qwen-latex")
    with pytest.raises(ValueError, match="pope has 12 rows, fewer than the 13"):
        prepare("calibration", source, tmp_path / "data", tasks=("pope",), n_per_task=13)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # nothing half-written


def test_prompts_are_lmms_evals():
    """The prompt texts equal those of the installed lmms-eval task files."""
    lmms = pytest.importorskip("lmms_eval")
    import yaml
    tasks = Path(lmms.__file__).parent / "tasks"

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)

    def post(rel):
        return yaml.load((tasks / rel).read_text(encoding="utf-8"), Loader)["lmms_eval_specific_kwargs"]["default"][
            "post_prompt"]
    assert post("ok_vqa/_default_template_vqa_yaml") == src.VQA_UNANSWERABLE
    assert post("vizwiz_vqa/_default_template_vqa_yaml") == src.VQA_UNANSWERABLE
    for rel in ("vqav2/_default_template_vqav2_yaml", "gqa/gqa.yaml", "textvqa/_default_template_textvqa_yaml",
                "pope/pope.yaml", "infovqa/_default_template_infovqa_yaml"):
        assert post(rel) == src.VQA_SHORT, rel
    assert post("scienceqa/scienceqa_img.yaml") == src.OPTION_LETTER
    assert post("mmbench/_default_template_mmbench_en_yaml") == src.OPTION_LETTER
    assert post("mmbench/_default_template_mmbench_cn_yaml") == src.OPTION_LETTER_CN
    assert yaml.load((tasks / "mmbench/mmbench.yaml").read_text(), Loader)["metadata"]["sys_prompt"] == src.MMBENCH_SYS
    assert f'"{src.FLICKR_PROMPT}"' in (tasks / "flickr30k/utils.py").read_text()


def test_a_changed_byte_is_caught(tmp_path):
    prepare("latex_ocr", latex_parquet(tmp_path / "src"), tmp_path / "data")
    img = tmp_path / "data" / "latex_ocr" / "test" / "images" / "test-000001.png"
    raw = bytearray(img.read_bytes())
    raw[len(raw) // 2] ^= 1
    img.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"^latex_ocr: test/images/test-000001.png does not match its checksum"):
        verify(tmp_path / "data", "latex_ocr")
    img.unlink()
    with pytest.raises(ValueError, match="listed in manifest.json but missing"):
        verify(tmp_path / "data", "latex_ocr")


def test_unlisted_file_and_bad_count(tmp_path):
    prepare("latex_ocr", latex_parquet(tmp_path / "src"), tmp_path / "data")
    extra = tmp_path / "data" / "latex_ocr" / "train" / "images" / "stray.png"
    extra.write_bytes(png(1))
    with pytest.raises(ValueError, match="stray.png is not listed"):
        verify(tmp_path / "data", "latex_ocr")


def test_bad_source_writes_nothing(tmp_path):
    source = latex_parquet(tmp_path / "src")
    write_parquet(source / "data" / "train-00000-of-00001.parquet", [{"image": cell(png(0)), "caption": "x"}],
                  pa.schema([("image", IMAGE), ("caption", pa.string())]))
    with pytest.raises(ValueError, match="latex_ocr: train-00000-of-00001.parquet has no column 'text'"):
        prepare("latex_ocr", source, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []                # no target, no hidden temporary folder
    noimg = tmp_path / "noimg"
    write_parquet(noimg / "data" / "test-00000-of-00001.parquet", [{"image": cell(None, "a.png"), "text": "x"}],
                  pa.schema([("image", IMAGE), ("text", pa.string())]))
    with pytest.raises(ValueError, match="an image cell without bytes"):
        prepare("latex_ocr", noimg, tmp_path / "data")


def test_existing_target_needs_overwrite(tmp_path):
    source = latex_parquet(tmp_path / "src")
    prepare("latex_ocr", source, tmp_path / "data")
    first = tree_hash(tmp_path / "data")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        prepare("latex_ocr", source, tmp_path / "data")
    prepare("latex_ocr", source, tmp_path / "data", overwrite=True)
    assert tree_hash(tmp_path / "data") == first and [p.name for p in (tmp_path / "data").iterdir()] == ["latex_ocr"]


def test_cli(tmp_path, capsys):
    source = latex_parquet(tmp_path / "src")
    assert run(main, ["prepare", "latex_ocr", str(source), str(tmp_path / "data")]) == 0
    assert "train 7" in capsys.readouterr().out
    assert run(main, ["verify", str(tmp_path / "data")]) == 0
    assert "latex_ocr: ok" in capsys.readouterr().out
    (tmp_path / "data" / "latex_ocr" / "test" / "data.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "data_scripts.real", "verify", str(tmp_path / "data")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: latex_ocr: test/data.jsonl does not match its checksum in manifest.json (changed since prepared)"]
    assert run(main, ["prepare", "okvqa", str(tmp_path / "nowhere"), str(tmp_path / "d2")]) == 2
    assert capsys.readouterr().err.strip() == f"error: okvqa: source {tmp_path / 'nowhere'} is not a folder"


def test_export_miniature(tmp_path):
    from cgm_min.world import tasks as mt
    export_miniature("corners", "train", tmp_path, n=5)
    rows = read_split(tmp_path, "corners", "train")
    samples = mt.make_samples("corners", "train", 5)
    assert [(r["question"], r["answers"]) for r in rows] == [(s.question, [s.answer]) for s in samples]
    img = Image.open(tmp_path / "corners" / "train" / rows[0]["image"])
    assert img.tobytes() == samples[0].image.tobytes()
    export_miniature("calibration", "calibration", tmp_path)
    cal = read_split(tmp_path, "calibration", "calibration")
    assert [r["task"] for r in cal] == [t for t in mt.GENERAL for _ in range(8)]
    with pytest.raises(ValueError, match="split must be one of"):
        export_miniature("corners", "test", tmp_path / "x")


def test_export_miniature_splits(tmp_path):
    """Several splits of one task in one target with one manifest; each split as export_miniature writes it."""
    from data_scripts.real import export_miniature_splits
    export_miniature_splits("corners", {"train": 3, "heldout": 2}, tmp_path / "a")
    m = verify(tmp_path / "a", "corners")
    assert m["splits"] == {"train": 3, "heldout": 2}
    assert m["source"] == "cgm_min.world.tasks: corners, split train, 3 samples; split heldout, 2 samples, world_seed 0"
    for split, n in m["splits"].items():
        export_miniature("corners", split, tmp_path / split, n=n)
        assert read_split(tmp_path / "a", "corners", split) == read_split(tmp_path / split, "corners", split)
    assert verify(tmp_path / "train", "corners")["source"] == "cgm_min.world.tasks: corners, split train, 3 samples, world_seed 0"
    with pytest.raises(ValueError, match="split must be one of"):
        export_miniature_splits("corners", {"train": 1, "test": 1}, tmp_path / "x")
    assert not (tmp_path / "x" / "corners").exists()


def test_build_mini_data_still_loads():
    from cgm_min.pipeline import load_data_script
    assert callable(load_data_script("build_mini_data").build)


def test_parquet_split_names():
    for name, split in (("test-00003-of-00009.parquet", "test"), ("val2014-00000-of-00002.parquet", "val2014"),
                        ("test-00000-of-00001-4bca3d3d8e8b8e2c.parquet", "test"), ("validation.parquet", "validation")):
        assert src.parquet_split(Path(name)) == split
    with pytest.raises(ValueError, match="cannot tell its split"):
        src.parquet_split(Path("part-0.parquet"))


def test_the_chain_reads_what_is_prepared(tmp_path):
    """The agreed interface: the paper-preset chain's reader takes a prepared target and a miniature export."""
    data = pytest.importorskip("cgm_min.reproduce.data")
    prepare("flickr30k", flickr_parquet(tmp_path / "src", with_split=True), tmp_path / "d")
    recs = data.read_split(tmp_path / "d", "flickr30k", "train")
    assert [r.id for r in recs] == [f[:-4] for f in FLICKR_FILES[:3]]
    assert all(r.image_path.is_file() and len(r.answers) == 5 for r in recs)
    export_miniature("calibration", "calibration", tmp_path / "d", n=2)
    cal = data.read_split(tmp_path / "d", "calibration", "calibration")
    assert len(cal) == 2 * len({r.task for r in cal}) and all(r.task for r in cal)


def test_one_parser_of_data_jsonl(tmp_path, monkeypatch):
    """The chain's reader parses data.jsonl through data_scripts.real.local's parser (one copy): bad lines are
    named by their line number in one line, blank lines skipped, `limit` stops reading."""
    from cgm_min.reproduce import data
    from data_scripts.real import local
    split = tmp_path / "t" / "train"
    split.mkdir(parents=True)
    good = json.dumps({"id": "a", "image": None, "question": "q?", "answers": ["x", "y"]})
    (split / "data.jsonl").write_text(f"{good}\n\n{good}\n")
    calls = []
    real = local.iter_numbered
    monkeypatch.setattr(local, "iter_numbered", lambda folder: calls.append(folder) or real(folder))
    assert [r.answers for r in data.read_split(tmp_path, "t", "train")] == [("x", "y"), ("x", "y")]
    assert len(data.read_split(tmp_path, "t", "train", limit=1)) == 1 and calls == [split, split]
    for bad, msg in (("{not json", "line 3 is not valid JSON"), ('{"id": "b", "question": "q"}', "line 3: not a record"),
                     ("[1, 2]", "line 3: not a record")):
        (split / "data.jsonl").write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(ValueError, match=msg) as err:
            data.read_split(tmp_path, "t", "train")
        assert "\n" not in str(err.value)
