"""Training augmentation: shorter-side resize, random or center crop, horizontal flip.

Geometry is one affine map per sample, ``x_out = (x_src - x0) * sx`` (then ``W - x_out`` when flipped),
applied alike to the pixels (one antialiased resize of the crop window), to the boxes and to the masks,
so they cannot drift apart. Objects whose box keeps less than ``min_visibility`` of its area inside the
crop are dropped; at most ``max_objects`` are kept, drawn with the sample's seeded generator.

A flip mirrors the scene, so "left" and "right" trade places in every description and in the caption.
When a text uses either word in a way that is not clearly spatial ("she left the room", "all right"),
swapping could corrupt it, and the sample is not flipped at all.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shards.masks import decode_mask
from training.data.config import AugmentConfig

# Words before "left"/"right" that make it spatial: articles/possessives ("the left"), prepositions
# ("to left"), positions ("upper right") and verbs of direction ("facing left").
_SPATIAL_BEFORE = re.compile(
    r"(?:\b(?:the|to|on|at|from|its|his|her|their|your|my|our|far|extreme|upper|lower|top|bottom|"
    r"middle|center|centre|front|back|rear|toward|towards|slightly|facing|faces|face|looking|looks|"
    r"look|pointing|points|point|leaning|leans|lean|tilted|tilting|tilts|turned|turning|turns|turn|"
    r"heading|headed|moving|moves|bent|bends|veering)\s+|[-/])$",
    re.IGNORECASE,
)
# ...or words after it ("left side", "right of", "left-hand", "left and right").
_SPATIAL_AFTER = re.compile(
    r"^(?:\s*[-/]|\s+of\b|\s+(?:and|or)\s+(?:left|right)\b|\s+(?:side|sides|hand|corner|corners|edge|"
    r"edges|half|part|end|wall|window|door|arm|arms|leg|legs|eye|eyes|ear|ears|foot|feet|shoulder|"
    r"wing|lane|panel|portion|area|background|foreground|border|margin|column|page)\b)",
    re.IGNORECASE,
)
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)
# "left and right": the second word is spatial because the first one is.
_PAIR_BEFORE = re.compile(r"\b(?:left|right)\s+(?:and|or)\s+$", re.IGNORECASE)


def _is_spatial(text: str, m: re.Match) -> bool:
    if m.group(2):  # leftmost, rightward(s): only ever spatial
        return True
    before, after = text[: m.start()], text[m.end() :]
    return bool(_SPATIAL_BEFORE.search(before) or _PAIR_BEFORE.search(before) or _SPATIAL_AFTER.match(after))


def _mirror_word(word: str) -> str:
    other = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return other.upper()
    if word[0].isupper():
        return other.capitalize()
    return other


def swap_left_right(text: str) -> str | None:
    """``text`` with "left" and "right" swapped (case kept), or None when a use is not clearly spatial."""
    matches = list(_LEFT_RIGHT.finditer(text))
    if not all(_is_spatial(text, m) for m in matches):
        return None
    return _LEFT_RIGHT.sub(lambda m: _mirror_word(m.group(1)) + (m.group(2) or ""), text)


@dataclass(frozen=True)
class CropPlan:
    """Crop the source window ``(x0, y0, win_w, win_h)``, resize it to ``size``, maybe flip.

    The map is ``x_out = (x_src - x0) * sx`` with ``sx = width / win_w`` (``y`` likewise), then
    ``width - x_out`` when flipped. An integer window makes the crop exact and lets one antialiased
    resize of just the window do the work; ``sx`` and ``sy`` differ by under a pixel's rounding.
    """

    x0: int
    y0: int
    win_w: int
    win_h: int
    size: tuple[int, int]  # output (height, width)
    flip: bool

    @property
    def sx(self) -> float:
        return self.size[1] / self.win_w

    @property
    def sy(self) -> float:
        return self.size[0] / self.win_h

    def window(self) -> tuple[int, int, int, int]:
        """The crop as (x1, y1, x2, y2) in source pixels."""
        return (self.x0, self.y0, self.x0 + self.win_w, self.y0 + self.win_h)

    def crop_top_left(self, src_width: int) -> tuple[int, int]:
        """SDXL's crop offset (top, left) in the resized image, measured in the mirrored one if flipped."""
        left = src_width - self.x0 - self.win_w if self.flip else self.x0
        return (round(self.y0 * self.sy), round(left * self.sx))


def plan_crop(src_size: tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator) -> CropPlan:
    """Draw the zoom, the crop position and the flip for a source image of (height, width)."""
    sh, sw = src_size
    th, tw = cfg.size
    scale = max(th / sh, tw / sw) * rng.uniform(*cfg.scale)
    win_w, win_h = min(sw, max(1, round(tw / scale))), min(sh, max(1, round(th / scale)))
    if cfg.crop == "random":
        y0, x0 = int(rng.integers(0, sh - win_h + 1)), int(rng.integers(0, sw - win_w + 1))
    else:
        y0, x0 = (sh - win_h) // 2, (sw - win_w) // 2
    flip = bool(rng.random() < cfg.flip_prob)
    return CropPlan(x0=x0, y0=y0, win_w=win_w, win_h=win_h, size=(th, tw), flip=flip)


def transform_boxes(boxes: np.ndarray, plan: CropPlan) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) xyxy in source pixels -> (boxes clipped to the output, visible fraction of each)."""
    h, w = plan.size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b = (b - [plan.x0, plan.y0, plan.x0, plan.y0]) * [plan.sx, plan.sy, plan.sx, plan.sy]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = np.clip(b, 0, [w, h, w, h])
    visible = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    frac = np.divide(visible, area, out=np.zeros_like(area), where=area > 0)
    if plan.flip:
        c = np.stack([w - c[:, 2], c[:, 1], w - c[:, 0], c[:, 3]], axis=1)
    return c.astype(np.float32), frac


def transform_pixels(rgb: Image.Image, plan: CropPlan) -> np.ndarray:
    """The (H, W, 3) uint8 output: the window, resized (antialiased bilinear) and maybe flipped."""
    # Cropping in PIL first: numpy then copies only the window out of the image (via tobytes).
    window = np.asarray(rgb.crop(plan.window()))
    with warnings.catch_warnings():
        # PIL's buffer is read-only and torch warns about that; nothing below writes to it.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(window).permute(2, 0, 1)
    resized = (plan.win_h, plan.win_w) != plan.size
    if resized:
        # torch's uint8 antialiased kernel applies PIL's bilinear filter at 2-3x its speed.
        t = F.interpolate(t[None], size=plan.size, mode="bilinear", antialias=True)[0]
    if plan.flip:
        t = t.flip(-1)  # several times faster than numpy's copy through a negative stride
    elif not resized:
        t = t.clone()  # own, writable memory
    return t.permute(1, 2, 0).numpy()


def transform_mask(mask: np.ndarray, plan: CropPlan) -> np.ndarray:
    """A (H, W) bool mask through the same window, nearest-neighbour, and flip."""
    h, w = plan.size
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST, box=plan.window())
    out = np.asarray(im) > 127
    return out[:, ::-1] if plan.flip else out


def load_for_plan(image: Image.Image, plan: CropPlan) -> tuple[Image.Image, CropPlan]:
    """Decode ``image`` (opened, not loaded) as RGB, using JPEG DCT scaling when the plan shrinks it.

    A JPEG reduced at least twofold decodes 2-8x faster at 1/2..1/8 size; the window is rescaled to
    the smaller image (rounded to whole pixels: under half an output pixel).
    """
    sw, sh = image.size
    if image.format == "JPEG" and min(plan.sx, plan.sy) <= 0.5:
        image.draft("RGB", (math.ceil(sw * plan.sx), math.ceil(sh * plan.sy)))
    if image.mode == "RGB":
        image.load()  # convert() would copy an image that is already RGB
        rgb = image
    else:
        rgb = image.convert("RGB")
    if rgb.size == (sw, sh):
        return rgb, plan
    fx, fy = rgb.size[0] / sw, rgb.size[1] / sh
    x0, y0 = round(plan.x0 * fx), round(plan.y0 * fy)
    win_w = max(1, min(rgb.size[0] - x0, round(plan.win_w * fx)))
    win_h = max(1, min(rgb.size[1] - y0, round(plan.win_h * fy)))
    return rgb, CropPlan(x0, y0, win_w, win_h, plan.size, plan.flip)


@dataclass
class Augmented:
    """One augmented sample: output pixels, the objects kept and SDXL's size conditioning."""

    pixels: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (N, 4) float32 xyxy in output pixels
    texts: list[str]  # per kept object, left/right swapped when flipped
    caption: str
    masks: np.ndarray | None  # (N, H, W) bool, or None when masks were not asked for
    object_index: np.ndarray  # (N,) indices of the kept objects in the record
    original_size: tuple[int, int]  # (height, width) of the source before any resize
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized (and flipped) image
    target_size: tuple[int, int]  # (height, width) of the output
    flipped: bool
    flip_refused: bool  # a flip was drawn but a text's left/right was ambiguous


def select_objects(visible: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Indices of the objects above the visibility floor, at most K of them, drawn with ``rng``."""
    keep = np.flatnonzero((visible >= cfg.min_visibility) & (visible > 0))
    if cfg.max_objects is not None and len(keep) > cfg.max_objects:
        keep = np.sort(rng.choice(keep, size=cfg.max_objects, replace=False))
    return keep


def _transform_masks(masks: list[np.ndarray | dict | None], plan: CropPlan) -> np.ndarray:
    out = np.zeros((len(masks), *plan.size), dtype=bool)
    for i, m in enumerate(masks):
        if m is not None:  # an object without a mask keeps an empty one: no shape is invented
            out[i] = transform_mask(decode_mask(m) if isinstance(m, dict) else m, plan)
    return out


def augment(
    image: Image.Image,
    boxes: np.ndarray,
    texts: list[str],
    caption: str,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    *,
    original_size: tuple[int, int] | None = None,
    masks: Sequence[np.ndarray | dict | None] | None = None,
) -> Augmented:
    """Augment one sample; ``image`` may be opened lazily (JPEG draft decoding is used when it helps).

    ``masks``, when given, is aligned with ``boxes``: (H, W) bool arrays, COCO RLE dicts or None (an
    empty mask). Only the kept objects' masks are decoded and transformed.
    """
    src_size = (image.height, image.width)
    plan = plan_crop(src_size, cfg, rng)
    out_boxes, visible = transform_boxes(boxes, plan)
    keep = select_objects(visible, cfg, rng)
    kept_texts = [texts[i] for i in keep]
    refused = False
    if plan.flip:
        swapped = [swap_left_right(t) for t in [caption, *kept_texts]]
        if any(t is None for t in swapped):
            refused = True
            plan = replace(plan, flip=False)
            out_boxes, _ = transform_boxes(boxes, plan)
        else:
            caption, kept_texts = swapped[0], swapped[1:]
    rgb, pixel_plan = load_for_plan(image, plan)
    return Augmented(
        pixels=transform_pixels(rgb, pixel_plan),
        boxes=out_boxes[keep],
        texts=kept_texts,
        caption=caption,
        masks=None if masks is None else _transform_masks([masks[i] for i in keep], plan),
        object_index=keep,
        original_size=original_size or src_size,
        crop_top_left=plan.crop_top_left(src_size[1]),
        target_size=plan.size,
        flipped=plan.flip,
        flip_refused=refused,
    )
