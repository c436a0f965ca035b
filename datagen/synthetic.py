"""Synthetic input images (coloured shapes on textured backgrounds) for the demo, tests and benchmarks.

No data set can be downloaded here, so the demo makes its own raw images. They are real image files
(JPEG/PNG of varying sizes), so every decode path runs exactly as on user data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")


def make_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[dict]]:
    """One image with 1-4 shapes; returns the image and its ground-truth objects (box, phrase)."""
    base = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        s = int(rng.integers(min(width, height) // 6, min(width, height) // 2))
        x, y = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        box = (x, y, x + s, y + s)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=COLORS[color])
        objects.append({"box": [float(v) for v in box], "phrase": f"{color} {shape}"})
    return img, objects


def make_image_folder(folder: str | Path, n: int, seed: int = 0, min_size: int = 96, max_size: int = 256) -> list[Path]:
    """Write ``n`` synthetic images (JPEG and PNG, varied sizes), each with its caption in a ``.txt`` of the
    same name (the folder convention ``datagen.inputs`` reads as the source caption); return the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        img, objects = make_image(rng, w, h)
        ext = "png" if i % 4 == 3 else "jpg"
        path = folder / f"img_{i:04d}.{ext}"
        img.save(path, quality=92) if ext == "jpg" else img.save(path)
        path.with_suffix(".txt").write_text("a picture of " + " and ".join(o["phrase"] for o in objects) + "\n")
        paths.append(path)
    return paths
