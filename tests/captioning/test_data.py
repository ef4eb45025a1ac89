"""paligemma/captioning/data.py: bad rows named by file and line, or skipped and counted; rows that
would change what is measured (no split column, the same image twice, paths outside the image
folder) refused whatever --skip-bad says."""
import random
import re

import pytest
from PIL import Image

from paligemma.captioning.data import DataError, Example, load_examples, sample_caption


def test_caption_sampling():
    e = Example(image=None, captions=["a", "b", "c", "d", "e"])
    rng = random.Random(0)
    assert {sample_caption(e, rng) for _ in range(200)} == set("abcde")
    assert {sample_caption(e, rng, first_only=True) for _ in range(20)} == {"a"}


def write_csv(folder, rows, header="source,split,image,caption_1,caption_2"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "captions.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return folder / "captions.csv"


@pytest.fixture
def images(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "ok2.png")
    return tmp_path / "images"


def test_bad_data(tmp_path, images):
    (images / "corrupt.png").write_bytes(b"junk")
    path = write_csv(tmp_path, ["x,train,ok.png,a field,a lake", "x,train,missing.png,a,b",
                                "x,train,corrupt.png,a,b", "x,train,ok2.png,a field,"])
    with pytest.raises(DataError, match=r"captions.csv:3: image file .*missing.png not found"):
        load_examples(path, "train")
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert len(examples) == 1 and len(skipped.reasons) == 3
    assert "corrupt" in skipped.report() and "empty caption(s) [2]" in skipped.report()
    with pytest.raises(DataError, match="no examples in split 'test'"):
        load_examples(path, "test")
    (tmp_path / "nocap.csv").write_text("image,text\nok.png,a\n")
    with pytest.raises(DataError, match="no caption column"):
        load_examples(tmp_path / "nocap.csv")


def test_truncated_jpeg_is_caught_when_checked(tmp_path, images):
    """PIL's verify() passes a JPEG cut in half; decoding it fails. The check decodes."""
    import numpy as np
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / "cut.jpg")
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[:len(data) // 2])
    with Image.open(images / "cut.jpg") as im:
        im.verify()  # the old check: passes
    path = write_csv(tmp_path, ["x,train,ok.png,a,b", "x,train,cut.jpg,a,b"])
    with pytest.raises(DataError, match=r"captions.csv:3: image file .*cut.jpg is corrupt"):
        load_examples(path, "train")
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert [e.image.name for e in examples] == ["ok.png"] and "cut.jpg" in skipped.report()


def test_no_split_column_is_refused(tmp_path, images):
    path = write_csv(tmp_path, ["ok.png,a,b", "ok2.png,c,d"], header="image,caption_1,caption_2")
    with pytest.raises(DataError, match=r"captions.csv: no 'split' column, so there is no split 'val'"):
        load_examples(path, "val")
    assert len(load_examples(path)[0]) == 2  # every row, when no split is asked for


def test_same_image_twice_in_a_split_names_both_lines(tmp_path, images):
    path = write_csv(tmp_path, ["x,test,ok.png,a,b", "x,test,ok2.png,c,d", "x,test,ok.png,e,f"])
    with pytest.raises(DataError, match=r"captions.csv:4: image 'ok.png' is also on line 2"):
        load_examples(path, "test", skip_bad=True)


@pytest.mark.parametrize("name", ["../captions.csv", "../../../etc/passwd", "/etc/passwd", "sub/../../x.png"])
def test_paths_leaving_the_image_folder_are_refused_unopened(tmp_path, images, monkeypatch, name):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    path = write_csv(tmp_path, ["x,train,ok.png,a,b", f"x,train,{name},a,b"])
    with pytest.raises(DataError, match=rf"captions.csv:3: image path '{name}' leaves the image folder"):
        load_examples(path, "train")
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert len(examples) == 1 and len(skipped.reasons) == 1
    assert not [p for p in opened if "passwd" in p or p.endswith("captions.csv")]


def test_non_utf8_csv_names_the_line(tmp_path, images):
    path = tmp_path / "captions.csv"
    path.write_bytes("split,image,caption_1\ntrain,ok.png,a field\ntrain,ok2.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"captions.csv:3: not UTF-8 \(byte 0xe9"):
        load_examples(path, "train")


def test_jsonl_rows_must_be_objects(tmp_path, images):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"split": "train", "image": "ok.png", "captions": ["a"]}\n["ok2.png", "b"]\n')
    with pytest.raises(DataError, match=r"captions.jsonl:2: expected a JSON object"):
        load_examples(path, "train")


# --- issue #27: decoding errors of every kind skipped and counted; duplicate columns; split spaces ---

def test_every_decoding_error_is_a_data_error_naming_file_and_line(tmp_path, images):
    from tests.helpers import bad_images
    bad = bad_images(images)
    path = write_csv(tmp_path, ["x,train,ok.png,a,b"] + [f"x,train,{p.name},a,b" for p in bad.values()]
                     + ["x,train,ok2.png,c,d"])
    for p in bad.values():
        rows = ["x,train,ok.png,a,b", f"x,train,{p.name},a,b"]
        with pytest.raises(DataError, match=rf"captions.csv:3: image file .*{p.name} is corrupt"):
            load_examples(write_csv(tmp_path / p.stem, rows), "train", image_dir=images)
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert [e.image.name for e in examples] == ["ok.png", "ok2.png"]
    assert [r.split(":")[1] for r in skipped.reasons] == ["3", "4", "5"]
    assert "decompression bomb" in skipped.reasons[2] and "SyntaxError" in skipped.reasons[1]


def test_duplicate_column_names_are_refused(tmp_path, images):
    path = write_csv(tmp_path, ["x,train,ok.png,a,b"], header="source,split,image,caption_1,caption_1")
    with pytest.raises(DataError, match=r"captions.csv: column 'caption_1' appears 2 times \(columns \[4, 5\]\)"):
        load_examples(path, "train")
    (tmp_path / "c.jsonl").write_text('{"split": "train", "image": "ok.png", "captions": ["a"], "captions": ["b"]}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: key 'captions' appears twice"):
        load_examples(tmp_path / "c.jsonl", "train")


def test_spaces_around_split_values_and_column_names_are_stripped(tmp_path, images):
    """A ' test' row is a test row (decided: strip, not refuse); a ' caption_2' header is a caption column."""
    path = write_csv(tmp_path, ["x, test,ok.png,a,b", "x,test ,ok2.png,c,d", "x,train,ok.png,e,f"],
                     header="source, split,image,caption_1, caption_2")
    test, _ = load_examples(path, "test")
    assert [(e.image.name, e.captions, e.split) for e in test] == [("ok.png", ["a", "b"], "test"),
                                                                    ("ok2.png", ["c", "d"], "test")]
    assert len(load_examples(path, "train")[0]) == 1


# --- issue #28: names that only look like `..`, blank captions, line numbers after quoted newlines ---

@pytest.mark.parametrize("name", ["..ok.png", "a..b.png", "sub/..ok.png", "./ok.png", "sub/../ok.png"])
def test_names_that_stay_inside_the_image_folder_load(tmp_path, images, name):
    """Only a path component that IS `..` leaves the folder: `..ok.png` is an ordinary file name."""
    (images / "sub").mkdir()
    for f in ("..ok.png", "a..b.png", "sub/..ok.png"):
        Image.new("RGB", (8, 8), "blue").save(images / f, format="PNG")
    path = write_csv(tmp_path, [f"x,train,{name},a,b"])
    examples, _ = load_examples(path, "train")
    assert [e.image for e in examples] == [images / name] and examples[0].image.exists()


@pytest.mark.parametrize("name", ["..", "sub/../.."])
def test_a_name_that_is_the_parent_folder_is_refused(tmp_path, images, name):
    path = write_csv(tmp_path, ["x,train,ok.png,a,b", f"x,train,{name},a,b"])
    with pytest.raises(DataError, match=rf"captions.csv:3: image path '{re.escape(name)}' leaves the image folder"):
        load_examples(path, "train")


def test_blank_captions_are_empty_and_others_are_stripped(tmp_path, images):
    """A caption of spaces or tabs is empty (it would train on nothing but EOS); the others lose their
    surrounding blanks (as references they would otherwise count as different tokens)."""
    path = write_csv(tmp_path, ['x,train,ok.png,"  a lake ","\t two planes"', "x,train,ok2.png,a field,\"  \t \""])
    with pytest.raises(DataError, match=r"captions.csv:3: empty caption\(s\) \[2\] for image ok2.png"):
        load_examples(path, "train")
    examples, skipped = load_examples(path, "train", skip_bad=True)
    assert [e.captions for e in examples] == [["a lake", "two planes"]] and len(skipped.reasons) == 1
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"split": "train", "image": "ok.png", "captions": ["a", " "]}\n'
                     '{"split": "train", "image": "ok2.png", "captions": []}\n')
    with pytest.raises(DataError, match=r"every example was bad:\n.*\n.*c.jsonl:1: empty caption\(s\) \[2\] for image "
                                        r"ok.png\n.*c.jsonl:2: empty caption\(s\) all for image ok2.png$"):
        load_examples(jsonl, "train", skip_bad=True, image_dir=images)


def test_lines_are_counted_across_quoted_newlines_and_blank_lines(tmp_path, images):
    """Each error names the line its row starts on. Hand-counted file:
        1 header   2-4 ok.png (a caption over three lines)   5 missing1   6 blank   7-8 missing2 (two lines)
        9 missing3"""
    (tmp_path / "captions.csv").write_text(
        "split,image,caption_1,caption_2\n"
        'train,ok.png,"a lake\nwith\nboats",b\n'
        "train,missing1.png,a,b\n"
        "\n"
        'train,missing2.png,"two\r\nlines",b\n'
        "train,missing3.png,a,b\n")
    examples, skipped = load_examples(tmp_path / "captions.csv", "train", skip_bad=True)
    assert examples[0].captions == ["a lake\nwith\nboats", "b"]
    assert [r.split(": ")[0].rsplit(":", 1)[1] for r in skipped.reasons] == ["5", "7", "9"]


def test_caption_columns_are_read_in_numeric_order(tmp_path, images):
    header = "split,image," + ",".join(f"caption_{i}" for i in (2, 10, 1, 11))
    path = write_csv(tmp_path, ["train,ok.png,two,ten,one,eleven"], header=header)
    assert load_examples(path, "train")[0][0].captions == ["one", "two", "ten", "eleven"]


def test_jsonl_blank_lines_are_skipped_and_captions_must_be_strings(tmp_path, images):
    path = tmp_path / "c.jsonl"
    path.write_text('{"split": "train", "image": "ok.png", "captions": ["a"]}\n   \n'
                    '{"split": "train", "image": "ok2.png", "captions": ["b", 3]}\n')
    with pytest.raises(DataError, match=r"c.jsonl:3: captions must be strings"):
        load_examples(path, "train", image_dir=images)


def write_jsonl(path, rows):
    import json
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


DET = "<loc0000><loc0128><loc0512><loc0640> plane ; <loc0256><loc0256><loc1023><loc1023> tank"


def test_prefix_suffix_rows_load_with_their_prompt_and_references(tmp_path, images):
    """big_vision's layout: a prompt per row, the suffix a string or several references; VQA's several
    questions on one image are rows of their own (one row per image and prefix)."""
    path = write_jsonl(tmp_path / "tasks.jsonl", [
        {"image": "ok.png", "prefix": "detect plane ; tank", "suffix": DET, "split": "train"},
        {"image": "ok.png", "prefix": "answer en how many planes?", "suffix": ["one", " 1 "], "split": "train"},
        {"image": "ok.png", "prefix": "answer en what colour?", "suffix": "red", "split": "train"},
        {"image": "ok2.png", "suffix": "a caption under --prompt", "split": "train"}])
    ex, _ = load_examples(path, "train")
    assert [(e.image.name, e.prefix, e.captions) for e in ex] == [
        ("ok.png", "detect plane ; tank", [DET]), ("ok.png", "answer en how many planes?", ["one", "1"]),
        ("ok.png", "answer en what colour?", ["red"]), ("ok2.png", None, ["a caption under --prompt"])]
    csv = tmp_path / "tasks.csv"
    csv.write_text(f"image,prefix,suffix,suffix_2,split\nok.png,answer en which?,a,b,train\nok2.png,ocr,XY,Z,train\n")
    assert [(e.prefix, e.captions) for e in load_examples(csv, "train")[0]] == [("answer en which?", ["a", "b"]),
                                                                                 ("ocr", ["XY", "Z"])]
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"image": "ok.png", "prefix": "ocr", "suffix": "a", "split": "train"},
                                                   {"image": "ok.png", "prefix": "ocr", "suffix": "b", "split": "train"}])
    with pytest.raises(DataError, match=r"twice.jsonl:2: image 'ok.png' with prefix 'ocr' is also on line 1"):
        load_examples(twice, "train")


def test_detection_image_with_no_object_is_an_empty_answer(tmp_path, images):
    """A detect row whose suffix is empty (or blank, in JSONL or CSV) is an image with none of the asked
    objects: one empty reference, trained on <eos> alone and scored with no reference box. Anywhere else
    an empty suffix is still refused, and so is a detect row mixing an empty reference with boxes."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "ok.png", "prefix": "detect plane ; tank", "suffix": "", "split": "train"},
        {"image": "ok2.png", "prefix": "Detect plane", "suffix": ["  "], "split": "train"},
        {"image": "ok.png", "prefix": "detect ship", "suffix": DET, "split": "train"}])
    assert [(e.prefix, e.captions) for e in load_examples(path, "train")[0]] == [
        ("detect plane ; tank", [""]), ("Detect plane", [""]), ("detect ship", [DET])]
    csv = tmp_path / "d.csv"
    csv.write_text("image,prefix,suffix,split\nok.png,detect plane,,train\n")
    assert [e.captions for e in load_examples(csv, "train")[0]] == [[""]]
    for row, error in (({"image": "ok.png", "prefix": "caption en", "suffix": ""}, r"empty caption\(s\) \[1\]"),
                       ({"image": "ok.png", "suffix": ""}, r"empty caption\(s\) \[1\]"),  # the run's --prompt decides nothing
                       ({"image": "ok.png", "prefix": "answer en how many?", "suffix": " "}, r"empty caption\(s\) \[1\]"),
                       ({"image": "ok.png", "prefix": "detect plane", "suffix": ["", DET]}, r"empty caption\(s\) \[1\]")):
        with pytest.raises(DataError, match=r"e.jsonl:1: " + error):
            load_examples(write_jsonl(tmp_path / "e.jsonl", [row]))


@pytest.mark.parametrize("row, error", [
    ({"image": "ok.png"}, "neither 'suffix' nor captions"),
    ({"image": "ok.png", "suffix": "a", "captions": ["b"]}, "both a suffix and captions"),
    ({"image": "ok.png", "prefix": 3, "suffix": "a"}, "'prefix' must be a non-empty string .* got 3"),
    ({"image": "ok.png", "prefix": ["detect a"], "suffix": "a"}, "'prefix' must be a non-empty string"),
    ({"image": "ok.png", "suffix": {"a": 1}}, "suffix must be strings"),
    ({"image": "ok.png", "prefix": "detect plane", "suffix": "<loc0001><loc0002><loc0003> plane"},
     r"does not parse: 1 of 1 objects are not four <loc> tokens"),
    ({"image": "ok.png", "prefix": "detect plane", "suffix": DET + " ; <loc0500><loc0000><loc0400><loc0010> plane"},
     r"does not parse: 1 of 3 objects"),  # y_max < y_min: an empty box
    ({"image": "ok.png", "prefix": "detect plane", "suffix": "plane"}, r"does not parse: 1 of 1 objects"),
    ({"image": "ok.png", "suffix": "<loc0000><loc0000><loc0010><loc0010>"}, r"does not parse"),  # no label
    ({"image": "ok.png", "prefix": "segment cat", "suffix": "<loc0000><loc0000><loc0010><loc0010>" + "<seg001>" * 15},
     r"does not parse: 15 <seg> tokens after the box, expected 16"),
    ({"image": "ok.png", "suffix": "<loc0000><loc0000><loc0010><loc0010>" + "<seg200>" * 16 + " cat"},
     r"does not parse: <seg200> outside the codebook's 0..127"),
])
def test_bad_task_rows_are_named_by_file_and_line(tmp_path, images, row, error):
    path = write_jsonl(tmp_path / "t.jsonl", [{"image": "ok2.png", "prefix": "ocr", "suffix": "fine"}, row])
    with pytest.raises(DataError, match=r"t.jsonl:2: (suffix .* )?" + error):
        load_examples(path)
    assert len(load_examples(path, skip_bad=True)[0]) == 1


def test_good_task_answers_pass_the_parse_check(tmp_path, images):
    seg = "<loc0000><loc0000><loc0010><loc0010>" + "<seg127>" * 16
    path = write_jsonl(tmp_path / "t.jsonl", [{"image": "ok.png", "prefix": "detect plane ; tank", "suffix": DET},
                                              {"image": "ok.png", "prefix": "segment cat", "suffix": seg},
                                              {"image": "ok.png", "prefix": "segment a", "suffix": f"{seg} cat ; {seg} dog"}])
    assert [e.captions for e in load_examples(path)[0]] == [[DET], [seg], [f"{seg} cat ; {seg} dog"]]


def test_fingerprint_of_caption_rows_is_unchanged_and_the_prefix_counts(tmp_path, images):
    """A checkpoint saved before prefixes existed resumes: rows without a prefix hash as they did (the
    value below is the old formula's, sha256 of the captions joined by newlines)."""
    import hashlib
    from paligemma.captioning.data import fingerprint
    caps = ["a field", "a lake"]
    assert fingerprint([Example(images / "ok.png", caps)]) == [
        ["ok.png", hashlib.sha256(b"a field\na lake").hexdigest()[:12]]]
    assert fingerprint([Example(images / "ok.png", caps, prefix="caption es")])[0][1] != \
        fingerprint([Example(images / "ok.png", caps)])[0][1]
