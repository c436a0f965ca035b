"""A user's own dataset, in the form the release's README asks of a training dataset, written as shards.

Each item is a dict (what the release's ``__getitem__`` returns)::

    {"image_path": str,                # read when "image" is absent
     "image": (c, h, w) array/tensor,  # float in [0, 1] or uint8; wins over image_path (the boxes refer to it)
     "caption": str,
     "bboxes": (N, 4) xyxy pixels of the image,
     "masks": (N, h, w) (optional; > 0.5 is inside),
     "labels": N strings (the rich descriptions)}

``write_dataset(items, out)`` takes an iterable or a map-style dataset (``__len__`` + ``__getitem__``) and
accounts for every item: a sample, or a failed row in the shard's parquet with the reason.
``python -m shards from-python module:function OUT`` does the same with what ``function()`` returns.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dataset import open_run
from .masks import encode_mask, mask_to_box
from .schema import ObjectRecord, SampleRecord
from .writer import DatasetWriter

log = logging.getLogger(__name__)

__all__ = ["load_callable", "write_dataset"]

_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}


def _array(value: Any, name: str) -> np.ndarray:
    """A numpy array from an array, a torch tensor (duck-typed: shards does not import torch) or a list."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"field {name!r} is not an array: {err}") from None


def _image_bytes(item: dict) -> tuple[bytes, str, int, int]:
    """Encoded image, its extension and its size, from ``image`` (c, h, w) or else ``image_path``."""
    if item.get("image") is not None:
        arr = _array(item["image"], "image")
        if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
            raise ValueError(f"field 'image' must have shape (c, h, w) with c in 1, 3, 4; got {arr.shape}")
        if arr.dtype == np.uint8:
            pixels = arr
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ValueError(
                    f"field 'image': float values must be in [0, 1], got [{arr.min()}, {arr.max()}]"
                )
            pixels = np.round(arr * 255).astype(np.uint8)
        else:
            raise ValueError(f"field 'image' must be uint8 or float in [0, 1], got {arr.dtype}")
        pixels = pixels.transpose(1, 2, 0)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).convert("RGB").save(buf, "PNG")
        return buf.getvalue(), "png", pixels.shape[1], pixels.shape[0]
    path = item.get("image_path")
    if not path:
        raise ValueError("give 'image' (c, h, w) or 'image_path'")
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        width, height = im.size
        ext = _EXTS.get(Path(path).suffix.lower().lstrip("."))
        if ext is None:  # another format: stored as PNG
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    return data, ext, width, height


def item_to_sample(item: object, key: str, source: str) -> tuple[SampleRecord, bytes, str]:
    """One item as a validated record and its encoded image; ValueError names the field at fault."""
    if not isinstance(item, dict):
        raise ValueError(f"an item must be a dict, got {type(item).__name__}")
    data, ext, width, height = _image_bytes(item)
    boxes = _array(item.get("bboxes", []), "bboxes").astype(np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"field 'bboxes' must have shape (N, 4) xyxy, got {boxes.shape}")
    labels = item.get("labels", [])
    labels = list(labels) if not isinstance(labels, str) else [labels]
    if len(labels) != len(boxes) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"field 'labels' must be {len(boxes)} strings (one per box), got {labels!r}")
    masks = item.get("masks")
    mask_arr = None
    if masks is not None and len(masks):
        mask_arr = _array(masks, "masks")
        if mask_arr.shape != (len(boxes), height, width):
            raise ValueError(
                f"field 'masks' must have shape (N, h, w) = {(len(boxes), height, width)}, got {mask_arr.shape}"
            )
    caption = item.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"field 'caption' must be a string, got {type(caption).__name__}")
    objects = []
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        mask = mask_box = None
        if mask_arr is not None:
            m = mask_arr[i] > 0.5
            mask, mask_box = encode_mask(m), mask_to_box(m)
        objects.append(ObjectRecord(box=tuple(box.tolist()), phrase=label, description=label, mask=mask,
                                    mask_box=mask_box))  # fmt: skip
    record = SampleRecord(key=key, width=width, height=height, original_width=width, original_height=height,
                          source=source, source_caption=caption, objects=tuple(objects))  # fmt: skip
    return record, data, ext


def _items(items: Iterable | Any) -> Iterator[tuple[int, object, BaseException | None]]:
    """``(index, item, error)``: a map-style dataset by index (one bad index does not stop the rest), else
    by iteration (an iterator that raises cannot go on: its error is the last entry)."""
    if hasattr(items, "__len__") and hasattr(items, "__getitem__") and not isinstance(items, dict | str):
        for i in range(len(items)):
            try:
                yield i, items[i], None
            except Exception as err:  # noqa: BLE001 - user code: any error becomes that item's failed row
                yield i, None, err
        return
    iterator = iter(items)
    i = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - as above
            yield i, None, err
            return
        yield i, item, None
        i += 1


def write_dataset(items: Iterable | Any, out: str, *, shard_size: int = 1000, name: str = "python") -> dict:
    """Write a user's items (see the module docstring) as a shard dataset; return counts.

    Keys are the item index (``000000042``); ``source`` is the image path (or ``name[index]``). Every item
    becomes a sample or a failed row (stage ``read`` when getting the item failed, ``convert`` when it does
    not have the form above), so ``samples + failures`` is the number of items.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not (hasattr(items, "__iter__") or hasattr(items, "__getitem__")):
        raise ValueError(f"{name}: expected an iterable or a map-style dataset, got {type(items).__name__}")
    open_run(out, {"kind": "user-dataset", "source": name, "shard_size": shard_size})
    with DatasetWriter(out, shard_size) as writer:
        for i, item, error in _items(items):
            key = f"{i:09d}"
            source = str(item.get("image_path") or f"{name}[{i}]") if isinstance(item, dict) else f"{name}[{i}]"
            try:
                if error is not None:
                    raise error
                writer.add(*item_to_sample(item, key, source))
            except Exception as err:  # noqa: BLE001 - user data: every item ends as a sample or a failed row
                stage = "read" if error is not None or isinstance(err, OSError) else "convert"
                writer.add_failure(key, source, stage, f"{type(err).__name__}: {err}")
                log.warning("%s: item %d: %s", name, i, err)
    counts = writer.counts
    return {"items": counts["samples"] + counts["failures"], **counts}


def load_callable(spec: str) -> Any:
    """``module:function`` or ``path/to/file.py:function`` -> the function (the user's own code, named on
    the command line)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r}: expected module:function or file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path:  # as `python -m` does: modules in the working directory are importable
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{spec!r}: cannot import {module_name!r}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {module_name} has no function {attr!r}")
    return fn
