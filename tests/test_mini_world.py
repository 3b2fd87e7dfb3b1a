"""Fast checks of the miniature world (tasks, mini LLaVA / Qwen2.5-VL, batches, evaluation, training).

Everything here uses the `test`-size models (a few thousand parameters) so that the file runs in seconds.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cgm_min import cgm
from cgm_min.world import models as mm
from cgm_min.world import tasks as mt
from cgm_min.evaluate import decoding as dec
from cgm_min.evaluate import scores as sc
from cgm_min.world import training as tr
from cgm_min.cli import train as cli_train


# ----------------------------------------------------------------------------------------------
# Tasks.

def test_registry_has_the_paper_roles():
    assert len(mt.GENERAL) >= 6 and len(mt.TARGETS) >= 2
    templates = [mt.get_task(t).template for t in mt.TASKS]
    assert len(set(templates)) == len(templates), "every task needs its own prompt"
    table = mt.task_table()
    assert set(table.index) == set(mt.TASKS) and table["stands_for"].str.len().min() > 3


def test_samples_are_deterministic():
    for task in mt.TASKS:
        a, b = mt.make_sample(task, "heldout", 7), mt.make_sample(task, "heldout", 7)
        assert a.content_bytes() == b.content_bytes() and a.answer == b.answer
        assert a.image.size == (32, 32) and a.image.mode == "RGB"
    # different indices give different samples, and the world seed changes the world
    assert mt.make_sample("count", "train", 1).content_bytes() != mt.make_sample("count", "train", 2).content_bytes()
    assert mt.make_sample("count", "train", 1).content_bytes() != \
        mt.make_sample("count", "train", 1, world_seed=1).content_bytes()
    # pinned: the first letters of the first 12 held-out answers (a change here invalidates shipped scores)
    pinned = {"colour": "byobrgobroyr", "shape": "sstdtcccstts", "position": "lllrlrrlrrlr", "presence": "nnnnnnnnynnn",
              "count": "424333123113", "addition": "818861179119", "choice": "AADCDCDBDCDD", "digit": "425956135270",
              "corners": "004434440440", "colour_code": "513451636245"}
    for task, letters in pinned.items():
        assert "".join(s.answer[0] for s in mt.make_samples(task, "heldout", 12)) == letters, task


@pytest.mark.parametrize("task", list(mt.TASKS))
def test_splits_are_disjoint(task):
    seen = {}
    for split in mt.SPLITS:
        samples = mt.make_samples(task, split, 150)
        keys = {s.content_bytes() for s in samples}
        for other, other_keys in seen.items():
            assert not keys & other_keys, f"{task}: {split} shares samples with {other}"
        seen[split] = keys
        assert all(mt.split_of_key(task, s.meta["key"]) == split for s in samples)


def _object_pixels(img, quadrant):
    a = np.asarray(img).astype(int)
    q = a[16 * (quadrant // 2):16 * (quadrant // 2) + 16, 16 * (quadrant % 2):16 * (quadrant % 2) + 16]
    bright = q.max(axis=2) > 100          # the background is dark grey (< 40)
    return q[bright]


def _nearest_colour(rgb):
    return min(mt.COLOURS, key=lambda c: np.abs(np.array(mt.COLOURS[c]) - rgb).sum())


def test_answers_match_the_pixels():
    for s in mt.make_samples("colour", "heldout", 30):
        px = _object_pixels(s.image, s.meta["objects"][0]["quadrant"])
        assert len(px) > 30 and _nearest_colour(np.median(px, axis=0)) == s.answer
    for s in mt.make_samples("position", "heldout", 30):
        cols = np.nonzero(np.asarray(s.image).max(axis=2).max(axis=0) > 100)[0]
        assert (cols.mean() < 16) == (s.answer == "left")
    for s in mt.make_samples("count", "heldout", 30):
        occupied = sum(len(_object_pixels(s.image, q)) > 20 for q in range(4))
        assert occupied == int(s.answer)
    for s in mt.make_samples("presence", "heldout", 40):
        colours = {_nearest_colour(np.median(_object_pixels(s.image, q), axis=0))
                   for q in range(4) if len(_object_pixels(s.image, q)) > 20}
        query = re.search(r"Is there an? (\w+) object", s.question).group(1)
        assert (query in colours) == (s.answer == "yes")
    for s in mt.make_samples("choice", "heldout", 40):
        options = dict(re.findall(r"\(([ABCD])\) (\w+)", s.question))
        if s.question.startswith("How many"):
            assert options[s.answer] == str(sum(len(_object_pixels(s.image, q)) > 20 for q in range(4)))
        else:
            assert options[s.answer] == s.meta["objects"][0]["shape"]
    for s in mt.make_samples("addition", "heldout", 20):
        a, b = map(int, re.findall(r"\d+", s.question))
        pixels = np.asarray(s.image).reshape(-1, 3)
        assert int(s.answer) == a + b and (pixels == pixels[0]).all() and pixels.max() < 40   # a blank shade
    # every held-out addition asks a pair that training also asks (a kept skill, not extrapolation)
    train_pairs = {s.question for s in mt.make_samples("addition", "train", 2000)}
    assert {s.question for s in mt.make_samples("addition", "heldout", 200)} <= train_pairs
    _, target = mt._digits()
    for s in mt.make_samples("digit", "heldout", 20):
        assert s.answer == str(target[s.meta["row"]])
    for s in mt.make_samples("corners", "heldout", 20):
        assert s.answer == str(mt.CORNERS[s.meta["objects"][0]["shape"]])
    for s in mt.make_samples("colour_code", "heldout", 20):
        px = _object_pixels(s.image, s.meta["objects"][0]["quadrant"])
        assert s.answer == str(mt.COLOUR_CODE[_nearest_colour(np.median(px, axis=0))])


def test_answer_kinds_tell_lost_skills_from_takeovers():
    assert mt.answer_kind("colour", "red", "red", "corners") == "correct"
    assert mt.answer_kind("colour", "red circle", "red", "corners") == "format"
    assert mt.answer_kind("colour", "blue", "red", "corners") == "own task"
    assert mt.answer_kind("colour", "4", "red", "corners") == "target"
    assert mt.answer_kind("colour", "no", "red", "corners") == "other"
    # "4" is also a count: for the count task it is a wrong count, not the target taking over
    assert mt.answer_kind("count", "4", "2", "corners") == "own task"
    assert mt.answer_kind("colour", "4", "red") == "other"
    assert set(mt.ANSWER_KINDS) == {"correct", "format", "own task", "target", "other"}


def test_scores_and_paper_table():
    assert sc.exact_match("red", "red") == 1 and sc.exact_match("red circle", "red") == 0
    assert sc.relaxed_match("red circle", "red") == 1 and sc.relaxed_match("blue", "red") == 0
    assert sc.hscore(0.5, 1.0) == pytest.approx(2 / 3) and sc.hscore(0.0, 0.0) == 0.0
    assert sc.avg_score(0.5, 1.0, 8) == pytest.approx((0.5 + 8) / 9)
    scores = {t: 1.0 for t in mt.GENERAL} | {"corners": 0.2}
    df = sc.paper_table({"pre-trained": scores, "fine-tuned": {**scores, "count": 0.0, "corners": 1.0}}, "corners")
    assert df.loc["pre-trained", "Pre-Avg"] == pytest.approx(100.0)
    assert df.loc["fine-tuned", "Pre-Avg"] == pytest.approx(100 * (len(mt.GENERAL) - 1) / len(mt.GENERAL))
    assert df.loc["pre-trained", "Hscore"] == pytest.approx(100 * sc.hscore(0.2, 1.0))


# ----------------------------------------------------------------------------------------------
# Models, processors, batches.

def test_processor_round_trip(processors, models, tmp_path):
    samples = [mt.make_sample(t, "heldout", 0) for t in mt.TASKS]
    for fam in mm.FAMILIES:
        path = mm.save_family(models[fam], processors[fam], tmp_path / fam)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
            assert (path / f).exists(), f
        model2, proc2 = mm.load_family(path)
        assert type(proc2) is type(processors[fam]) and mm.family_of(model2) == fam
        b1, b2 = mm.Encoder(processors[fam]).batch(samples), mm.Encoder(proc2).batch(samples)
        assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
        sd1, sd2 = models[fam].state_dict(), model2.state_dict()
        assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
        # the chat template also accepts plain string content (lmms-eval passes strings)
        text = proc2.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                         tokenize=False)
        assert "hello" in text and text.endswith(("ASSISTANT:", "assistant\n"))


def test_prompts_use_each_familys_format(processors):
    llava, qwen = (mm.Encoder(processors[f]) for f in mm.FAMILIES)
    assert llava.prompt("Q?") == "USER: <image>\nQ? ASSISTANT:"
    assert qwen.prompt("Q?") == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n" \
                                "<|im_start|>assistant\n"


@pytest.mark.parametrize("fam", mm.FAMILIES)
def test_batches_forward_backward(fam, processors, models):
    enc, model = mm.Encoder(processors[fam]), models[fam]
    samples = [mt.make_sample(t, "train", i) for i in range(2) for t in mt.TASKS]
    b = enc.batch(samples)
    n_image = (b["input_ids"] == model.config.image_token_id).sum(1)
    assert (n_image == 16).all(), "16 image tokens per sample in both families"
    if fam == "qwen":
        assert "mm_token_type_ids" in b and b["pixel_values"].shape[0] == 64 * len(samples)
    for i, s in enumerate(samples):      # the loss is on the answer tokens + the end token only
        lab = b["labels"][i][b["labels"][i] != -100].tolist()
        assert lab == enc.answer_ids(s.answer) and lab[-1] == enc.end_id
        assert processors[fam].tokenizer.decode(lab[:-1]).strip() == s.answer
    model.train()
    out = model(**b)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.language_model.layers.")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("fam", mm.FAMILIES)
def test_merge_param_names_follow_the_real_naming(fam, models):
    model = models[fam]
    L = mm.n_text_layers(model)
    names = mm.merge_param_names(model)
    proj = {"llava": r"model\.multi_modal_projector\.(linear_1|linear_2)\.(weight|bias)",
            "qwen": r"model\.visual\.merger\.(ln_q\.weight|mlp\.0\.(weight|bias)|mlp\.2\.(weight|bias))"}[fam]
    layers = set()
    for n in names:
        m = re.fullmatch(r"model\.language_model\.layers\.(\d+)\..+", n)
        assert m or re.fullmatch(proj, n), n
        if m:
            layers.add(int(m.group(1)))
    assert layers == set(range(L - L // 2, L))                   # default: the last half
    assert any(re.fullmatch(proj, n) for n in names)
    assert len(mm.merge_param_names(model, n_layers=0)) == sum(bool(re.fullmatch(proj, n)) for n in names)
    assert not any("vision_tower" in n or "visual.blocks" in n or "embed" in n or "lm_head" in n for n in names)
    with pytest.raises(ValueError):
        mm.merge_param_names(model, n_layers=L + 1)


@pytest.mark.parametrize("fam", mm.FAMILIES)
def test_batch_equals_tokenising_the_full_text(fam, processors):
    """`Encoder.batch` appends the answer ids to the encoded prompt; that is what the tokenizer makes of the
    whole conversation text, for every task."""
    enc = mm.Encoder(processors[fam])
    samples = [mt.make_sample(t, "train", i) for i in range(3) for t in mt.TASKS]
    b = enc.batch(samples)
    full = processors[fam](images=[s.image for s in samples], text=[enc.full_text(s) for s in samples],
                           padding=True, return_tensors="pt")
    for k in full:
        assert torch.equal(b[k], full[k]) if k != "input_ids" else torch.equal(
            b[k][b["attention_mask"].bool()], full[k][full["attention_mask"].bool()]), k


@pytest.mark.parametrize("fam", mm.FAMILIES)
def test_teacher_forced_score_equals_greedy_generation(fam, processors, models):
    """Take the model's own greedy tokens as reference answers. Teacher forcing must then find every answer
    token (relaxed = 1) and call a sample exact exactly when greedy decoding emitted the end token right
    after them (greedy generation is left-padded, teacher forcing right-padded)."""
    enc, model = mm.Encoder(processors[fam]), models[fam]
    prompts = [mt.make_sample(t, "heldout", i) for i in range(3) for t in mt.TASKS]
    _, rows = dec.generate(model, enc, prompts, max_new_tokens=3, return_ids=True)
    bad = {processors[fam].tokenizer.pad_token_id, model.config.image_token_id}
    refs, expect, keep = [], [], []
    for i, row in enumerate(rows):
        if enc.end_id in row[:2]:
            ref = row[:row.index(enc.end_id) + 1]
        else:
            ref = row[:2] + [enc.end_id]
        if bad & set(ref):
            continue
        keep.append(prompts[i])
        refs.append(ref)
        expect.append(float(row[:len(ref)] == ref))
    assert len(keep) >= len(prompts) // 2
    exact, relaxed = dec.teacher_forced(model, enc, keep, batch_size=7, answer_ids=refs)
    assert relaxed.tolist() == [1.0] * len(keep)
    assert exact.tolist() == expect
    wrong = [[(r[0] + 1) % 50 + 10] + r[1:] for r in refs]       # another first token: never right
    assert dec.teacher_forced(model, enc, keep, answer_ids=wrong)[1].sum() == 0


# ----------------------------------------------------------------------------------------------
# Training.

def test_pretraining_is_deterministic_and_resumable_from_its_schedule(processors):
    def run(steps, stop_after=None, seed=0):
        cfg = tr.PretrainConfig(family="llava", seed=seed, steps=steps, size="test", eval_every=0, batch_size=8)
        return tr.pretrain(cfg, stop_after=stop_after, progress=False, processor=processors["llava"])[2]["losses"]
    a, b = run(4), run(4)
    assert a == b and len(a) == 4
    assert run(10_000, stop_after=4) == a          # warm-up does not depend on the total number of steps
    assert run(4, seed=1) != a
    assert a[-1] < a[0]


def test_finetuning_touches_only_the_merge_set(processors):
    model = mm.build_model("qwen", processors["qwen"], size="test", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = tr.FinetuneConfig(target="corners", steps=2, batch_size=4, fisher_during=True, fisher_per_step=2)
    log, h_ft = tr.finetune(model, processors["qwen"], cfg, progress=False)
    names = set(mm.merge_param_names(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in names), n
        assert p.requires_grad                         # flags restored
    assert set(h_ft) == names and all((h >= 0).all() for h in h_ft.values())
    assert sum(float(h.sum()) for h in h_ft.values()) > 0 and len(log["losses"]) == 2


def test_finetuning_seeds_draw_different_samples(processors):
    def losses(seed):
        model = mm.build_model("llava", processors["llava"], size="test", seed=0)
        cfg = tr.FinetuneConfig(target="corners", steps=2, batch_size=4, seed=seed)
        return tr.finetune(model, processors["llava"], cfg, progress=False)[0]["losses"]
    assert losses(0) == losses(0) and losses(0) != losses(1)
    one = tr.train_batch(("corners",), 0, 4, 1, "finetune/corners", first_index=tr.SEED_STRIDE)
    assert [s.index for s in one] == [tr.SEED_STRIDE + j for j in range(4)]


def test_calibration_fisher_is_diag_fisher_on_the_calibration_samples(processors):
    model = mm.build_model("llava", processors["llava"], size="test", seed=0)
    names = mm.merge_param_names(model)
    h = tr.calibration_fisher(model, processors["llava"], ("colour", "count"), 3)
    ref = cgm.diag_fisher(model, tr.fisher_batches(processors["llava"], ("colour", "count"), 3), names, progress=False)
    assert list(h) == names and all(torch.equal(h[n], ref[n]) for n in names)
    # the samples come from the calibration split: another split gives another curvature
    other = cgm.diag_fisher(model, tr.fisher_batches(processors["llava"], ("colour", "count"), 3, split="train"),
                            names, progress=False)
    assert not all(torch.equal(h[n], other[n]) for n in names)


def test_curvature_files_round_trip_and_refuse_bad_values(tmp_path):
    curv = {"model.language_model.layers.2.mlp.up_proj.weight": torch.rand(4, 3),
            "model.multi_modal_projector.linear_1.bias": torch.rand(4)}
    path = tr.save_curvature(curv, tmp_path / "h.safetensors", {"kind": "h_pt", "n_per_task": 8, "tasks": ["a"]})
    back, meta = tr.load_curvature(path)
    assert meta == {"kind": "h_pt", "n_per_task": 8, "tasks": ["a"]}
    assert all(torch.equal(back[n], curv[n]) for n in curv)
    for bad in (float("nan"), float("inf"), -1.0):
        broken = {**curv, "model.multi_modal_projector.linear_1.bias": torch.tensor([0.0, bad, 1.0, 2.0])}
        with pytest.raises(ValueError, match="linear_1.bias"):
            tr.save_curvature(broken, path)
    assert torch.equal(tr.load_curvature(path)[0]["model.multi_modal_projector.linear_1.bias"], curv[
        "model.multi_modal_projector.linear_1.bias"])          # the refused write left the old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]
    with pytest.raises(FileNotFoundError, match="no curvature file"):
        tr.load_curvature(tmp_path / "missing.safetensors")


def test_curvature_by_module_groups_by_layer_and_module():
    curv = {"model.language_model.layers.2.self_attn.q_proj.weight": torch.full((2, 2), 1.0),
            "model.language_model.layers.3.mlp.down_proj.weight": torch.full((3,), 2.0),
            "model.visual.merger.mlp.0.bias": torch.full((5,), 4.0)}
    df = tr.curvature_by_module(curv).set_index("name")
    assert list(df["block"]) == ["layer 2", "layer 3", "projector"]
    assert list(df["module"]) == ["q_proj", "down_proj", "0"]
    assert list(df["n"]) == [4, 3, 5] and list(df["sum"]) == [4.0, 6.0, 20.0] and list(df["mean"]) == [1.0, 2.0, 4.0]


def test_shipped_checkpoint_names_what_is_missing(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        mm.shipped_checkpoint("gpt2")
    monkeypatch.setattr(mm, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="mini-llava-1.5"):
        mm.shipped_checkpoint("llava")


def test_curvature_command_line_writes_h_pt_of_a_saved_model(processors, tmp_path, capsys):
    model = mm.build_model("qwen", processors["qwen"], size="test", seed=0)
    mm.save_family(model, processors["qwen"], tmp_path / "m")
    out = tmp_path / "h" / "h_pt.safetensors"
    assert cli_train.main(["curvature", "--model", str(tmp_path / "m"), "--tasks", "general", "--n-per-task", "1",
                    "--out", str(out)]) == 0
    h, meta = tr.load_curvature(out)
    assert meta["kind"] == "h_pt" and meta["tasks"] == list(mt.GENERAL) and meta["n_per_task"] == 1
    ref = tr.calibration_fisher(mm.load_family(tmp_path / "m")[0], processors["qwen"], mt.GENERAL, 1)
    assert set(h) == set(ref) and all(torch.allclose(h[n], ref[n], rtol=1e-5, atol=0) for n in h)
    with pytest.raises(KeyError, match="unknown task"):
        cli_train.main(["curvature", "--model", str(tmp_path / "m"), "--tasks", "colr", "--out", str(out)])
