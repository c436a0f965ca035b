"""Region reorganization (docs/METHOD.md §2): every rule on small hand-made layouts."""

import numpy as np
import pytest
from _model_fixtures import random_boxes, random_layout

from training.layout.regions import empty_layout, latent_grid, reorganize_regions

B = -1  # dropped


def test_last_row_and_column_are_covered():
    # 32x24 px -> 4x3 grid; a box reaching the image border covers the last row and column.
    layout = reorganize_regions([[8, 8, 24, 32]], ["dog"], 32, 24)
    assert layout.grid_size == (4, 3)
    np.testing.assert_array_equal(layout.region_map, [[0, 0, 0], [0, 1, 1], [0, 1, 1], [0, 1, 1]])
    assert layout.texts == ["", "dog"]
    assert layout.background_slot == 0


def test_cell_overlap_rule_and_zero_area_box():
    # cells overlapping the box with positive area: cols floor(4/8)=0 .. ceil(12/8)=2, row 0 .. ceil(8/8)=1
    layout = reorganize_regions([[4, 0, 12, 8], [16, 16, 16, 30]], ["a", "zero width"], 32, 32)
    expected = np.ones((4, 4), dtype=int)
    expected[0, :2] = 0
    np.testing.assert_array_equal(layout.region_map, expected)
    assert layout.texts == ["a", ""]  # the zero-area box covers no cell, so it is in no region
    assert layout.n_regions == 2


def test_overlapping_boxes_regions_texts_boxes_weights_unions():
    # 64x48 px -> 8x6 grid. Box 0 covers rows 0-3, cols 0-3 (16 cells); box 1 rows 2-5, cols 2-7 (24 cells).
    boxes = [[0, 0, 32, 32], [16, 16, 64, 48]]
    layout = reorganize_regions(boxes, ["a red dog", "a cat; sleeping"], 48, 64)
    np.testing.assert_array_equal(
        layout.region_map,
        [
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 2, 2, 3, 3, 3, 3],
            [0, 0, 2, 2, 3, 3, 3, 3],
            [1, 1, 3, 3, 3, 3, 3, 3],
            [1, 1, 3, 3, 3, 3, 3, 3],
        ],
    )
    assert layout.texts == ["a red dog", "", "a red dog; a cat sleeping", "a cat sleeping"]
    assert [ids.tolist() for ids in layout.object_ids] == [[0], [], [0, 1], [1]]
    np.testing.assert_allclose(layout.boxes[2], [[0, 0, 0.5, 32 / 48], [0.25, 16 / 48, 1, 1]], rtol=1e-6)
    np.testing.assert_array_equal(layout.boxes[1], [[-1, -1, -1, -1]])
    # weight_i = cells(smallest covering box) / cells(box_i)
    np.testing.assert_allclose(layout.weights[2], [1.0, 16 / 24], rtol=1e-6)
    assert layout.weights[0].tolist() == [1.0] and layout.weights[1].tolist() == [1.0]
    union = np.zeros((6, 8), dtype=bool)
    union[:4, :4] = True
    union[2:, 2:] = True
    np.testing.assert_array_equal(layout.union_masks[2], union)
    assert layout.union_masks[1].all()  # background: the whole image
    np.testing.assert_array_equal(
        layout.union_masks[0], union & (np.arange(8) < 4) & (np.arange(6) < 4)[:, None]
    )


def test_nested_boxes_weight_is_area_ratio():
    # outer covers the 4x4 grid (16 cells), inner 2x2 (4 cells): the inner region's weights are [0.25, 1].
    layout = reorganize_regions([[0, 0, 32, 32], [8, 8, 24, 24]], ["room", "lamp"], 32, 32)
    np.testing.assert_array_equal(layout.region_map, [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    assert layout.texts == ["room", "room; lamp"]
    assert layout.weights[1].tolist() == [0.25, 1.0]
    assert layout.background_slot is None


def test_identical_boxes_are_one_region():
    layout = reorganize_regions([[0, 0, 16, 16], [0, 0, 16, 16]], ["x", "y"], 16, 16)
    assert layout.texts == ["x; y"] and layout.weights[0].tolist() == [1.0, 1.0]
    assert (layout.region_map == 0).all()


def test_non_square_grid_and_fractional_boxes():
    layout = reorganize_regions([[9.5, 3.0, 20.1, 7.9]], ["bird"], 16, 40)  # 2x5 grid
    np.testing.assert_array_equal(layout.region_map, [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_allclose(layout.boxes[1], [[9.5 / 40, 3 / 16, 20.1 / 40, 7.9 / 16]], rtol=1e-6)


def test_boxes_outside_the_image_are_clamped():
    layout = reorganize_regions([[-10, -10, 100, 8]], ["sky"], 16, 16)
    np.testing.assert_array_equal(layout.region_map, [[0, 0], [1, 1]])
    np.testing.assert_allclose(layout.boxes[0], [[0, 0, 1, 0.5]])


def test_empty_layout_has_no_region_not_even_a_background():
    # docs/METHOD.md §4.1: the CFG negative branch and a dropped layout attend nothing.
    layout = empty_layout(24, 40)
    assert layout.texts == [] and layout.background_slot is None and layout.n_slots == 0
    assert (layout.region_map == -1).all() and layout.region_map.shape == (3, 5)
    assert layout.union_masks.shape == (0, 3, 5) and layout.n_regions == 0
    same = reorganize_regions(np.zeros((0, 4)), [], 24, 40)
    assert same.texts == [] and (same.region_map == -1).all()


def _assert_aligned(layout, boxes, texts, height, width):
    """Each slot's text, boxes, weights and union mask match its object ids."""
    scale = np.array([width, height, width, height])
    h, w = layout.grid_size
    for s in range(layout.n_slots):
        ids = layout.object_ids[s]
        if ids.size == 0:
            assert layout.texts[s] == "" and s == layout.background_slot
            continue
        assert layout.texts[s] == "; ".join(texts[i].replace(";", "") for i in ids)
        np.testing.assert_allclose(layout.boxes[s], np.clip(boxes[ids] / scale, 0, 1), rtol=1e-6)
        cells = []
        for i in ids:
            x1, y1, x2, y2 = boxes[i] / 8
            cells.append((min(h, np.ceil(y2)) - np.floor(y1)) * (min(w, np.ceil(x2)) - np.floor(x1)))
        np.testing.assert_allclose(layout.weights[s], min(cells) / np.array(cells), rtol=1e-6)
        assert layout.weights[s].max() == 1.0
        # every cell of the slot lies in every box of the slot, hence in the union mask
        assert layout.union_masks[s][layout.region_map == s].all()


def test_caps_keep_texts_boxes_weights_aligned_and_are_reproducible():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 12, 128, 96)
    texts = [f"object {i}" for i in range(12)]
    full = reorganize_regions(boxes, texts, 128, 96, max_slots=100)
    assert full.n_slots == full.n_regions > 8
    capped = reorganize_regions(boxes, texts, 128, 96, max_slots=8, rng=np.random.default_rng(7))
    again = reorganize_regions(boxes, texts, 128, 96, max_slots=8, rng=np.random.default_rng(7))
    other = reorganize_regions(boxes, texts, 128, 96, max_slots=8, rng=np.random.default_rng(8))
    assert capped.n_slots == 8 and capped.n_regions == full.n_regions
    assert capped.texts == again.texts
    np.testing.assert_array_equal(capped.region_map, again.region_map)
    assert capped.texts != other.texts
    _assert_aligned(capped, boxes, texts, 128, 96)
    # kept regions keep their cells; the others' cells are dropped (-1)
    assert set(np.unique(capped.region_map)) <= set(range(-1, 8)) and (capped.region_map == B).any()
    assert capped.background_slot is not None  # the background is always kept
    for s in range(capped.n_slots):
        full_slot = full.texts.index(capped.texts[s])
        np.testing.assert_array_equal(capped.region_map == s, full.region_map == full_slot)
    # max_regions caps the same way
    assert reorganize_regions(boxes, texts, 128, 96, max_regions=5, rng=np.random.default_rng(7)).n_slots == 5


def test_without_rng_the_largest_regions_are_kept():
    boxes = np.array([[0, 0, 64, 64], [0, 0, 8, 8], [56, 56, 64, 64]])
    layout = reorganize_regions(boxes, ["big", "corner", "other corner"], 64, 64, max_slots=2)
    assert layout.texts == ["big; corner", "big"]  # "big" is largest; the corners tie, the first wins
    assert sorted(np.unique(layout.region_map).tolist()) == [-1, 0, 1]


def test_max_objs_keeps_a_seeded_subset_or_the_first_objects():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 10, 64, 64)
    texts = [f"t{i}" for i in range(10)]
    first = reorganize_regions(boxes, texts, 64, 64, max_objs=4)
    assert first.n_objects == 4
    assert set(np.concatenate(first.object_ids).tolist()) <= {0, 1, 2, 3}
    a = reorganize_regions(boxes, texts, 64, 64, max_objs=4, rng=np.random.default_rng(1))
    b = reorganize_regions(boxes, texts, 64, 64, max_objs=4, rng=np.random.default_rng(1))
    assert a.texts == b.texts
    _assert_aligned(a, boxes, texts, 64, 64)


def test_random_layouts_partition_the_grid():
    rng = np.random.default_rng(11)
    for _ in range(20):
        layout = random_layout(
            rng, int(rng.integers(0, 15)), 8 * int(rng.integers(1, 12)), 8 * int(rng.integers(1, 12))
        )
        assert layout.region_map.min() >= 0  # no cap reached with these sizes
        assert sorted(np.unique(layout.region_map).tolist()) == list(range(layout.n_slots))
        assert len(layout.texts) == len(layout.boxes) == len(layout.weights) == len(layout.union_masks)


@pytest.mark.parametrize(
    "boxes, texts, size, message",
    [
        ([[10, 0, 5, 8]], ["x"], (16, 16), "x2 < x1"),
        ([[0, 0, 8, 8]], [], (16, 16), "1 boxes but 0 texts"),
        ([[0, 0, 8, np.nan]], ["x"], (16, 16), "NaN"),
        ([[0, 0, 8, 8]], ["x"], (20, 16), "multiples of 8"),
        ([0, 0, 8], ["x"], (16, 16), "shape"),
    ],
)
def test_bad_input_fails_with_a_clear_message(boxes, texts, size, message):
    with pytest.raises(ValueError, match=message):
        reorganize_regions(np.array(boxes, dtype=float), texts, *size)


def test_latent_grid():
    assert latent_grid(512, 768) == (64, 96)
    with pytest.raises(ValueError):
        latent_grid(0, 8)
