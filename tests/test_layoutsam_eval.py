"""LayoutSAM-Eval: generation from its parquet rows and ``training.evaluate --protocol layoutsam``, scored as
CreatiLayout's ``score_layoutsam_benchmark.py`` (its questions, crop arithmetic, yes rule, box-weighted means)."""

import io
import json

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datagen.models import ModelSpec, load_model
from datagen.stages.vlm import generate as vlm_generate
from training.evaluation import evaluate
from training.evaluation import layoutsam as ls
from training.inference import generate
from training.layout.files import read_layouts
from training.layout.layoutsam import layoutsam_records, read_layoutsam

FEATURES = datasets.Features({
    "image": datasets.Image(), "image_id": datasets.Value("int64"), "width": datasets.Value("int64"),
    "height": datasets.Value("int64"), "global_caption": datasets.Value("string"),
    "bbox_list": datasets.Value("string"), "region_captions": datasets.Value("string"),
    "detail_region_captions": datasets.Value("string"), "file_name": datasets.Value("string"),
})  # fmt: skip


def _jpeg(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_eval_parquet(path, rows):
    """A LayoutSAM-Eval parquet as the hub's: the real image as the Image feature, literal-string lists."""
    columns = {name: [] for name in FEATURES}
    for i, row in enumerate(rows):
        columns["image"].append(_jpeg(row["width"], row["height"], i))
        columns["image_id"].append(100 + i)
        for key in ("width", "height", "global_caption", "file_name"):
            columns[key].append(row[key])
        for key in ("bbox_list", "region_captions", "detail_region_captions"):
            columns[key].append(row[key] if isinstance(row[key], str) else repr(row[key]))
    datasets.disable_progress_bars()  # its bar on stderr would precede the CLIs' error lines under test
    try:
        datasets.Dataset.from_dict(columns, features=FEATURES).to_parquet(str(path))
    finally:
        datasets.enable_progress_bars()
    return path


# Three rows at their original sizes; at 64 px: A's boxes crop [0,0,32,32], [32,0,64,32], [8,40,56,64];
# B's [16,16,48,48] and a box 0.001 wide that truncates to no pixels; C has no generated image.
ROWS = [
    {"file_name": "sa_a.jpg", "width": 200, "height": 100, "global_caption": "a beach",
     "bbox_list": [[0, 0, 100, 50], [100, 0, 200, 50], [25, 62.5, 175, 100]],
     "region_captions": ["a kite", "a red/blue ball", "a dog"],
     "detail_region_captions": ["a red kite", "a ball, red/blue", "a brown dog"]},
    {"file_name": "sa_b.jpg", "width": 1000, "height": 1000, "global_caption": "a street",
     "bbox_list": [[250, 250, 750, 750], [500, 500, 501, 900]],
     "region_captions": ["a car", "a pole"], "detail_region_captions": ["a shiny car", "a thin pole"]},
    {"file_name": "sa_c.jpg", "width": 64, "height": 64, "global_caption": "a field",
     "bbox_list": [[0, 0, 64, 64]], "region_captions": ["grass"], "detail_region_captions": ["green grass"]},
]  # fmt: skip


def test_the_questions_are_the_scorers_word_for_word():
    assert ls.presence_question("a red/blue ball") == (
        'Is the subject "a redblue ball" present in the image? Strictly answer with "Yes" or "No", without any '
        "irrelevant words.")  # fmt: skip
    assert ls.attribute_question("texture", "a red/blue ball", "a ball, red/blue") == (
        'Is the subject in "a redblue ball" in the image consistent with the texture described in the detailed '
        'description: "a ball, redblue"? Strictly answer with "Yes" or "No", without any irrelevant words. If '
        'the texture is not mentioned in the detailed description, the answer is "Yes".')  # fmt: skip


@pytest.mark.parametrize("answer, yes", [("Yes.", True), ("yes, it is", True), ("No", False), ("no.", False),
                                         ("YES", False), ("The eyes are red", True), ("", False)])  # fmt: skip
def test_yes_is_the_scorers_substring_rule(answer, yes):
    assert ls.said_yes(answer) is yes  # "YES" misses and "eyes" counts, as `"Yes" in res or "yes" in res`


def test_crop_arithmetic_is_the_loaders_float32_and_int_truncation(tmp_path):
    path = write_eval_parquet(tmp_path / "e.parquet", [
        {"file_name": "x.jpg", "width": 100, "height": 300, "global_caption": "",
         "bbox_list": [[57, 30, 99.4, 210], [-0.1, 150.5, 33.33, 300]],
         "region_captions": ["a", "b"], "detail_region_captions": ["c", "d"]},
    ])  # fmt: skip
    (row,), _ = read_layoutsam(path)
    # round(x / width, 3), y by the height
    assert row.boxes.tolist() == [[0.57, 0.1, 0.994, 0.7], [-0.001, 0.502, 0.333, 1.0]]
    # 0.57 x 100 is 56.99999999999999 in float64 but 57.0 in float32, the scorer's tensors' type
    assert int(0.57 * 100) == 56 and ls.crop_box(row.boxes[0], 100) == (57, 10, 99, 70)
    assert ls.crop_box(row.boxes[1], 512) == (0, 257, 170, 512)  # -0.512 truncates toward zero
    assert ls.crop_box(row.boxes[0], 512) == (291, 51, 508, 358)
    with pytest.raises(ValueError, match="not finite"):
        ls.crop_box([0.1, float("nan"), 0.2, 0.3], 512)


def _scripted(images, asked):
    """Answers from a table keyed by (crop box, question), checking each crop's pixels; an unlisted question
    fails the test (so a question the scorer never asks, e.g. colour of an absent subject, shows)."""
    table = {
        ((0, 0, 32, 32), "a kite"): ["Yes.", "yes, it is", "Yes", "Yes"],  # all four
        ((32, 0, 64, 32), "a redblue ball"): ["yes", "Yes", "No", "Yes."],  # texture no
        ((8, 40, 56, 64), "a dog"): ["No"],  # absent: no attribute question
        ((16, 16, 48, 48), "a car"): ["Yes", "no", "Yes", "Yes"],  # colour no
    }

    def answer(questions):
        out = []
        for q in questions:
            x1, y1, x2, y2 = q.box
            assert np.array_equal(q.crop, images[q.box][y1:y2, x1:x2])
            subject = q.text.split('"')[1]
            kind = next((a for a in ls.ATTRIBUTES if f"with the {a} described" in q.text), "spatial")
            asked.append((q.box, subject, kind))
            out.append(table[q.box, subject][ls.SCORES.index(kind)])
        return out

    return answer


def test_scores_are_box_weighted_with_the_scorers_rules(tmp_path, monkeypatch, capsys):
    parquet = write_eval_parquet(tmp_path / "eval.parquet", ROWS)
    gen = tmp_path / "gen"
    gen.mkdir()
    rng = np.random.default_rng(1)
    pixels = {name: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for name in ("sa_a", "sa_b")}
    Image.fromarray(pixels["sa_a"]).save(gen / "sa_a.png")
    Image.fromarray(pixels["sa_b"]).save(gen / "sa_b.png")  # sa_c is missing
    by_box = {(0, 0, 32, 32): pixels["sa_a"], (32, 0, 64, 32): pixels["sa_a"], (8, 40, 56, 64): pixels["sa_a"],
              (16, 16, 48, 48): pixels["sa_b"]}  # fmt: skip
    asked = []
    monkeypatch.setattr(ls, "build_answerer", lambda cfg: (_scripted(by_box, asked), "scripted"))
    out = tmp_path / "eval"
    argv = ["--tiny", "--protocol", "layoutsam", "--images", str(gen), "--layouts", str(parquet), "--out", str(out)]
    assert evaluate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    # every presence question first, then the attributes of the present subjects only
    assert [k for _, _, k in asked] == ["spatial"] * 4 + ["color", "texture", "shape"] * 3
    assert ((8, 40, 56, 64), "a dog", "color") not in asked
    # 6 boxes: A's 3, B's 2 (one crop without pixels: 0, unasked), C's 1 (image missing: 0)
    sums = {"spatial": 3.0, "color": 2.0, "texture": 2.0, "shape": 3.0}
    assert printed["boxes"] == 6 and printed["sums"] == sums
    assert {k: printed[k] for k in ls.SCORES} == {k: v / 6 for k, v in sums.items()}
    # a mean of per-image means would give spatial (2/3 + 1/2 + 0) / 3 = 0.389 and colour 0.222, not 0.5 and 0.333
    assert printed["spatial"] == 0.5 and printed["color"] == pytest.approx(1 / 3)
    assert printed["failures_by_reason"] == {"empty crop": 1, "missing image": 1}
    assert printed["images_missing"] == 1 and printed["vlm"] == "scripted"
    assert printed["comparable_with_published_table"] is False and "not comparable" in printed["comparability"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["layoutsam"]["resolution"] == 64 and summary["spatial"] == 0.5
    table = pd.read_csv(out / "boxes.csv")
    assert table["answer_color"].isna().tolist() == [False, False, True, False, True, True]
    assert table.loc[4, ["crop_x1", "crop_x2"]].tolist() == [32, 32] and table.loc[4, "error"].startswith("empty crop")
    images = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert images == [
        {"file_name": "sa_a.jpg", "bbox_count": 3, "score_spatial": 2.0, "score_color": 2.0,
         "score_texture": 1.0, "score_shape": 2.0},
        {"file_name": "sa_b.jpg", "bbox_count": 2, "score_spatial": 1.0, "score_color": 0.0,
         "score_texture": 1.0, "score_shape": 1.0},
        {"file_name": "sa_c.jpg", "bbox_count": 1, "score_spatial": 0.0, "score_color": 0.0,
         "score_texture": 0.0, "score_shape": 0.0},
    ]  # fmt: skip


def test_an_image_of_another_size_is_refused_before_the_vlm_loads(tmp_path, monkeypatch, capsys):
    parquet = write_eval_parquet(tmp_path / "eval.parquet", ROWS[:2])
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.new("RGB", (64, 64)).save(gen / "sa_a.png")
    Image.new("RGB", (128, 128)).save(gen / "sa_b.png")
    monkeypatch.setattr(ls, "build_answerer", lambda cfg: pytest.fail("the VLM must not load"))
    argv = ["--tiny", "--protocol", "layoutsam", "--images", str(gen), "--layouts", str(parquet),
            "--out", str(tmp_path / "eval")]  # fmt: skip
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "sa_b.png: 128x128, but the layoutsam protocol scores 64x64" in err and "--resolution 128" in err
    assert not (tmp_path / "eval").exists()
    assert evaluate.main([*argv, "--resolution", "128"]) == 2  # now sa_a is the wrong one
    assert "sa_a.png: 64x64" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("bbox_list", "[[0, 0, 10, 10], [1, 2, 3", "bbox_list is not a Python literal"),
    ("bbox_list", "__import__('os').system('true')", "bbox_list is not a Python literal"),
    ("bbox_list", "[" * 300 + "]" * 300, "bbox_list is not a Python literal"),  # bounded: shards' parser
    ("bbox_list", "[" + "1, " * 400_000 + "]", "bbox_list is 1200002 characters long"),
    ("bbox_list", "[[0, 0, 1e999, 10], [0, 0, 5, 5]]", "bbox_list: box 0 is not 4 finite numbers"),
    ("bbox_list", "[[0, 0, 10, True], [0, 0, 5, 5]]", "bbox_list: box 0 is not 4 finite numbers"),
    ("region_captions", "['a']", "region_captions: 1 texts for 2 boxes"),
    ("detail_region_captions", "['a', 3]", "detail_region_captions: entries [1] are not strings"),
    ("file_name", "../x.jpg", "file_name: expected a file name without folders"),
])  # fmt: skip
def test_a_bad_row_is_one_error_line_naming_file_row_and_column(tmp_path, capsys, field, value, message):
    good = {"file_name": "ok.jpg", "width": 64, "height": 64, "global_caption": "g",
            "bbox_list": [[0, 0, 10, 10], [0, 0, 5, 5]], "region_captions": ["a", "b"],
            "detail_region_captions": ["c", "d"]}  # fmt: skip
    parquet = write_eval_parquet(tmp_path / "bad.parquet", [good, {**good, "file_name": "two.jpg", field: value}])
    assert generate.main(["--tiny", "--layouts", str(parquet), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and err.startswith(f"error: {parquet}[row 1]: {message}")
    assert not (tmp_path / "o").exists()
    rows, skipped = read_layoutsam(parquet, skip_bad=True)  # --skip-bad-layouts: counted, the rest kept
    assert [r.id for r in rows] == ["ok"] and [(s.where, s.index) for s in skipped] == [(f"{parquet}[row 1]", 1)]


def test_a_box_without_area_at_the_generated_size_follows_the_bad_layout_policy(tmp_path, capsys):
    row = {**ROWS[1], "file_name": "thin.jpg"}
    row["bbox_list"] = [[250, 250, 750, 750], [500, 500, 500.4, 900]]  # rounds to 0.5 and 0.5: no area
    parquet = write_eval_parquet(tmp_path / "thin.parquet", [ROWS[0], row])
    assert generate.main(["--tiny", "--layouts", str(parquet), "--out", str(tmp_path / "o")]) == 2
    assert f"error: {parquet}[row 1]: bbox_list scaled to 64x64: box 1" in capsys.readouterr().err


def test_minicpm_needs_trust_remote_code_by_hand_and_transformers_4(tmp_path, capsys):
    parquet = write_eval_parquet(tmp_path / "eval.parquet", ROWS[:1])
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.new("RGB", (64, 64)).save(gen / "sa_a.png")
    argv = ["--tiny", "--protocol", "layoutsam", "--images", str(gen), "--layouts", str(parquet),
            "--vlm", "openbmb/MiniCPM-V-2_6", "--vlm-engine", "minicpm"]  # fmt: skip
    assert evaluate.main(argv) == 2
    assert "give --trust-remote-code" in capsys.readouterr().err
    assert evaluate.main([*argv, "--trust-remote-code"]) == 2  # this venv has transformers 5
    assert "written for transformers 4" in capsys.readouterr().err
    native = ["--tiny", "--protocol", "layoutsam", "--images", str(gen), "--layouts", str(parquet), "--trust-remote-code"]
    assert evaluate.main(native) == 2
    assert "only for engine minicpm" in capsys.readouterr().err


@pytest.mark.parametrize("sampling, options", [
    (False, {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}), (True, {})])  # fmt: skip
def test_minicpm_is_called_as_the_scorer_does(sampling, options):
    calls = []

    class Chat:
        def chat(self, **kwargs):
            calls.append(kwargs)
            return "Yes"

    cfg = ls.LayoutSamConfig(vlm=ModelSpec("vlm", ls.MINICPM), engine="minicpm", trust_remote_code=True,
                             minicpm_sampling=sampling)  # fmt: skip
    crop = np.full((4, 6, 3), 7, np.uint8)
    answers = ls.MiniCpmAnswerer(Chat(), "tok", cfg)([ls.Question(crop, (0, 0, 6, 4), "q?")])
    assert answers == ["Yes"]
    (call,) = calls
    (message,) = call.pop("msgs")
    image, text = message["content"]
    assert message["role"] == "user" and text == "q?" and np.array_equal(np.asarray(image), crop)
    assert call == {"image": None, "tokenizer": "tok", "max_new_tokens": 32, **options}


def test_rows_as_layouts_to_generate(tmp_path):
    parquet = write_eval_parquet(tmp_path / "eval.parquet", ROWS)
    records, skipped = layoutsam_records(parquet, 64, 64, seed=5)
    assert skipped == [] and [(r.id, r.seed, r.height, r.width) for r in records] == [
        ("sa_a", 5, 64, 64), ("sa_b", 6, 64, 64), ("sa_c", 7, 64, 64)]  # fmt: skip
    # the loader's normalised boxes at the generated side, the detailed captions as the region texts (as its
    # generation scripts feed them), the global caption as the prompt
    assert records[0].boxes.tolist() == [[0, 0, 32, 32], [32, 0, 64, 32], [8, 40, 56, 64]]
    assert records[0].labels == ("a red kite", "a ball, red/blue", "a brown dog")
    assert records[1].caption == "a street" and records[1].boxes[1].tolist() == [32, 32, 32.064, 57.6]
    assert layoutsam_records(parquet, 64, 128)[0][0].boxes[2].tolist() == [16, 40, 112, 64]  # x by the width
    with pytest.raises(ValueError, match=r"duplicate ids \['sa_a'\]"):
        layoutsam_records(write_eval_parquet(tmp_path / "d.parquet", [ROWS[0], {**ROWS[1], "file_name": "sa_a.png"}]))


@pytest.mark.slow  # about 30 s on a loaded 2-core machine: the tiny SDXL's build and sampling
def test_generate_from_the_parquet_then_score_with_the_tiny_vlm(tmp_path, capsys):
    parquet = write_eval_parquet(tmp_path / "eval.parquet", ROWS[:2])
    gen = tmp_path / "gen"
    assert generate.main(["--tiny", "--layouts", str(parquet), "--out", str(gen)]) == 0
    capsys.readouterr()
    records = read_layouts(gen / "layouts.jsonl")
    assert [r.id for r in records] == ["sa_a", "sa_b"] and [r.seed for r in records] == [0, 1]
    # the loader's normalised boxes at the generated 64 px, the detailed captions as the region texts
    assert records[0].boxes.tolist() == [[0, 0, 32, 32], [32, 0, 64, 32], [8, 40, 56, 64]]
    assert records[0].labels == ("a red kite", "a ball, red/blue", "a brown dog")
    assert records[1].caption == "a street" and records[1].boxes[1].tolist() == [32, 32, 32.064, 57.6]
    _score_with_the_tiny_vlm(parquet, gen, tmp_path / "eval", capsys)


def test_score_offline_with_the_tiny_vlm(tmp_path, capsys):
    parquet = write_eval_parquet(tmp_path / "eval.parquet", ROWS[:2])
    gen = tmp_path / "gen"
    gen.mkdir()
    rng = np.random.default_rng(2)
    for name in ("sa_a", "sa_b"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(gen / f"{name}.png")
    _score_with_the_tiny_vlm(parquet, gen, tmp_path / "eval", capsys)


def _score_with_the_tiny_vlm(parquet, gen, out, capsys):
    """Score ``gen``'s sa_a / sa_b through the CLI with datagen's tiny Qwen2.5-VL, offline."""
    with Image.open(gen / "sa_b.png") as im:
        assert im.size == (64, 64)
        image = np.asarray(im.convert("RGB"))
    argv = ["--tiny", "--protocol", "layoutsam", "--images", str(gen), "--layouts", str(parquet), "--out", str(out),
            "--set", "layoutsam.batch_size=1", "--format", "parquet"]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["boxes"] == 5 and printed["vlm"] == "tiny-qwen2.5-vl" and printed["engine"] == "transformers"
    assert printed["comparable_with_published_table"] is False
    table = pd.read_parquet(out / "boxes.parquet")
    asked = table[table["error"].isna()]
    assert len(asked) == 4 and table["error"].notna().sum() == 1  # B's second box crops to no pixels
    for score in ls.SCORES:  # each score is the yes rule applied to its recorded answer, asked only when present
        answered = asked[f"answer_{score}"].notna()
        assert (asked.loc[answered, score] == asked.loc[answered, f"answer_{score}"].map(ls.said_yes)).all()
        if score != "spatial":
            assert (answered == (asked["spatial"] == 1.0)).all()
    assert printed["spatial"] == table["spatial"].sum() / 5
    # the real path: the same crop and question through datagen's VLM wrapper give the recorded answer
    model, processor = load_model(ModelSpec("vlm", "tiny-qwen2.5-vl", backend="tiny", device="cpu"))
    car = table[table["region_caption"] == "a car"].iloc[0]
    assert [car.crop_x1, car.crop_y1, car.crop_x2, car.crop_y2] == [16, 16, 48, 48]
    expected = vlm_generate(model, processor, [image[16:48, 16:48]], [ls.presence_question("a car")],
                            max_new_tokens=4, batch_size=1)  # fmt: skip
    assert car.answer_spatial == expected[0]


def test_the_protocol_needs_the_benchmarks_parquet(tmp_path, capsys):
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text(json.dumps({"id": "sa_a", "boxes": [[0, 0, 8, 8]], "labels": ["a"]}) + "\n")
    (tmp_path / "gen").mkdir()
    argv = ["--tiny", "--protocol", "layoutsam", "--images", str(tmp_path / "gen"), "--layouts", str(layouts)]
    assert evaluate.main(argv) == 2
    assert "the layoutsam protocol reads the LayoutSAM-Eval parquet" in capsys.readouterr().err
