"""Collate augmented samples and their region layouts into fixed-shape tensors.

Every tensor has a fixed shape for a given config (``max_slots`` region slots, ``max_objs`` objects and
segments per slot), so batches stack, pin and move to the device without per-batch shape logic.
Strings (captions, region texts) stay Python lists, padded to the same slot count with "".

Batch fields (B samples, output size H x W, latent grid h x w = H/8 x W/8, S = max_slots, K = max_objs):

=========================  ======================  =============================================
field                      shape, dtype            meaning
=========================  ======================  =============================================
pixels                     (B, 3, H, W) uint8      RGB; normalize_pixels() gives the VAE's input
pixel_values               (B, 3, H, W) float32    instead of ``pixels`` with ``pixel_format: float``:
                                                   RGB in [-1, 1], made by the loader's main process
original_size              (B, 2) int64            (height, width) of the source image (SDXL)
crops_coords_top_left      (B, 2) int64            (top, left) of the crop in the resized image
target_size                (B, 2) int64            (height, width) of pixel_values
caption                    list[str]               global caption, left/right swapped if flipped
key                        list[str]               sample key, for tracing
flipped                    (B,) bool
object_boxes               (B, K, 4) float32       kept objects, xyxy output pixels, 0-padded
object_count               (B,) int64
object_texts               list[list[str]]         per sample, ``object_count`` texts
instance_masks (optional)  (B, K, H, W) bool       each object's pixel mask, when the augment config asks for masks
region_map                 (B, h, w) int64         slot of each latent cell, -1: region dropped
region_texts               list[list[str]]         per sample S texts, "" for background/padding
slot_mask                  (B, S) bool             True for a real slot (background included; none
                                                   in the empty layout)
background_slot            (B,) int64              slot of the background region, -1 if none
region_boxes               (B, S, K, 4) float32    normalized boxes per joined segment, -1 padded
region_weights             (B, S, K) float32       per segment weight, 0 padded
segment_mask               (B, S, K) bool          True for a real segment
region_union_masks         (B, S, h, w) bool       OR of the slot's boxes (whole grid: background)
stream_position            (B, 2) int64            (epoch, position) in the stream's global order
                                                   (added by training.data.stages, not by collate)
=========================  ======================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.data.augment import Augmented
from training.layout.regions import RegionLayout, pad_layouts


@dataclass
class Example:
    """One sample ready to batch: its augmentation and its region layout."""

    key: str
    aug: Augmented
    layout: RegionLayout


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (0..255) -> float32 in [-1, 1], the VAE's input range; do it on the device."""
    return pixels.float().div_(127.5).sub_(1.0)


def collate(examples: list[Example], max_slots: int, max_objs: int) -> dict:
    """Stack examples into the fixed tensors listed in the module docstring (``pixels`` in uint8)."""
    batch: dict = {
        "pixels": torch.stack([torch.from_numpy(e.aug.pixels).permute(2, 0, 1) for e in examples]),
        "original_size": torch.tensor([e.aug.original_size for e in examples], dtype=torch.int64),
        "crops_coords_top_left": torch.tensor([e.aug.crop_top_left for e in examples], dtype=torch.int64),
        "target_size": torch.tensor([e.aug.target_size for e in examples], dtype=torch.int64),
        "caption": [e.aug.caption for e in examples],
        "key": [e.key for e in examples],
        "flipped": torch.tensor([e.aug.flipped for e in examples], dtype=torch.bool),
    }
    obj_boxes = np.zeros((len(examples), max_objs, 4), dtype=np.float32)
    for i, e in enumerate(examples):
        n = min(len(e.aug.boxes), max_objs)
        obj_boxes[i, :n] = e.aug.boxes[:n]
    batch["object_boxes"] = torch.from_numpy(obj_boxes)
    batch["object_count"] = torch.tensor(
        [min(len(e.aug.texts), max_objs) for e in examples], dtype=torch.int64
    )
    batch["object_texts"] = [e.aug.texts[:max_objs] for e in examples]
    if examples[0].aug.masks is not None:
        h, w = examples[0].aug.target_size
        masks = np.zeros((len(examples), max_objs, h, w), dtype=bool)
        for i, e in enumerate(examples):
            masks[i, : min(len(e.aug.masks), max_objs)] = e.aug.masks[:max_objs]
        batch["instance_masks"] = torch.from_numpy(masks)  # not "object_masks": the gligen inputs use that name for slots
    regions = pad_layouts([e.layout for e in examples], max_slots, max_objs)
    batch["region_texts"] = regions.pop("region_texts")
    batch.update({name: torch.from_numpy(array) for name, array in regions.items()})
    return batch
