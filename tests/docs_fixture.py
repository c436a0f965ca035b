"""The small files the docs' placeholders point at, made once per session for test_docs_commands.py:
synthetic images with release-format labels, COCO annotation files, a user module for ``from-python``,
two datasets (one from COCO, with a sample without objects), layouts, generated images, a pilot run record.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
from docs_blocks import REPO
from PIL import Image

MY_MODULE = '''"""The user's dataset of the docs' from-python examples: synthetic shapes with boxes, masks, labels."""
import numpy as np
from datagen.synthetic import make_image


def make_items():
    rng = np.random.default_rng(0)
    items = []
    for i in range(5):
        w, h = 96, 80
        img, objects = make_image(rng, w, h)
        if i == 4:  # as many objects as a tiny datagen run keeps (filter.max_objects 10): more than tiny models take
            objects = [{"box": [4.0 * k, 2.0 * k, 4.0 * k + 40, 2.0 * k + 40], "phrase": f"shape {k}"} for k in range(10)]
        masks = np.zeros((len(objects), h, w), np.uint8)
        for m, o in zip(masks, objects):
            x1, y1, x2, y2 = (int(v) for v in o["box"])
            m[y1:y2, x1:x2] = 1
        items.append({"image": np.asarray(img).transpose(2, 0, 1), "caption": "coloured shapes",
                      "bboxes": np.array([o["box"] for o in objects]), "masks": masks,
                      "labels": [f"a {o['phrase']} on a noisy background" for o in objects]})
    return items


make_dataset = make_items
'''

LAYOUTS = [  # 64x64: the tiny preset's size
    {"id": "beach", "caption": "a beach at sunset", "boxes": [[8, 8, 40, 56]], "labels": ["a red kite with a long tail"],
     "height": 64, "width": 64, "seed": 3},
    {"bboxes": [[4, 4, 60, 20], [10, 30, 50, 60]], "labels": ["a blue car parked by the road", "a dog"],
     "height": 64, "width": 64},
]


def _coco(root: Path, images: str, instances: str, captions: str, stuff: str | None) -> None:
    """Three COCO images: one with two objects (a polygon, a box), one with a crowd only, one with none."""
    (root / images).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / images / f"{name}.jpg")
    inst = {
        "images": [{"id": i + 1, "file_name": f"{n}.jpg", "width": 64, "height": 48} for i, n in enumerate("abc")],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10], "iscrowd": 0, "area": 100,
             "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 20, 20], "iscrowd": 0, "area": 400,
             "segmentation": []},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1, "area": 25,
             "segmentation": {"size": [48, 64], "counts": [0, 5, 43, 5, 43, 5, 43, 5, 43, 5, 2875]}},
        ],
    }
    files = {instances: inst, captions: {"annotations": [{"image_id": 1, "caption": "A cat and a dog."}]}}
    if stuff:
        files[stuff] = {"categories": [{"id": 92, "name": "grass"}], "annotations": [
            {"id": 9, "image_id": 1, "category_id": 92, "bbox": [0, 40, 64, 8], "iscrowd": 0,
             "segmentation": [[0, 40, 64, 40, 64, 48, 0, 48]]}]}
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))


def _release_labels(images: Path, labels: Path) -> None:
    """label_<image>.json for the first two images, boxes given at 768 px on the long side (RC-COCO's)."""
    labels.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("img_*.jpg"))[:2]:
        with Image.open(path) as im:
            w, h = im.size
        s = 768 / max(w, h)
        bbox = [round(w * 0.25 * s), round(h * 0.25 * s), round(w * 0.5 * s), round(h * 0.5 * s)]
        label = {"caption": "coloured shapes", "annos": [
            {"bbox": bbox, "category_name": "shape", "caption": "a shape in the middle", "pred_score": 0.5}]}
        (labels / f"label_{path.stem}.json").write_text(json.dumps(label))


def _generated(folder: Path) -> None:
    """What generate writes for LAYOUTS (images named by id, layouts.jsonl resolved), for evaluate."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    rows = []
    for i, layout in enumerate(LAYOUTS):
        row = {"id": layout.get("id", f"{i + 1:06d}"), "caption": layout.get("caption", ""),
               "boxes": layout.get("boxes") or layout["bboxes"], "labels": layout["labels"], "height": 64, "width": 64}
        rows.append(json.dumps(row))
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{row['id']}.png")
    (folder / "layouts.jsonl").write_text("\n".join(rows) + "\n")


def build_template(root: Path) -> None:
    """The files every block's working folder starts with (copied per block; see test_docs_commands)."""
    from datagen.synthetic import make_image_folder
    from shards import write_dataset
    from shards.__main__ import main as shards_main

    root.mkdir(parents=True)
    for name in ("configs", "benchmarks", "tests", ".venv", "Makefile", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "notebooks", root / "notebooks")  # executing a notebook writes beside it
    make_image_folder(root / "images", 6, seed=2, min_size=64, max_size=128)
    _release_labels(root / "images", root / "labels")
    (root / "my_module.py").write_text(MY_MODULE)
    (root / "my_data.py").write_text(MY_MODULE)
    _coco(root, "train2017", "instances_train2017.json", "captions_train2017.json", "stuff_train2017.json")
    _coco(root, "val2017", "annotations/instances_val2017.json", "annotations/captions_val2017.json", None)
    # loaded from its file, not through sys.path: the test process's imports stay as they were
    spec = importlib.util.spec_from_file_location("docs_my_module", root / "my_module.py")
    user_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_module)
    assert write_dataset(user_module.make_items(), str(root / "dataset"))["failures"] == 0
    coco = [f"--{name}={root / f'{name}_train2017.json'}" for name in ("instances", "stuff", "captions")]
    assert shards_main(["from-coco", *coco, f"--images={root / 'train2017'}", str(root / "coco_shards")]) == 0
    (root / "layouts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LAYOUTS))
    _generated(root / "tmp" / "gen")


def pilot_record(folder: Path) -> None:
    """A run record of configs/datagen/real.yaml as a pilot on one 8-GPU node would leave (made-up
    figures: no real pilot can run here), for ``datagen size --from``."""
    from collections import Counter

    from datagen.config import load_config
    from datagen.measurement import run_record, save_run_record
    from datagen.run import Summary

    busy = {"decode": (1000, 25.0), "tag": (1000, 100.0), "caption": (1000, 125.0), "ground": (1000, 100.0),
            "segment": (1000, 166.0), "describe": (1000, 666.0), "score": (1000, 25.0), "filter": (1000, 5.0),
            "pack": (1000, 40.0)}
    summary = Summary(output=str(folder), inputs=1000, shards_total=1, shards_written=1, processed=1000, busy=busy,
                      wall_seconds=400.0, nodes=1, statuses=Counter(ok=950, filtered=40, failed=10), objects=6650,
                      startup_seconds=90.0, startup_rows=64, failures=Counter({("decode", "empty file"): 10}))
    save_run_record(str(folder), run_record(summary, load_config(REPO / "configs/datagen/real.yaml")))
