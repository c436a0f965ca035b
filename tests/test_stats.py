"""``shards.stats`` on a hand-made dataset with known answers, and ``shards.draw``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from stats_fixture import EXPECTED, FOG_SENTENCE, FOG_VALUE, write_dataset

from shards import iter_samples, stats
from shards.draw import color, draw_layout, draw_sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("stats") / "ds"))


@pytest.fixture(scope="module")
def index(dataset):
    return stats.load_index(dataset)


@pytest.fixture(scope="module")
def objects(dataset):
    return stats.load_objects(dataset, max_samples=None)


def test_load_index_concatenates_complete_shards_with_shard_column(dataset, index):
    assert len(index) == 8
    assert index.groupby("shard")["key"].apply(sorted).to_dict() == {
        "000000": ["f0", "f1", "f2", "s0a", "s0b"],
        "000001": ["f3", "s1a", "s1b"],
    }
    assert str(index["num_objects"].dtype) == "Int64" and str(index["shard"].dtype) == "string"
    everything = stats.load_index(dataset, complete_only=False)
    assert sorted(everything["shard"].unique()) == ["000000", "000001", "000002"]


def test_loading_leaves_out_and_names_damaged_shards(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    (ds / "000000.parquet").unlink()
    (ds / "000001.tar").write_bytes(b"not a tar")
    skipped: dict[str, str] = {}
    index = stats.load_index(str(ds), skipped=skipped)
    objects = stats.load_objects(str(ds), max_samples=None, skipped=skipped)
    assert sorted(index["key"]) == ["f3", "s1a", "s1b"]
    assert sorted(objects["key"]) == ["s0a", "s0a", "s0b"]
    assert skipped["000000"] == "parquet missing (the stats file says the shard is complete)"
    assert skipped["000001"] == f"{ds / '000001.tar'}: holds 9 bytes but its stats file recorded 10240: damaged " \
                                "(truncated or overwritten), not read"


def test_load_index_of_dataset_without_shards_is_empty_with_columns(tmp_path):
    df = stats.load_index(str(tmp_path))
    assert len(df) == 0 and "shard" in df.columns and "status" in df.columns


def test_status_failures_by_stage_and_reasons(index):
    assert stats.status_counts(index).to_dict() == EXPECTED["status"]
    by_stage = stats.failures_by_stage(index)
    assert by_stage.to_dict(orient="index") == {
        "decode": {"failed": 2, "filtered": 0},
        "filter": {"failed": 0, "filtered": 1},
        "ground": {"failed": 1, "filtered": 0},
    }
    assert list(by_stage.index) == ["decode", "filter", "ground"]
    reasons = stats.failure_reasons(index)
    assert reasons[["status", "stage", "reason", "count", "example_key"]].values.tolist() == [
        ["failed", "decode", "OSError: cannot identify image file '…'", 2, "f0"],
        ["filtered", "filter", "no object left after N filters", 1, "f2"],
        ["failed", "ground", "RuntimeError: CUDA out of memory", 1, "f3"],
    ]


def test_failure_reason_normalises_what_varies():
    assert stats.failure_reason('KeyError: "abc" at 12.5') == "KeyError: '…' at N"
    assert stats.failure_reason(None) == "?"
    assert stats.failure_reason(pd.NA) == "?"
    assert stats.failure_reason("  ") == "?"
    long = stats.failure_reason("x" * 300)
    assert len(long) == 120 and long.endswith("…")


def test_per_shard_counts_and_objects_per_image(index):
    assert stats.per_shard_counts(index).to_dict(orient="index") == {
        "000000": {"inputs": 5, "ok": 2, "failed": 2, "filtered": 1, "objects": 3},
        "000001": {"inputs": 3, "ok": 2, "failed": 1, "filtered": 0, "objects": 1},
    }
    assert stats.objects_per_image(index).to_dict() == EXPECTED["objects_per_image"]


def test_objects_table_boxes_and_scores(objects):
    assert list(zip(objects["key"], objects["index"], strict=True)) == [("s0a", 0), ("s0a", 1), ("s0b", 0), ("s1b", 0)]
    assert objects["text"].tolist() == [FOG_SENTENCE, "A small brown dog.", "cat", "dog dog cat"]
    assert objects["has_mask"].tolist() == [True, False, False, True]
    geo = stats.box_geometry(objects)
    np.testing.assert_allclose(geo["area"], EXPECTED["area"])
    np.testing.assert_allclose(geo["aspect"], EXPECTED["aspect"])
    scores = stats.score_summary(objects)
    assert scores.loc["detector_score", "count"] == 4
    assert scores.loc["detector_score", "mean"] == pytest.approx((0.9 + 0.5 + 0.7 + 0.6) / 4)
    assert scores.loc["mask_score", "count"] == 2 and scores.loc["mask_score", "mean"] == pytest.approx(0.85)
    assert scores.loc["clip_score", "count"] == 3 and scores.loc["clip_score", "max"] == 30.0
    assert stats.top_phrases(objects).to_dict() == {"cat": 2, "dog": 2}
    assert stats.top_phrases(objects, n=1).to_dict() == {"cat": 2}


def test_text_statistics(objects):
    assert stats.description_lengths(objects).tolist() == EXPECTED["words"]
    np.testing.assert_allclose(stats.fog_indices(objects), EXPECTED["fog"])
    assert stats.unique_words_per_sample(objects).to_dict() == EXPECTED["unique_words"]
    metrics = stats.paper_metrics(objects)
    assert list(metrics) == list(stats.PAPER_METRICS)
    assert metrics["clip_score"].tolist() == [30.0, 20.0, 25.0]


def test_fog_index_of_a_hand_computed_sentence():
    # 11 words / 2 sentences + 100 * 2 complex / 11 words -> 0.4 * (5.5 + 18.18...) = 9.4727...
    assert stats.fog_index(FOG_SENTENCE) == pytest.approx(9.472727, abs=1e-6) == pytest.approx(FOG_VALUE)
    # No final stop still makes a sentence; a decimal point does not end one.
    assert stats.fog_index("a cat. a dog") == pytest.approx(0.4 * 2)
    assert stats.fog_index("a 3.5 inch screen") == pytest.approx(0.4 * 4)
    assert math.isnan(stats.fog_index("")) and math.isnan(stats.fog_index("... !"))


@pytest.mark.parametrize(
    "word, n",
    [
        ("cat", 1), ("the", 1), ("made", 1), ("whale", 1), ("tree", 1), ("agree", 2), ("table", 2),
        ("people", 2), ("parked", 1), ("wanted", 2), ("faded", 2), ("makes", 1), ("boxes", 2),
        ("pages", 2), ("beautiful", 3), ("animal", 3), ("yellow", 2), ("Umbrella", 3), ("42", 1),
        ("don't", 1), ("photograph", 3), ("conversation", 4),
    ],
)
def test_count_syllables_rule(word, n):
    assert stats.count_syllables(word) == n


def test_words_split_on_hyphens_and_keep_apostrophes():
    assert stats.words("A black-and-white dog's toy, 2.5 balls, the 3rd.") == [
        "a", "black", "and", "white", "dog's", "toy", "2.5", "balls", "the", "3rd"
    ]


def test_load_objects_caps_samples_evenly_over_shards(dataset):
    two = stats.load_objects(dataset, max_samples=2)  # one per shard: s0a and s1a (no objects)
    assert two["key"].unique().tolist() == ["s0a"] and len(two) == 2
    three = stats.load_objects(dataset, max_samples=3)  # two from shard 0, then the one left from shard 1
    assert three["key"].unique().tolist() == ["s0a", "s0b"]
    assert stats.load_objects(dataset, max_samples=0).empty


def test_summary_headline_numbers(index, objects):
    s = stats.summary(index, objects)
    assert (s["inputs"], s["shards"], s["ok"], s["failed"], s["filtered"], s["objects"]) == (8, 2, 4, 3, 1, 4)
    assert s["mean objects per image"] == 1.0
    assert s["median description length"] == 3.5 and s["median clip alignment"] == 25.0


def test_draw_layout_tints_masks_and_outlines_boxes_in_object_colours():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    mask = np.zeros((80, 100), dtype=bool)
    mask[40:80, 50:100] = True
    out = draw_layout(image, [[10, 10, 40, 30], [50, 40, 100, 80]], ["", "b"], [None, mask])
    assert out.size == (100, 80) and image.getpixel((60, 60)) == (255, 255, 255)  # input untouched
    assert out.getpixel((10, 20)) == color(0)  # box 0's left edge
    inside = np.array(out.getpixel((75, 65)), dtype=float)  # tinted mask interior, away from the label
    expected = 255 * 0.6 + np.array(color(1)) * 0.4
    np.testing.assert_allclose(inside, expected, atol=1)
    assert out.getpixel((25, 20)) == (255, 255, 255)  # inside box 0, no mask: unchanged


def test_draw_layout_scales_boxes_and_masks_with_max_size():
    image = Image.new("RGB", (400, 200), (0, 0, 0))
    mask = np.zeros((200, 400), dtype=bool)
    mask[:, 200:] = True
    out = draw_layout(image, np.array([[0.0, 0.0, 200.0, 100.0]]), [""], [mask], max_size=100)
    assert out.size == (100, 50)
    assert out.getpixel((0, 20)) == color(0)  # box edge at the scaled position
    assert out.getpixel((75, 40)) != (0, 0, 0) and out.getpixel((25, 40)) == (0, 0, 0)


def test_draw_layout_rejects_mismatched_inputs():
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="1 boxes but 2 labels"):
        draw_layout(image, [[0, 0, 5, 5]], ["a", "b"])
    with pytest.raises(ValueError, match=r"mask 0 has shape \(5, 5\)"):
        draw_layout(image, [[0, 0, 5, 5]], ["a"], [np.zeros((5, 5), dtype=bool)])


def test_draw_sample_reads_a_shard_sample(dataset):
    sample = next(s for s in iter_samples(dataset) if s.record.key == "s0a")
    out = draw_sample(sample, max_size=None)
    assert out.size == (64, 48)
    assert out.getpixel((20, 20)) != sample.image().getpixel((20, 20))  # inside object 0's mask
    assert out.getpixel((63, 30)) == color(1)  # the right edge of box 1 at x=63
