"""Make ``docs/report.png``, the README's picture of ``python -m shards report``.

    .venv/bin/python docs/make_report_png.py                      # two synthetic datasets, made here
    .venv/bin/python docs/make_report_png.py RUN_DIR COCO_DIR     # real datasets side by side

The picture is the report's key figure (the paper's four panels) above a strip of the sample gallery.
Without arguments it builds two small synthetic datasets (``datagen.synthetic`` images, template
descriptions, made-up scores): one with rich descriptions, one with phrases only, as COCO would be.
Their names say they are synthetic, so the picture shows the report's layout, not a result.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datagen.synthetic import make_image
from shards import ObjectRecord, SampleRecord, ShardWriter, encode_mask, iter_samples
from shards.draw import draw_sample
from shards.report import figure_png, load_datasets, paper_figure

SIZES = ("small", "large", "bright", "matte", "shiny", "faded", "tilted", "round-edged")
PLACES = (
    "near the top edge",
    "in the lower left corner",
    "at the centre",
    "on the right side",
    "below the middle",
)
EXTRAS = (
    "its surface catches the light unevenly",
    "partially overlapping a neighbouring object",
    "with a slightly irregular outline against the textured background",
    "casting no visible shadow",
    "its colour contrasting clearly with the surroundings",
)


def _mask(shape: str, box: list[float], w: int, h: int) -> np.ndarray:
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "square":
        draw.rectangle(box, fill=1)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x1, y2), (x2, y2)], fill=1)
    return np.asarray(im, dtype=bool)


def _description(rng: np.random.Generator, phrase: str, others: list[str]) -> str:
    text = f"A {rng.choice(SIZES)} {phrase} {rng.choice(PLACES)}"
    if others:
        text += f", next to the {rng.choice(others)}"
    for extra in rng.choice(EXTRAS, size=int(rng.integers(0, 3)), replace=False):
        text += f", {extra}"
    return text + "."


def make_synthetic(root: Path, rich: bool, n: int = 240, shard_size: int = 60, seed: int = 0) -> Path:
    """A dataset of ``n`` synthetic images; ``rich``: template descriptions, else phrases only."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in range(n // shard_size):
        with ShardWriter(str(root), shard) as writer:
            for i in range(shard * shard_size, (shard + 1) * shard_size):
                key = f"img_{i:05d}"
                roll = rng.random()
                if roll < 0.04:
                    writer.add_failure(
                        key, f"/raw/{key}.jpg", "decode", f"OSError: image file '/raw/{key}.jpg' is truncated"
                    )
                    continue
                if roll < 0.07:
                    writer.add_failure(
                        key,
                        f"/raw/{key}.jpg",
                        "filter",
                        "no box above the CLIP floor 20.0",
                        status="filtered",
                    )
                    continue
                w, h = (int(v) for v in rng.integers(192, 321, size=2))
                image, objects = make_image(rng, w, h)
                phrases = [o["phrase"] for o in objects]
                records = []
                for j, o in enumerate(objects):
                    others = phrases[:j] + phrases[j + 1 :]
                    records.append(
                        ObjectRecord(
                            box=tuple(o["box"]),
                            phrase=o["phrase"],
                            description=_description(rng, o["phrase"], others) if rich else None,
                            detector_score=float(rng.uniform(0.3, 0.95)),
                            mask=encode_mask(_mask(o["phrase"].split()[-1], o["box"], w, h)),
                            mask_score=float(rng.uniform(0.75, 0.99)),
                            clip_score=float(rng.normal(29 if rich else 24, 3)),
                        )
                    )
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=90)
                caption = "a picture of " + " and ".join(phrases)
                record = SampleRecord(
                    key=key,
                    width=w,
                    height=h,
                    original_width=w,
                    original_height=h,
                    source=f"/raw/{key}.jpg",
                    caption=caption,
                    objects=tuple(records),
                )
                writer.add(record, buf.getvalue())
    return root


def compose(paths: list[str], out: Path, strip: int = 5) -> Path:
    """Paper figure on top, ``strip`` drawn samples of the first dataset below, one PNG."""
    figure = Image.open(io.BytesIO(figure_png(paper_figure(load_datasets(paths, 1000)), dpi=110))).convert(
        "RGB"
    )
    tiles = [draw_sample(s, max_size=320) for _, s in zip(range(strip), iter_samples(paths[0]), strict=False)]
    tile_w = (figure.width - 20 * (strip + 1)) // strip
    tiles = [t.resize((tile_w, round(t.height * tile_w / t.width)), Image.LANCZOS) for t in tiles]
    strip_h = max(t.height for t in tiles) + 40
    canvas = Image.new("RGB", (figure.width, figure.height + strip_h), "white")
    canvas.paste(figure, (0, 0))
    for i, t in enumerate(tiles):
        canvas.paste(t, (20 + i * (tile_w + 20), figure.height + 20))
    out.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette keeps the README picture small; the noisy synthetic photos barely change.
    canvas.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", help="dataset folders (default: two synthetic ones made here)")
    p.add_argument("--out", default=str(Path(__file__).with_name("report.png")))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.datasets or [
            str(make_synthetic(Path(tmp) / "synthetic-descriptions", rich=True)),
            str(make_synthetic(Path(tmp) / "synthetic-phrases", rich=False, seed=1)),
        ]
        print(f"wrote {compose(paths, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
