"""evaluate.py on task sets, end to end: detection (mAP against pycocotools, box scores from the <loc>
tokens' probabilities, --predictions' boxes at 1.0 in file order or at the scores predictions.jsonl
saved, --draw), questions and OCR by hand, segmentation (mIoU by hand, --vae required, masks drawn),
per-row prompts (caption rows of one image each scored, --predictions matched by prompt), --compare
and --resume.

The tiny model is random, so it is made to write known answers: its logits are edited at each step so
that the next token of each example's script wins by a margin that varies with the example and step
(so the box scores differ). Everything after the edit is the real code: generate, the cache, the
probabilities, the decoding, the parsing and the scoring."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from paligemma.captioning.data import Example
from paligemma.tasks import detection_text, parse_detections
from paligemma.tasks.boxes import PALETTE
from tests.tasks.vae_files import blocky_vae

PREFIXES = ("detect building ; plane ; tank", "detect plane")  # two prompts of different lengths, mixed in batches


def read_jsonl(path):
    return [json.loads(l) for l in open(path)]


def examples_of(path) -> list[Example]:
    """Rows {"image", "prefix", "suffix", "split"} as Examples (what data.py makes of them)."""
    folder = Path(path).parent
    return [Example(folder / "images" / r["image"], [r["suffix"]] if isinstance(r["suffix"], str) else r["suffix"],
                    r["split"], r.get("prefix")) for r in read_jsonl(path)]


def write_rows(folder: Path, rows: list[dict], name: str = "rows.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def rows_loader(monkeypatch):
    """evaluate.py reads the prefix/suffix rows with data.py where data.py knows the layout (the tasks
    branch, checked: the same Examples), else through examples_of."""
    from paligemma.captioning.data import DataError, Skipped
    real = evaluate.load_examples

    def load(data, split, skip_bad=False):
        try:
            examples, skipped = real(data, split, skip_bad=skip_bad)
        except DataError:
            examples = None
        if examples is not None and (Path(data).suffix != ".jsonl" or any(e.prefix for e in examples)):
            return examples, skipped
        return [e for e in examples_of(data) if split is None or e.split == split], Skipped()
    monkeypatch.setattr(evaluate, "load_examples", load)


@pytest.fixture(scope="module")
def detection_set(tmp_path_factory):
    """Seven 64 px scenes with 1-3 objects each, the prefix alternating between two prompts; and a tiny
    model whose tokenizer holds the <loc> tokens."""
    from paligemma.captioning.synthetic import make_checkpoint, make_detection_dataset
    root = tmp_path_factory.mktemp("det")
    data = make_detection_dataset(root / "data", n_train=0, n_val=0, n_test=7, seed=3)
    rows = read_jsonl(data)
    for i, r in enumerate(rows):
        r["prefix"] = PREFIXES[i % 2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_checkpoint(root / "model", ["building plane tank ; boat"] * 20, prompt=" ".join(PREFIXES),
                            vocab_size=300, task_tokens=True)
    return str(model), str(data)


def answers_for(examples) -> list[str]:
    """What the forced model writes: each reference with its first box shifted (IoU from 1 down), an
    object dropped on some images and a false alarm on others."""
    rng = random.Random(0)
    texts = []
    for i, e in enumerate(examples):
        objects = [(d.label, d.box) for d in parse_detections(e.captions[0], 64, 64)]
        x0, y0, x1, y1 = objects[0][1]
        objects[0] = (objects[0][0], (x0 + 2 * (i % 4), y0, x1 + 2 * (i % 4), y1))
        if i % 3 == 1 and len(objects) > 1:
            objects.pop()
        if i % 3 == 2:
            objects.append((rng.choice(["tank", "plane"]), (40.0, 40.0, 60.0, 56.0)))
        texts.append(detection_text(objects, 64, 64))
    return texts


class Forced:
    """Makes a loaded model write `texts[i]` for example i (recognised by its pixels, so batching,
    --resume and --compare do not matter) and records, per example, the logits of every step and the
    prompt it was given."""

    def __init__(self, model, processor, examples, texts):
        tok = processor.tokenizer
        self.scripts = [tok.encode(t) + [tok.eos_id] for t in texts]
        self.pixels = processor.pixel_values([e.image for e in examples])  # (N, 3, S, S)
        self.pad, self.logits, self.prompts, self.rows, self.step = tok.pad_id, {}, {}, [], 0
        head, generate = model.language_model.logits, model.generate

        def forced_generate(**inputs):
            self.rows = [next(i for i, p in enumerate(self.pixels) if torch.equal(p, row))
                         for row in inputs["pixel_values"]]
            for b, i in enumerate(self.rows):
                keep = inputs["attention_mask"][b].bool()
                self.prompts[i] = processor.decode(inputs["input_ids"][b, keep].tolist())
                self.logits[i] = []
            self.step = 0
            return generate(**inputs)

        def forced_head(h):  # (B, D) -> (B, V)
            out = head(h).clone()
            for b, i in enumerate(self.rows):
                script = self.scripts[i]
                target = script[self.step] if self.step < len(script) else self.pad
                out[b, target] = out[b].max() + 0.5 + (7 * i + 3 * self.step) % 10 / 4  # wins by 0.5 .. 2.75
                self.logits[i].append(out[b].clone())
            self.step += 1
            return out

        model.generate, model.language_model.logits = forced_generate, forced_head

    def box_scores(self, i, tokenizer) -> list[float]:
        """By hand: the softmax of each recorded step at the scripted token, averaged over each box's four <loc>."""
        probs = [torch.softmax(l.float(), -1)[t].item() for l, t in zip(self.logits[i], self.scripts[i])]
        loc = [p for p, t in zip(probs, self.scripts[i]) if tokenizer.sp.id_to_piece(t).startswith("<loc")]
        return [sum(loc[k:k + 4]) / 4 for k in range(0, len(loc), 4)]


@pytest.fixture
def forced(monkeypatch, rows_loader, detection_set):
    """evaluate.py's models write answers_for(the test split); forced.made: the Forced of each model loaded."""
    load = evaluate.load_for_inference
    examples = examples_of(detection_set[1])
    made = []

    def loader(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        made.append(Forced(model, processor, examples, answers_for(examples)))
        return model, processor
    monkeypatch.setattr(evaluate, "load_for_inference", loader)
    return made


def run(model, data, out, *extra):
    return evaluate.main(["--model", model, "--data", data, "--out", str(out), "--split", "test",
                          "--batch-size", "3", "--max-new-tokens", "40", *extra])


def test_detection_scored_like_pycocotools_with_loc_token_box_scores(detection_set, forced, tmp_path, capsys):
    """mAP@0.5, mAP and per-class APs in metrics.json equal pycocotools on the boxes and scores of
    predictions.jsonl; each box's score is the mean probability of its four <loc> tokens computed by
    hand from the model's logits; each row's own prefix reached the model (batches mix two prompts);
    --draw writes each image with its boxes; the 95 % intervals in metrics.json and the table are
    those of average_precision recomputed on each resampled image list (the captions' draws)."""
    from tests.tasks.test_average_precision import coco_reference  # skips without pycocotools
    model, data = detection_set
    examples = examples_of(data)
    result = run(model, data, tmp_path / "e", "--draw", str(tmp_path / "pics"))
    (name, scores), = result.items()
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved[name] == scores and saved["protocol"]["task"] == "detect"
    rows = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    from paligemma.processor import Processor
    f = forced[0]
    tok = Processor.from_pretrained(model).tokenizer
    preds, refs = [], []
    for i, (r, e) in enumerate(zip(rows, examples)):
        assert r["prediction"] == answers_for(examples)[i] and r["prompt"] == e.prefix
        assert f.prompts[i].endswith(e.prefix + "\n")  # what the model was given
        assert [b["score"] for b in r["boxes"]] == pytest.approx(f.box_scores(i, tok), abs=1e-6)
        preds.append([(b["label"], tuple(b["box"]), b["score"]) for b in r["boxes"]])
        refs.append([(d.label, d.box) for d in parse_detections(e.captions[0], 64, 64)])
    assert len({p[2] for ps in preds for p in ps}) > 5  # scores differ: the ranking matters
    labels = sorted({l for rs in refs for l, _ in rs})
    ap50, ap, per_class = coco_reference(preds, refs, labels)
    assert 0.1 < scores["mAP@0.5"] < 0.99 and scores["mAP"] < scores["mAP@0.5"]
    assert scores["mAP@0.5"] == pytest.approx(ap50, abs=1e-6) and scores["mAP"] == pytest.approx(ap, abs=1e-6)
    for label, (c50, c) in per_class.items():
        assert scores["per_class"][label]["AP@0.5"] == pytest.approx(c50, abs=1e-6)
        assert scores["per_class"][label]["AP"] == pytest.approx(c, abs=1e-6)
    from paligemma.captioning.bootstrap import resample_draws
    from paligemma.tasks import average_precision
    lists = np.sort(resample_draws(7, 1000, 0))  # each resample's images in file order
    again = [average_precision([preds[i] for i in d], [refs[i] for i in d]) for d in lists]
    for k in ("mAP@0.5", "mAP"):
        want = np.percentile([a[k] for a in again], [2.5, 97.5])
        assert saved[name]["ci95"][k] == pytest.approx(list(want), abs=1e-9)
    assert set(saved[name]["ci95"]) == {"mAP@0.5", "mAP"} and saved["protocol"]["ci95"].startswith("percentile")
    lo, hi = saved[name]["ci95"]["mAP@0.5"]
    assert f"{scores['mAP@0.5']:.4f} [{lo:.4f}, {hi:.4f}]" in capsys.readouterr().out and lo < hi
    # --draw: every image, enlarged 4x (64 -> 256 px), a predicted box's edge in its label's colour
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == sorted(e.image.stem + ".png" for e in examples)
    label, (x0, y0, x1, y1), _ = preds[0][0]
    pic = np.asarray(Image.open(tmp_path / "pics" / f"{examples[0].image.stem}.png"))
    assert pic.shape == (256, 256, 3)
    from zlib import crc32
    colour = PALETTE[crc32(label.encode()) % len(PALETTE)]
    y = int((y0 + y1) / 2 * 4)
    near = pic[y - 1:y + 2, max(int(x0 * 4) - 1, 0):int(x0 * 4) + 2].reshape(-1, 3)
    assert any(tuple(p) == colour for p in near)
    # and the reference boxes in white: image 1's first answer is shifted 2 px right of its reference
    _, (x0, y0, x1, y1) = refs[1][0]
    pic = np.asarray(Image.open(tmp_path / "pics" / f"{examples[1].image.stem}.png"))
    y = int((y0 + y1) / 2 * 4)
    near = pic[y - 1:y + 2, max(int(x0 * 4) - 1, 0):int(x0 * 4) + 2].reshape(-1, 3)
    assert any(tuple(p) == (255, 255, 255) for p in near)


def test_compare_and_resume_on_a_detection_set(detection_set, forced, tmp_path, monkeypatch):
    """--compare scores both rows by mAP (pictures in one folder per row); a run killed after its first
    batch resumes (--resume) to the metrics and boxes of an uninterrupted run."""
    model, data = detection_set
    whole = run(model, data, tmp_path / "whole")
    both = run(model, data, tmp_path / "cmp", "--compare", "base", "--draw", str(tmp_path / "pics"))
    assert [r["mAP@0.5"] for r in both.values()] == [next(iter(whole.values()))["mAP@0.5"]] * 2
    a, b = both.values()  # the same answers: B - A is exactly 0 on every resample
    assert "paired" not in a and b["paired"]["against"] == next(iter(both))
    paired = {k: v["ci95"] for k, v in b["paired"].items() if k != "against"}
    assert paired == {"mAP@0.5": [0.0, 0.0], "mAP": [0.0, 0.0]}
    assert json.loads((tmp_path / "cmp" / "metrics.json").read_text())[next(iter(reversed(both)))] == b
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["A", "B"]

    append = evaluate.store.append
    calls = []

    def dies_after_one_batch(out, rows):
        append(out, rows)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the process dies after its first batch was logged
    monkeypatch.setattr(evaluate.store, "append", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run(model, data, tmp_path / "cut")
    assert len(read_jsonl(tmp_path / "cut" / ".partial" / "captions.jsonl")) == 3
    resumed = run(model, data, tmp_path / "cut", "--resume")
    assert resumed == whole
    cut, uncut = (read_jsonl(tmp_path / f / "predictions.jsonl") for f in ("cut", "whole"))
    scores = lambda rows: [b.pop("score") for r in rows for b in r["boxes"]]
    # the same scores to float noise (measured 1e-7 relative: the CPU's packed layers start after a few
    # calls, so the rows of the second batch of a run go through other kernels than those of its first)
    assert scores(cut) == pytest.approx(scores(uncut), rel=1e-5) and cut == uncut


def test_own_predictions_rescored_keep_their_box_scores(detection_set, forced, tmp_path):
    """evaluate.py's predictions.jsonl scored again through --predictions: its boxes keep the scores saved
    with them (not 1.0 each), so mAP, the per-class APs and the intervals are the run's own; a file whose
    saved boxes do not fit its prediction is named by line."""
    model, data = detection_set
    (name, made), = run(model, data, tmp_path / "e").items()
    saved = tmp_path / "e" / "predictions.jsonl"
    (scores,) = evaluate.main(["--predictions", str(saved), "--data", data, "--split", "test",
                               "--out", str(tmp_path / "again")]).values()
    assert made["mAP@0.5"] != pytest.approx(score_file(data, str(tmp_path / "e" / "predictions.csv"), tmp_path / "csv",
                                                       "--split", "test")["mAP@0.5"])  # the CSV saves no scores
    for k in ("mAP@0.5", "mAP", "ci95"):
        assert scores[k] == pytest.approx(made[k], abs=1e-12), k
    assert scores["per_class"] == made["per_class"]
    rows = read_jsonl(saved)
    boxes = lambda rs: [b["score"] for r in rs for b in r["boxes"]]
    assert boxes(read_jsonl(tmp_path / "again" / "predictions.jsonl")) == pytest.approx(boxes(rows), abs=1e-12)
    rows[2]["boxes"] = rows[2]["boxes"][1:]
    write_rows(tmp_path, rows, "short.jsonl")
    from paligemma.captioning.data import DataError
    with pytest.raises(DataError, match=rf"short\.jsonl:3: 'boxes' does not give the score of each box of its "
                                        rf"prediction: {len(rows[2]['boxes'])} box scores for the"):
        score_file(data, str(tmp_path / "short.jsonl"), tmp_path / "f", "--split", "test")


def test_predictions_file_boxes_score_one_ties_in_file_order(tmp_path, rows_loader):
    """Boxes read from --predictions all score 1.0; equal scores keep the order they were written in, as
    pycocotools' stable sort does: a false alarm written before the hit halves AP@0.5 (precision 1/2 at
    recall 1), written after it costs nothing. Both orders equal pycocotools."""
    from tests.tasks.test_average_precision import coco_reference
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 32), (90, 140, 60)).save(tmp_path / "images" / "a.png")
    hit, miss = ("plane", (8.0, 4.0, 24.0, 20.0)), ("plane", (40.0, 4.0, 60.0, 28.0))
    data = write_rows(tmp_path, [dict(image="a.png", prefix="detect plane", suffix=detection_text([hit], 64, 32),
                                      split="test")])
    for order, expected in (([miss, hit], 0.5), ([hit, miss], 1.0)):
        preds = tmp_path / "p.jsonl"
        preds.write_text(json.dumps({"image": "a.png", "prediction": detection_text(order, 64, 32)}) + "\n")
        out = tmp_path / f"e{expected}"
        (scores,) = evaluate.main(["--predictions", str(preds), "--data", str(data), "--out", str(out)]).values()
        (row,) = read_jsonl(out / "predictions.jsonl")
        assert [b["score"] for b in row["boxes"]] == [1.0, 1.0]
        boxes = [(b["label"], tuple(b["box"]), b["score"]) for b in row["boxes"]]
        reference = [(d.label, d.box) for d in parse_detections(detection_text([hit], 64, 32), 64, 32)]
        ap50, ap, _ = coco_reference([boxes], [reference], ["plane"])
        assert scores["mAP@0.5"] == pytest.approx(expected, abs=1e-6) == pytest.approx(ap50, abs=1e-6)
        assert scores["mAP"] == pytest.approx(ap, abs=1e-6)


def answer_set(tmp_path, prefix, pairs, size=16):
    """Rows of one prefix with (references, prediction) pairs, images size x size; -> (data, predictions) paths."""
    (tmp_path / "images").mkdir(exist_ok=True)
    rows, preds = [], []
    for i, (refs, pred) in enumerate(pairs):
        Image.new("RGB", (size, size), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        rows.append(dict(image=f"{i}.png", prefix=prefix, suffix=refs, split="test"))
        preds.append(json.dumps({"image": f"{i}.png", "prediction": pred}) + "\n")
    (tmp_path / "p.jsonl").write_text("".join(preds))
    return str(write_rows(tmp_path, rows)), str(tmp_path / "p.jsonl")


def score_file(data, preds, out, *extra):
    (scores,) = evaluate.main(["--predictions", preds, "--data", data, "--out", str(out), *extra]).values()
    return scores


def test_questions_scored_by_vqa_accuracy_and_exact_match(tmp_path, rows_loader):
    """By hand. Question 1: the references disagree, so all are normalised: "two" -> "2" matches three
    of the four; leaving each reference out in turn gives 2/3, 2/3, 2/3 and min(1, 3/3): VQA accuracy
    3/4; exact match 1 ("two" is one of them). Question 2: "yes" against "no": 0 and 0."""
    data, preds = answer_set(tmp_path, "answer en how many planes?", [(["2", "two", "2", "3"], "two"),
                                                                      (["no"], "yes")])
    scores = score_file(data, preds, tmp_path / "e")
    assert scores["VQA accuracy"] == pytest.approx((3 / 4 + 0) / 2) and scores["exact match"] == 0.5
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["protocol"]["task"] == "answer"
    assert score_file(data, preds, tmp_path / "x", "--metric", "exact", "--bootstrap", "0") == {"exact match": 0.5}


def test_ocr_scored_by_anls_and_cer(tmp_path, rows_loader):
    """By hand: "HELL0" for "HELLO" is one edit in five characters: similarity 0.8; "abc" for "xyz12" is
    five edits in five: distance 1 >= 0.5, similarity 0. ANLS 0.4; CER (1 + 5) / (5 + 5) = 0.6."""
    data, preds = answer_set(tmp_path, "ocr", [(["HELLO"], "HELL0"), (["xyz12"], "abc")])
    scores = score_file(data, preds, tmp_path / "e")
    assert scores["ANLS"] == pytest.approx(0.4) and scores["CER"] == pytest.approx(0.6) and scores["exact match"] == 0


def test_mixed_tasks_and_bad_flags_are_named(tmp_path, rows_loader):
    data, preds = answer_set(tmp_path, "ocr", [(["HELLO"], "HELL0")])
    rows = read_jsonl(data) + [dict(image="0.png", prefix="answer en what?", suffix="x", split="test")]
    mixed = write_rows(tmp_path, rows, "mixed.jsonl")
    with pytest.raises(ValueError, match=r"mixes tasks: ocr \(e\.g\. .*0\.png: 'ocr'\), answer"):
        score_file(str(mixed), preds, tmp_path / "m")
    with pytest.raises(ValueError, match="--draw draws boxes and masks: .* is a ocr set"):
        score_file(data, preds, tmp_path / "d", "--draw", str(tmp_path / "pics"))
    (tmp_path / "seg").mkdir()
    data, preds = segment_set(tmp_path / "seg")
    vae = str(blocky_vae(tmp_path / "blocky.npz"))
    with pytest.raises(ValueError, match="--draw .*images: the split's images are in this folder"):
        score_file(data, preds, tmp_path / "s", "--vae", vae, "--draw", str(tmp_path / "seg" / "images"))
    assert sorted(p.name for p in (tmp_path / "seg" / "images").iterdir()) == ["0.png", "1.png"]  # untouched


FULL = "".join("<seg001>" for _ in range(16))  # tests/tasks/vae_files.blocky_vae paints every block: the whole box
TOP = "".join(f"<seg00{int(i < 8)}>" for i in range(16))  # grid rows 0 and 1: the top half of the box


def loc(*t):
    return "".join(f"<loc{v:04d}>" for v in t)


def segment_set(tmp_path):
    """Two 64 x 64 images whose reference is the whole image. Image 0's answer covers the top half
    (mask IoU 1/2, box IoU 1); image 1's is the left half's box, filled (columns 0..31 of 64: mask IoU
    1/2; box IoU 512/1023 = 0.5005, a hit at 0.5, not at 0.75). mIoU 1/2, boxacc 1 and 1/2."""
    whole = loc(0, 0, 1023, 1023) + FULL + " cat"
    return answer_set(tmp_path, "segment cat", [([whole], loc(0, 0, 1023, 1023) + TOP + " cat"),
                                                ([whole], loc(0, 0, 1023, 512) + FULL + " cat")], size=64)


def test_segmentation_miou_by_hand_and_masks_drawn(tmp_path, rows_loader):
    data, preds = segment_set(tmp_path)
    vae = blocky_vae(tmp_path / "blocky.npz")
    scores = score_file(data, preds, tmp_path / "e", "--vae", str(vae), "--draw", str(tmp_path / "pics"))
    assert scores["miou"] == pytest.approx(0.5) and scores["boxacc/0.5"] == 1.0 and scores["boxacc/0.75"] == 0.5
    assert scores["invalid"] == 0 and scores["dropped"] == 0
    rows = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    assert [s["pixels"] for r in rows for s in r["segments"]] == [64 * 32, 32 * 64]
    # the overlay: image 0 enlarged 4x, its mask (the top half) tinted with the first colour at alpha 0.45
    pic = np.asarray(Image.open(tmp_path / "pics" / "0.png")).astype(float)
    tint = 0.55 * np.array((0, 0, 0)) + 0.45 * np.array(PALETTE[0])
    assert np.abs(pic[40, 100] - tint).max() <= 1 and np.abs(pic[200, 100]).max() == 0  # inside / outside the mask


def test_segmentation_without_vae_is_a_clear_error(tmp_path, rows_loader):
    """Before any model is loaded (this one does not even exist)."""
    data, preds = segment_set(tmp_path)
    with pytest.raises(ValueError, match=r"segmentation set .*'segment cat'.* needs --vae PATH: .*vae-oid\.npz"):
        evaluate.main(["--model", str(tmp_path / "no-model"), "--data", data, "--out", str(tmp_path / "e")])
    with pytest.raises(ValueError, match="needs --vae PATH"):
        score_file(data, preds, tmp_path / "f")


LEFT = "".join(f"<seg00{int(i % 4 < 2)}>" for i in range(16))  # grid columns 0 and 1: the left half of the box


def test_segmentation_against_mask_files_by_hand(tmp_path):
    """Rows with mask files are scored against the files at the image's size (64 x 64), not a decoded answer.
    Image 0: a rectangle x 8..40, y 16..48 (1024 px; tight box); the answer is the whole image's top half,
    rows 0..31 (2048 px): 16 x 32 = 512 in common, IoU 512 / (1024 + 2048 - 512) = 0.2; box IoU 1024 / 4096
    = 0.25, no hit. Image 1: an L, columns 0..15 plus rows 48..63 (1024 + 768 = 1792 px), its box given as
    [0, 0, 32, 64]; the answer is the left half, columns 0..31 (2048 px): 1024 + 16 x 16 = 1280 in common,
    IoU 1280 / (1792 + 2048 - 1280) = 0.5; box IoU 2048 / 4096 = 0.5, a hit at 0.5 only (the L's tight box,
    the whole image, would hit at 0.75 too). mIoU 0.35, boxacc 1/2 and 0."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rect, ell = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    rect[16:48, 8:40] = 255
    ell[:, :16] = ell[48:] = 1  # 0 / 1 masks work as 0 / 255 do
    for i, m in enumerate((rect, ell)):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(m).save(tmp_path / "masks" / f"{i}.png")
    rows = [dict(image="0.png", prefix="segment shape", masks=[dict(mask="masks/0.png", label="shape")], split="test"),
            dict(image="1.png", prefix="segment shape", masks=[dict(mask="masks/1.png", label="shape",
                                                                    box=[0, 0, 32, 64])], split="test")]
    data = write_rows(tmp_path, rows)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(dict(image=f"{i}.png", prediction=loc(0, 0, 1023, 1023) + codes + " shape")) + "\n"
                             for i, codes in enumerate((TOP, LEFT))))
    vae = blocky_vae(tmp_path / "blocky.npz")
    scores = score_file(str(data), str(preds), tmp_path / "e", "--vae", str(vae))
    assert scores["miou"] == pytest.approx((0.2 + 0.5) / 2) and scores["boxacc/0.5"] == 0.5 and scores["boxacc/0.75"] == 0
    got = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    assert [r["references"] for r in got] == [["masks/0.png shape"], ["masks/1.png shape"]]
    with pytest.raises(ValueError, match="rows with mask files are segmentation references: .*not captions"):
        score_file(str(data), str(preds), tmp_path / "m", "--vae", str(vae), "--metric", "captions")


def test_batches_mixing_prompts_answer_as_one_at_a_time(detection_set, tmp_path, monkeypatch, rows_loader):
    """Rows of different prompts (three lengths) share batches of 4: the logits each row's answer starts
    from equal those of an uncached forward over that image and prompt alone (left padding done right;
    no forcing here: a random tiny model's text repeats its prompt's last token, so texts would not tell)."""
    from paligemma import PaliGemma
    from paligemma.processor import Processor
    model, data = detection_set
    examples = examples_of(data)
    questions = ["answer en how many planes are there?", "answer en what?",
                 "answer en is there a tank near the building?"]
    rows = [dict(image=e.image.name, prefix=questions[i % 3], suffix=["two"], split="test")
            for i, e in enumerate(examples)]
    qa = write_rows(Path(data).parent, rows, "questions.jsonl")
    first = []  # (pixels, logits) of each batch's first step
    load = evaluate.load_for_inference

    def recording(*args, **kwargs):
        m, proc = load(*args, **kwargs)
        generate, head = m.generate, m.language_model.logits
        state = {}

        def generate_(**inputs):
            state["pixels"] = inputs["pixel_values"]
            return generate(**inputs)

        def head_(h):
            out = head(h)
            if "pixels" in state:
                first.append((state.pop("pixels"), out.clone()))
            return out
        m.generate, m.language_model.logits = generate_, head_
        return m, proc
    monkeypatch.setattr(evaluate, "load_for_inference", recording)
    evaluate.main(["--model", model, "--data", str(qa), "--out", str(tmp_path / "e"), "--batch-size", "4",
                   "--max-new-tokens", "3"])
    assert [len(p) for p, _ in first] == [4, 3]
    got = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    assert [r["prompt"] for r in got] == [q["prefix"] for q in rows]
    batched = torch.cat([l for _, l in first])  # (7, V), in the split's order
    m, proc = PaliGemma.from_pretrained(model).eval(), Processor.from_pretrained(model)
    for i, (e, q) in enumerate(zip(examples, rows)):
        with torch.no_grad():
            alone = m(**proc([e.image], q["prefix"]))[0, -1]
        torch.testing.assert_close(batched[i], alone, atol=1e-4, rtol=1e-4)


def test_a_prompt_of_ones_own_is_still_a_caption_set(tiny_run, tmp_path, capsys, rows_loader):
    """A caption set evaluated under a --prompt whose first word names no task is scored as captions,
    as before tasks existed (said on stderr); a row's own prefix that names no task is an error."""
    model, data = tiny_run
    examples, _ = evaluate.load_examples(data, "test")
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"image": e.image.name, "prediction": e.captions[1]}) + "\n" for e in examples))
    (scores,) = evaluate.main(["--predictions", str(preds), "--data", data, "--out", str(tmp_path / "e"),
                               "--prompt", "rsicd caption"]).values()
    assert scores["CIDEr-D"] > 0.5 and "scored as captions" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"0\.png: prefix 'rsicd caption': cannot tell the task"):
        score_file(*answer_set(tmp_path, "rsicd caption", [(["a"], "a")]), tmp_path / "f")


QG_ROWS = [("a.png", "caption en", "a red roof", "a red roof"),  # image, prefix, reference, prediction
           ("a.png", "question en roof", "what is red", "zzz qqq"),
           ("b.png", "caption en", "a green field", "a green field")]


def question_generation_set(tmp_path) -> Path:
    """Image a.png with two rows (a caption and a question to generate), b.png with one: caption-type rows
    where an image repeats. By hand, BLEU-1 over the three rows: 3 + 0 + 3 clipped word matches in 3 + 2 + 3
    predicted words, references 3 + 3 + 3 words long: 6/8 x exp(1 - 9/8) (the brevity penalty) = 0.6619;
    keyed by image alone (a's last row only) it would be 3/5 x exp(1 - 6/5) = 0.4912."""
    (tmp_path / "images").mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.new("RGB", (16, 16), (i * 90, 40, 0)).save(tmp_path / "images" / name)
    return write_rows(tmp_path, [dict(image=i, prefix=p, suffix=r, split="test") for i, p, r, _ in QG_ROWS])


QG_BLEU1 = 6 / 8 * np.exp(1 - 9 / 8)


def test_caption_rows_sharing_an_image_are_each_scored(tmp_path):
    """Predictions and references are keyed per row (validation.row_keys), so every row counts, and changing
    the first row's prediction changes the score."""
    import argparse
    from paligemma.captioning.data import load_examples
    from paligemma.captioning.scorer import Scorer
    examples, _ = load_examples(question_generation_set(tmp_path), "test")
    args = argparse.Namespace(task="caption", references="all", prompt="caption en")
    preds = [p for *_, p in QG_ROWS]
    with Scorer(None, 0) as scorer:
        result, rows = evaluate.score(examples, preds, args, scorer, "p")
        worse, _ = evaluate.score(examples, ["zzz"] + preds[1:], args, scorer, "q")
    assert result["BLEU-1"] == pytest.approx(QG_BLEU1, abs=1e-6)
    assert worse["BLEU-1"] == pytest.approx(3 / 6 * np.exp(1 - 9 / 6), abs=1e-6)  # 0 + 0 + 3 matches in 1 + 2 + 3
    assert [r["prediction"] for r in rows] == preds


def test_predictions_of_several_questions_on_one_image_match_by_prompt(tmp_path):
    """Where the split has an image under several prefixes, --predictions rows match on (file name, prompt):
    evaluate.py's own predictions.jsonl and .csv score again to the same numbers (and in any order); a row
    without its prompt there is refused by file:line and field."""
    data = str(question_generation_set(tmp_path))
    preds = tmp_path / "p.jsonl"
    lines = [dict(image=f"/elsewhere/{i}", prompt=p, prediction=q) for i, p, _, q in QG_ROWS]
    preds.write_text("".join(json.dumps(r) + "\n" for r in reversed(lines)))
    first = score_file(data, str(preds), tmp_path / "e", "--bootstrap", "0", "--meteor", "nltk")
    assert first["BLEU-1"] == pytest.approx(QG_BLEU1, abs=1e-6)
    for own in ("predictions.jsonl", "predictions.csv"):
        again = score_file(data, str(tmp_path / "e" / own), tmp_path / own, "--bootstrap", "0", "--meteor", "nltk")
        assert again == first, own
    preds.write_text("".join(json.dumps(r) + "\n" for r in lines[:1]) + json.dumps(dict(image="a.png", prediction="x"))
                     + "\n")
    from paligemma.captioning.data import DataError
    with pytest.raises(DataError, match=r"p\.jsonl:2: no 'prompt' field: the split has images under several "
                                        r"prompts \(a\.png\)"):
        score_file(data, str(preds), tmp_path / "f")
    preds.write_text("".join(json.dumps(r) + "\n" for r in lines + lines[1:2]))
    with pytest.raises(DataError, match=r"p\.jsonl:4: a second prediction for a\.png, prompt 'question en roof' "
                                        r"\(the first is on line 2\)"):
        score_file(data, str(preds), tmp_path / "g")


def test_a_reference_box_off_the_loc_grid_is_refused(tmp_path, rows_loader):
    """<loc1024> is no token: a reference holding it is named, not scored as a box past the image's edge."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 32), (90, 140, 60)).save(tmp_path / "images" / "a.png")
    data = write_rows(tmp_path, [dict(image="a.png", prefix="detect plane", split="test",
                                      suffix="<loc0010><loc0020><loc0300><loc1024> plane")])
    (tmp_path / "p.jsonl").write_text(json.dumps(dict(image="a.png", prediction="<loc0010><loc0020><loc0300>"
                                                                                "<loc1023> plane")) + "\n")
    with pytest.raises(ValueError, match=r"a\.png: 1 malformed piece\(s\) in the reference"):
        score_file(str(data), str(tmp_path / "p.jsonl"), tmp_path / "e")


def test_image_with_no_object_counts_its_boxes_as_false_alarms(detection_set, forced, tmp_path):
    """A detect row with an empty suffix (none of the asked objects on its image) loads through data.py
    and has no reference box: every box predicted there is a false alarm, scored as pycocotools scores
    an image without annotations; the row keeps its empty reference in predictions.jsonl."""
    from tests.tasks.test_average_precision import coco_reference  # skips without pycocotools
    model, data = detection_set
    rows = read_jsonl(data)
    rows[2]["suffix"] = ""  # the forced model still writes image 2's objects (and a false alarm)
    rows[5]["suffix"] = ""
    emptied = write_rows(Path(data).parent, rows, "emptied.jsonl")
    from paligemma.captioning.data import load_examples  # what evaluate.py reads it with (rows_loader falls back)
    assert [e.captions for e in load_examples(emptied, "test")[0]][2::3] == [[""], [""]]
    (scores,) = run(model, str(emptied), tmp_path / "e").values()
    saved = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    assert [r["references"] for r in saved[2::3]] == [[""], [""]] and saved[2]["boxes"] and saved[5]["boxes"]
    preds = [[(b["label"], tuple(b["box"]), b["score"]) for b in r["boxes"]] for r in saved]
    refs = [[(d.label, d.box) for d in parse_detections(r["suffix"], 64, 64)] for r in rows if r["split"] == "test"]
    assert refs[2] == [] == refs[5]
    ap50, ap, per_class = coco_reference(preds, refs, sorted({l for rs in refs for l, _ in rs}))
    assert scores["mAP@0.5"] == pytest.approx(ap50, abs=1e-6) and scores["mAP"] == pytest.approx(ap, abs=1e-6)
    for label, (c50, c) in per_class.items():
        assert scores["per_class"][label]["AP@0.5"] == pytest.approx(c50, abs=1e-6)
    # the false alarms cost: the same answers scored without images 2 and 5's boxes predicted
    kept = [p if i not in (2, 5) else [] for i, p in enumerate(preds)]
    assert coco_reference(kept, refs, sorted(per_class))[0] > scores["mAP@0.5"]
