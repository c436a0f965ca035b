"""A hand-made two-shard dataset whose statistics are known, for the stats, report and notebook tests.

Shard 000000: ``s0a`` (64x48, two objects), ``s0b`` (32x32, one object with a phrase only), two decode
failures with the same cause and one filtered input. Shard 000001: ``s1a`` (no objects), ``s1b`` (one
object covering the image) and one grounding failure. Shard 000002 has a parquet but no stats file:
incomplete, so it is left out by default. The expected values are written out in ``EXPECTED``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards import ObjectRecord, SampleRecord, ShardWriter, encode_mask

FOG_SENTENCE = "The cat sat on the mat. It was a beautiful animal."
# 11 words, 2 sentences; complex (3+ syllables): beau-ti-ful, an-i-mal.
FOG_VALUE = 0.4 * (11 / 2 + 100 * 2 / 11)

EXPECTED = {
    "status": {"ok": 4, "failed": 3, "filtered": 1},
    "objects_per_image": {"s0a": 2, "s0b": 1, "s1a": 0, "s1b": 1},
    # Object order: s0a/0, s0a/1, s0b/0, s1b/0.
    "area": [0.25, 0.25, 0.5, 1.0],
    "aspect": [32 / 24, 32 / 24, 0.5, 2.0],
    "words": [11, 4, 1, 3],
    "fog": [FOG_VALUE, 0.4 * 4, 0.4 * 1, 0.4 * 3],
    "unique_words": {"s0a": 13, "s0b": 1, "s1b": 2},
}


def picture(w: int, h: int, boxes: list[tuple], seed: int) -> bytes:
    """A JPEG with a soft background and one filled ellipse per box, so drawn layouts can be checked by eye."""
    rng = np.random.default_rng(seed)
    base = rng.integers(120, 220, size=3)
    ramp = np.linspace(0.7, 1.0, h)[:, None, None]
    pixels = (np.broadcast_to(base, (h, w, 3)) * ramp).astype(np.uint8)
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    for box in boxes:
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, size=3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def box_mask(w: int, h: int, box: tuple) -> dict:
    """COCO RLE of a filled box."""
    m = np.zeros((h, w), dtype=bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = True
    return encode_mask(m)


def sample(key: str, w: int, h: int, objects: list[dict]) -> tuple[SampleRecord, bytes]:
    """A record and its picture."""
    rec = SampleRecord(
        key=key,
        width=w,
        height=h,
        original_width=w * 2,
        original_height=h * 2,
        source=f"/data/img/{key}.jpg",
        caption=f"a picture called {key}",
        objects=tuple(ObjectRecord(**o) for o in objects),
    )
    return rec, picture(w, h, [o["box"] for o in objects], seed=len(key) + w)


def write_dataset(root: Path) -> Path:
    """Write the dataset described in the module docstring into ``root`` (created) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    with ShardWriter(str(root), 0) as w:
        w.add(*sample("s0a", 64, 48, [
            {"box": (0, 0, 32, 24), "phrase": "cat", "description": FOG_SENTENCE, "detector_score": 0.9,
             "mask": box_mask(64, 48, (0, 0, 32, 24)), "mask_score": 0.8, "clip_score": 30.0},
            {"box": (32, 24, 64, 48), "phrase": "Dog", "description": "A small brown dog.",
             "detector_score": 0.5, "clip_score": 20.0},
        ]))
        w.add(*sample("s0b", 32, 32, [{"box": (0, 0, 16, 32), "phrase": "cat", "detector_score": 0.7}]))
        w.add_failure("f0", "/data/img/17.jpg", "decode", "OSError: cannot identify image file '/data/img/17.jpg'")
        w.add_failure("f1", "/data/img/18.jpg", "decode", "OSError: cannot identify image file '/data/img/18.jpg'")
        w.add_failure("f2", "/data/img/19.jpg", "filter", "no object left after 3 filters", status="filtered")
    with ShardWriter(str(root), 1) as w:
        w.add(*sample("s1a", 40, 20, []))
        w.add(*sample("s1b", 40, 20, [
            {"box": (0, 0, 40, 20), "phrase": "dog", "description": "dog dog cat", "detector_score": 0.6,
             "mask": box_mask(40, 20, (0, 0, 40, 20)), "mask_score": 0.9, "clip_score": 25.0},
        ]))
        w.add_failure("f3", "/data/img/20.jpg", "ground", "RuntimeError: CUDA out of memory\nat line 3")
    with ShardWriter(str(root), 2) as w:
        w.add(*sample("s2a", 40, 20, []))
    (root / "000002.stats.json").unlink()
    return root
