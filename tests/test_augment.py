"""training.data.augment: geometry follows the pixels, flips swap left/right, visibility floor, K objects."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from shards.masks import encode_mask, mask_to_box
from training.data.augment import augment, plan_crop, swap_left_right, transform_boxes
from training.data.config import AugmentConfig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rect_scene(sw: int, sh: int, box: tuple[int, int, int, int]) -> tuple[Image.Image, np.ndarray]:
    """A black image with a white rectangle, and the rectangle's mask."""
    mask = np.zeros((sh, sw), dtype=bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    pixels = np.repeat(mask[..., None], 3, axis=2).astype(np.uint8) * 255
    return Image.fromarray(pixels), mask


@st.composite
def scenes(draw):
    sw, sh = draw(st.integers(24, 160)), draw(st.integers(24, 160))
    x1, y1 = draw(st.integers(0, sw - 12)), draw(st.integers(0, sh - 12))
    x2, y2 = draw(st.integers(x1 + 12, sw)), draw(st.integers(y1 + 12, sh))
    th, tw = 8 * draw(st.integers(2, 10)), 8 * draw(st.integers(2, 10))
    lo = draw(st.floats(1.0, 1.5))
    cfg = AugmentConfig(
        size=(th, tw),
        scale=(lo, draw(st.floats(lo, 1.6))),
        crop=draw(st.sampled_from(["random", "center"])),
        flip_prob=draw(st.sampled_from([0.0, 1.0])),
        min_visibility=0.0,
        max_objects=None,
        masks=True,
    )
    return (sw, sh, (x1, y1, x2, y2), cfg, draw(st.integers(0, 2**32 - 1)))


def _assert_follows(out, tol_img: float, tol_mask: float) -> None:
    """The kept box matches the white pixels and the transformed mask."""
    (box,) = out.boxes
    white = out.pixels[..., 0] > 127
    # A sliver thinner than a pixel may vanish in resampling; every edge is then within a pixel anyway.
    if white.sum() >= 4:
        assert np.allclose(mask_to_box(white), box, atol=tol_img), (mask_to_box(white), box)
    mask_box = mask_to_box(out.masks[0])
    if mask_box is not None:
        assert np.allclose(mask_box, box, atol=tol_mask), (mask_box, box)
    # The mask and the pixels agree except on a one-pixel border.
    assert (out.masks[0] != white).sum() <= 2 * (out.pixels.shape[0] + out.pixels.shape[1]) + 4


@FAST
@given(scenes())
def test_boxes_and_masks_follow_every_augmentation(scene):
    sw, sh, box, cfg, seed = scene
    image, mask = rect_scene(sw, sh, box)
    out = augment(
        image,
        np.array([box], dtype=float),
        ["a white box"],
        "a photo",
        cfg,
        np.random.default_rng(seed),
        masks=[encode_mask(mask)],
    )
    assume(len(out.boxes) == 1)  # the rectangle may be cropped away entirely
    assert out.pixels.shape == (*cfg.size, 3) and out.masks.shape == (1, *cfg.size)
    assert out.flipped == (cfg.flip_prob == 1.0)
    _assert_follows(out, tol_img=1.5, tol_mask=1.01)


@FAST
@given(scenes())
def test_boxes_follow_a_jpeg_decoded_at_reduced_size(scene):
    # Large sources shrink by > 2x, so the JPEG is decoded at 1/2..1/8 size (draft) before resizing.
    sw, sh, box, cfg, seed = scene
    k = 8
    image, mask = rect_scene(sw * k, sh * k, tuple(v * k for v in box))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    cfg = AugmentConfig(**{**cfg.__dict__, "scale": (1.0, 1.0)})
    out = augment(
        jpeg, np.array([box], dtype=float) * k, ["x"], "", cfg, np.random.default_rng(seed), masks=[mask]
    )
    assert jpeg.size[0] < sw * k  # decoded at reduced size (draft) since the plan shrinks it > 2x
    assume(len(out.boxes) == 1)
    _assert_follows(out, tol_img=2.0, tol_mask=1.01)


@FAST
@given(
    th=st.integers(1, 8),
    tw=st.integers(1, 8),
    extra=st.integers(0, 40),
    wide=st.booleans(),
    flip=st.booleans(),
    crop=st.sampled_from(["random", "center"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_without_zoom_the_output_is_the_crop_and_sdxl_offsets_match(th, tw, extra, wide, flip, crop, seed):
    # One side of the source equals the target's, the other is longer: the resize is the identity.
    th, tw = 8 * th, 8 * tw
    sh, sw = (th, tw + extra) if wide else (th + extra, tw)
    cfg = AugmentConfig(size=(th, tw), crop=crop, flip_prob=float(flip), max_objects=None)
    src = np.random.default_rng(seed).integers(0, 255, (sh, sw, 3), dtype=np.uint8)
    out = augment(
        Image.fromarray(src), np.zeros((0, 4)), [], "", cfg, np.random.default_rng(seed), original_size=(7, 9)
    )
    plan = plan_crop((sh, sw), cfg, np.random.default_rng(seed))
    assert (plan.win_h, plan.win_w) == (th, tw)
    window = src[plan.y0 : plan.y0 + th, plan.x0 : plan.x0 + tw]
    top, left = out.crop_top_left
    assert out.original_size == (7, 9) and out.target_size == (th, tw)
    if flip:
        assert np.array_equal(out.pixels, window[:, ::-1])
        # Measured in the mirrored image: the window's left edge there is sw - (left + tw).
        assert (top, left) == (plan.y0, sw - plan.x0 - tw)
        assert np.array_equal(src[:, ::-1][top : top + th, left : left + tw], out.pixels)
    else:
        assert np.array_equal(out.pixels, window)
        assert (top, left) == (plan.y0, plan.x0)


def test_visibility_floor_keeps_exactly_the_objects_at_or_above_it():
    # 96x48 source, 48x48 center crop, no zoom: the crop is x in [24, 72).
    image = Image.new("RGB", (96, 48))
    boxes = np.array(
        [
            [0, 0, 48, 48],  # half inside: visibility 0.5
            [0, 0, 36, 48],  # 12 of 36 columns inside: 1/3
            [30, 8, 60, 40],  # fully inside: 1
            [0, 0, 20, 48],  # fully outside: 0
        ],
        dtype=float,
    )
    texts = ["half", "third", "inside", "outside"]
    for floor, expect in [(0.0, ["half", "third", "inside"]), (0.5, ["half", "inside"]), (0.51, ["inside"])]:
        cfg = AugmentConfig(
            size=(48, 48), crop="center", flip_prob=0.0, min_visibility=floor, max_objects=None
        )
        out = augment(image, boxes, texts, "", cfg, np.random.default_rng(0))
        assert out.texts == expect, floor
    # Kept boxes are clipped to the crop and shifted by its offset.
    assert np.allclose(out.boxes, [[6, 8, 36, 40]]) and out.crop_top_left == (0, 24)


@FAST
@given(st.data())
def test_visibility_floor_property(data):
    sw, sh = data.draw(st.integers(16, 100)), data.draw(st.integers(16, 100))
    n = data.draw(st.integers(1, 8))
    raw = np.array(data.draw(st.lists(st.tuples(*[st.floats(0, 1)] * 4), min_size=n, max_size=n)))
    x = np.sort(raw[:, [0, 2]], axis=1) * sw
    y = np.sort(raw[:, [1, 3]], axis=1) * sh
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1] + 1, y[:, 1] + 1], axis=1)
    floor = data.draw(st.floats(0, 1))
    cfg = AugmentConfig(
        size=(16, 16), scale=(1.0, 1.3), min_visibility=floor, max_objects=None, flip_prob=0.0
    )
    out = augment(
        Image.new("RGB", (sw, sh)), boxes, [str(i) for i in range(n)], "", cfg, np.random.default_rng(1)
    )
    plan = plan_crop((sh, sw), cfg, np.random.default_rng(1))
    sx, sy = plan.sx, plan.sy
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * sx * sy
    shifted = (boxes - [plan.x0, plan.y0, plan.x0, plan.y0]) * [sx, sy, sx, sy]
    ix = np.clip(np.minimum(shifted[:, 2], 16) - np.maximum(shifted[:, 0], 0), 0, None)
    iy = np.clip(np.minimum(shifted[:, 3], 16) - np.maximum(shifted[:, 1], 0), 0, None)
    vis = ix * iy / area
    expect = [str(i) for i in range(n) if vis[i] >= floor and vis[i] > 0]
    assert out.texts == expect


def test_at_most_k_objects_drawn_with_the_seeded_generator():
    image = Image.new("RGB", (64, 64))
    boxes = np.array([[i, i, i + 8, i + 8] for i in range(0, 50, 2)], dtype=float)  # 25 objects
    texts = [f"o{i}" for i in range(25)]
    cfg = AugmentConfig(size=(64, 64), flip_prob=0.0, min_visibility=0.0, max_objects=5)

    def kept(seed):
        return augment(image, boxes, texts, "", cfg, np.random.default_rng(seed)).object_index.tolist()

    assert kept(3) == kept(3)
    draws = [kept(s) for s in range(20)]
    assert all(len(d) == 5 and d == sorted(d) and len(set(d)) == 5 for d in draws)
    assert len({tuple(d) for d in draws}) > 10  # a random subset, not the first five
    out = augment(image, boxes, texts, "", cfg, np.random.default_rng(3))
    assert out.texts == [texts[i] for i in out.object_index]
    assert np.allclose(out.boxes, boxes[out.object_index])


@pytest.mark.parametrize(
    "text, expect",
    [
        ("a cat on the left of a dog", "a cat on the right of a dog"),
        ("The Left side; the right hand", "The Right side; the left hand"),
        ("TOP LEFT corner", "TOP RIGHT corner"),
        ("the leftmost cup, turning rightward", "the rightmost cup, turning leftward"),
        ("upper-left and lower-right", "upper-right and lower-left"),
        ("left-hand glove", "right-hand glove"),
        ("left and right", "right and left"),
        ("a person facing left", "a person facing right"),
        ("a bright light, copyright 2020", "a bright light, copyright 2020"),
        ("no direction at all", "no direction at all"),
    ],
)
def test_flip_swaps_left_and_right_keeping_case_and_word_boundaries(text, expect):
    assert swap_left_right(text) == expect
    assert swap_left_right(expect) == text


@pytest.mark.parametrize("text", ["she left the room", "all right then", "he has left", "Right now, a dog"])
def test_flip_refuses_texts_where_left_or_right_is_not_spatial(text):
    assert swap_left_right(text) is None


_PHRASES = [
    "on the left",
    "to the right of the table",
    "upper-left",
    "the Right hand",
    "LEFT side",
    "a cat",
    "bright",
]


@FAST
@given(st.lists(st.sampled_from(_PHRASES), min_size=1, max_size=5), st.sampled_from([", ", " and ", "; "]))
def test_swap_is_an_involution_and_changes_only_the_direction_words(parts, sep):
    text = sep.join(parts)
    swapped = swap_left_right(text)
    assert swapped is not None and swap_left_right(swapped) == text
    assert swapped.lower().count("left") == text.lower().count("right") - text.lower().count("bright")


def test_flip_swaps_descriptions_and_caption_or_does_not_flip():
    image = Image.new("RGB", (32, 32))
    image.putpixel((0, 0), (255, 0, 0))
    boxes = np.array([[0, 0, 8, 8], [16, 0, 32, 32]], dtype=float)
    cfg = AugmentConfig(size=(32, 32), flip_prob=1.0, min_visibility=0.0, max_objects=None)
    out = augment(
        image,
        boxes,
        ["a red dot on the left", "a wall"],
        "A wall, Left of it a dot",
        cfg,
        np.random.default_rng(0),
    )
    assert out.flipped and not out.flip_refused
    assert out.texts == ["a red dot on the right", "a wall"] and out.caption == "A wall, Right of it a dot"
    assert np.allclose(out.boxes, [[24, 0, 32, 8], [0, 0, 16, 32]])
    assert tuple(out.pixels[0, 31]) == (255, 0, 0)
    out = augment(
        image, boxes, ["a red dot", "a wall"], "the dog left the room", cfg, np.random.default_rng(0)
    )
    assert not out.flipped and out.flip_refused
    assert out.caption == "the dog left the room" and np.allclose(out.boxes, boxes)
    assert tuple(out.pixels[0, 0]) == (255, 0, 0)


def test_transform_boxes_reports_visible_fraction():
    cfg = AugmentConfig(size=(16, 16), crop="center", flip_prob=0.0)
    plan = plan_crop((16, 32), cfg, np.random.default_rng(0))  # left = 8
    boxes, vis = transform_boxes(np.array([[0, 0, 16, 16], [8, 0, 24, 16]]), plan)
    assert np.allclose(vis, [0.5, 1.0]) and np.allclose(boxes, [[0, 0, 8, 16], [0, 0, 16, 16]])
