"""Layout files in the release's formats, validation before any model loads, and the release's leniency."""

import json
import logging

import numpy as np
import pytest

from training.layout.files import lenient_layout, load_layouts, read_layouts, validate_layout

DEMO = {"bboxes": [[93, 355, 512, 510], [377, 0, 512, 137]], "labels": ["a sandy beach", "a palm tree"]}


def test_a_pretty_printed_object_is_one_layout_named_after_the_file(tmp_path):
    path = tmp_path / "100002558.json"
    path.write_text(json.dumps(DEMO, indent=4))
    (record,) = read_layouts(path)
    assert (record.id, record.height, record.width, record.caption, record.seed) == ("100002558", 512, 512, "", 0)
    assert record.boxes.tolist() == DEMO["bboxes"] and record.labels == tuple(DEMO["labels"])


def test_an_array_and_json_lines_give_the_same_records(tmp_path):
    second = {"boxes": [[0, 0, 8, 8]], "labels": ["a cat"], "seed": 9}
    array, lines = tmp_path / "a.json", tmp_path / "l.jsonl"
    array.write_text(json.dumps([DEMO, second], indent=2))
    lines.write_text(json.dumps(DEMO) + "\n" + json.dumps(second) + "\n")
    a, b = read_layouts(array), read_layouts(lines)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    assert [(r.id, r.seed) for r in a] == [("000000", 0), ("000001", 9)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no layouts (the file is empty)"),
        ("  \n\n", "no layouts (the file is empty)"),
        ("[]", "no layouts (the array is empty)"),
        (json.dumps({**DEMO, "height": 800000, "width": 800000}), "height 800000 is larger than 4096"),
        (json.dumps({"boxes": [[0, 0, float("nan"), 4]], "labels": ["a"]}), "contain NaN or inf"),
        (json.dumps({"boxes": [[0, 0, 1e9, 4]], "labels": ["a"]}), "lies outside the 512x512 image"),
        (json.dumps({"boxes": [[0, 0, 4, 4]] * 31, "labels": ["a"] * 31}), "31 objects but the model takes at most 30"),
        (json.dumps({"boxes": [[0, 0, 4, 4]], "labels": ["a", "b"]}), "1 boxes but 2 labels"),
        (json.dumps({"boxes": [[0, 0, 4, 4]], "labels": ["a"], "caption": ["x", "y"]}), "needs --lenient"),
    ],
)  # fmt: skip
def test_bad_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json") as err:
        load_layouts(path, max_objects=30)
    assert message in str(err.value)


def test_errors_name_the_line_or_the_index(tmp_path):
    bad = {"boxes": [[0, 0, 600, 8]], "labels": ["a"]}
    lines, array = tmp_path / "l.jsonl", tmp_path / "a.json"
    lines.write_text(json.dumps(DEMO) + "\n" + json.dumps(bad) + "\n")
    array.write_text(json.dumps([DEMO, DEMO, bad]))
    with pytest.raises(ValueError, match=r"l\.jsonl:2: box 0 \[0.0, 0.0, 600.0, 8.0\] lies outside"):
        read_layouts(lines)
    with pytest.raises(ValueError, match=r"a\.json\[2\]: box 0"):
        read_layouts(array)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(DEMO) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not JSON"):
        read_layouts(broken)


def test_skip_bad_keeps_the_good_layouts_and_lists_the_others(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join([json.dumps(DEMO), "{oops", json.dumps({"boxes": [[0, 0, 9, 9]], "labels": []}),
                               json.dumps({**DEMO, "id": "last"})]) + "\n")  # fmt: skip
    records, skipped = load_layouts(path, skip_bad=True)
    assert [r.id for r in records] == ["000000", "last"]
    assert [(s.where, s.index) for s in skipped] == [(f"{path}:2", 1), (f"{path}:3", 2)]
    assert "not JSON" in skipped[0].error and "1 boxes but 0 labels" in skipped[1].error
    only_bad = tmp_path / "b.jsonl"
    only_bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"no valid layout \(1 skipped\)"):
        load_layouts(only_bad, skip_bad=True)


def test_lenient_keeps_the_first_objects_and_clamps_with_warnings(caplog):
    boxes = [[-10, 5, 20, 30], [0, 0, 10, 10], [40, 40, 90, 70], [70, 0, 80, 10]]
    with caplog.at_level(logging.WARNING):
        out, labels = lenient_layout(boxes, ["a", "b", "c", "d"], 64, 64, max_objects=3, where="f:1")
    assert out.tolist() == [[0, 5, 20, 30], [0, 0, 10, 10], [40, 40, 64, 64]] and labels == ["a", "b", "c"]
    text = caplog.text
    assert "f:1: 4 objects, kept the first 3" in text and "boxes [0, 2] clamped to the 64x64 image" in text
    dropped, kept = lenient_layout([[70, 0, 80, 10], [1, 1, 2, 2]], ["out", "in"], 64, 64, max_objects=30)
    assert dropped.tolist() == [[1, 1, 2, 2]] and kept == ["in"]
    with pytest.raises(ValueError, match="NaN"):
        lenient_layout([[0, 0, np.inf, 1]], ["a"], 64, 64, max_objects=30)
    with pytest.raises(ValueError, match="outside"):  # strict validation is unchanged
        validate_layout([[-1, 0, 4, 4]], ["a"], 64, 64)


def test_lenient_file_accepts_a_list_of_prompts_and_too_many_objects(tmp_path):
    path = tmp_path / "demo.json"
    path.write_text(json.dumps({"caption": ["a beach", "a lake"], "bboxes": [[0, 0, 600, 8]] * 32,
                                "labels": ["x"] * 32}))  # fmt: skip
    records, skipped = load_layouts(path, max_objects=30, lenient=True)
    assert [(r.id, r.caption, len(r.boxes)) for r in records] == [("demo_p0", "a beach", 30), ("demo_p1", "a lake", 30)]
    assert records[0].boxes[0].tolist() == [0, 0, 512, 8] and records[0].seed == records[1].seed and not skipped


def test_lenient_without_a_limit_still_clamps(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"boxes": [[-4, 0, 70, 8]] * 40, "labels": ["a"] * 40, "height": 64, "width": 64}) + "\n")
    (record,), _ = load_layouts(path, lenient=True)
    assert len(record.boxes) == 40 and record.boxes[0].tolist() == [0, 0, 64, 8]


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text((json.dumps({**DEMO, "id": "same"}) + "\n") * 2)
    with pytest.raises(ValueError, match=r"l\.jsonl: duplicate ids \['same'\]"):
        read_layouts(path)


def test_a_box_outside_the_assumed_size_names_the_size_and_the_fix(tmp_path):
    path = tmp_path / "100002558.json"
    path.write_text(json.dumps(DEMO))
    with pytest.raises(ValueError, match=r"no size, so this run's default 64x64 applies: .*--set height=512"):
        read_layouts(path, height=64, width=64)
    path.write_text(json.dumps({**DEMO, "height": 64, "width": 64}))  # a size given: no guess to explain
    with pytest.raises(ValueError, match=r"lies outside the 64x64 image \(pixels, xyxy\)$"):
        read_layouts(path)
