"""Draw a layout (boxes, masks, labels) on an image with PIL: dataset galleries and validation images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import TABLEAU_COLORS, to_rgb
from PIL import Image, ImageDraw, ImageFont

from .reader import Sample

# Matplotlib's default cycle, so boxes match the colours of the report's plots and legends.
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(round(255 * c) for c in to_rgb(hex_)) for hex_ in TABLEAU_COLORS.values()
)
MASK_ALPHA = 0.4


def color(i: int) -> tuple[int, int, int]:
    """The RGB colour of object ``i`` (cycles through ``PALETTE``)."""
    return PALETTE[i % len(PALETTE)]


def color_hex(i: int) -> str:
    """``color(i)`` as ``#rrggbb``, for HTML legends."""
    return "#{:02x}{:02x}{:02x}".format(*color(i))


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # Black on light label backgrounds, white on dark ones (ITU-R BT.601 luma).
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)


def _shorten(label: str, max_chars: int) -> str:
    label = " ".join(str(label).split())
    return label if len(label) <= max_chars else label[: max_chars - 3].rstrip() + "..."


def _mask_edge(mask: np.ndarray) -> np.ndarray:
    # A pixel is on the edge when a 4-neighbour lies outside the mask (or outside the image).
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def draw_layout(
    image: Image.Image,
    boxes,
    labels: Sequence[str],
    masks: Sequence[np.ndarray | None] | None = None,
    *,
    max_size: int | None = None,
    max_chars: int = 40,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each object's mask tinted, box outlined and label written, in its colour.

    ``boxes``: (N, 4) xyxy pixels of ``image`` (array, list or CPU tensor); ``labels``: N strings, shortened
    to ``max_chars``; ``masks``: N bool (H, W) arrays or None. With ``max_size`` the image is first
    scaled down so its longer side is at most that, and boxes and masks with it, so labels stay legible.
    """
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    n = len(boxes)
    if len(labels) != n:
        raise ValueError(f"draw_layout: {n} boxes but {len(labels)} labels")
    if masks is not None and len(masks) != n:
        raise ValueError(f"draw_layout: {n} boxes but {len(masks)} masks")
    img = image.convert("RGB")
    w0, h0 = img.size
    for i, m in enumerate(masks or []):
        if m is not None and m.shape != (h0, w0):
            raise ValueError(f"draw_layout: mask {i} has shape {m.shape}, the image is {(h0, w0)} (h, w)")
    scale = 1.0
    if max_size is not None and max(w0, h0) > max_size:
        scale = max_size / max(w0, h0)
        img = img.resize((max(1, round(w0 * scale)), max(1, round(h0 * scale))), Image.LANCZOS)
    size = img.size
    pixels = np.asarray(img, dtype=np.float32).copy()
    for i, m in enumerate(masks or []):
        if m is None:
            continue
        m = _resize_mask(m, size) if scale != 1.0 else m.astype(bool)
        c = np.array(color(i), dtype=np.float32)
        pixels[m] = pixels[m] * (1 - MASK_ALPHA) + c * MASK_ALPHA
        pixels[_mask_edge(m)] = c
    out = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    line = max(2, round(min(size) / 160))
    font = ImageFont.load_default(size=font_size or max(11, round(min(size) / 22)))
    for i, (box, label) in enumerate(zip(boxes * scale, labels, strict=True)):
        x1, y1, x2, y2 = box
        draw.rectangle((x1, y1, x2, y2), outline=color(i), width=line)
        text = _shorten(label, max_chars)
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        # Above the box when there is room, else just inside its top edge; kept within the image.
        tx = min(max(0.0, x1), max(0.0, size[0] - tw))
        ty = y1 - th if y1 - th >= 0 else min(y1, size[1] - th)
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color(i))
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_color(color(i)), font=font)
    return out


def draw_sample(sample: Sample, max_size: int | None = 384, numbered: bool = True) -> Image.Image:
    """A shard sample drawn with its objects' masks, boxes and phrases (``"1. cat"`` when ``numbered``)."""
    objects = sample.record.objects
    labels = [f"{i + 1}. {o.phrase}" if numbered else o.phrase for i, o in enumerate(objects)]
    return draw_layout(sample.image(), [o.box for o in objects], labels, sample.masks(), max_size=max_size)
