"""``make demo``: the whole job end to end on this machine, offline, with tiny random-weight models.

synthetic raw images -> datagen (Ray Data on an embedded local Ray) -> shards -> validate + stats
report -> a few training steps of the regional-attention SDXL -> one generated image with its layout.

    python -m training.demo --out demo_out [--images 24] [--steps 4]

The models are the real architectures built from small configs with random weights, so captions,
boxes and the generated image are meaningless; every code path is the one used with real weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("richlayout.demo")

REPO = Path(__file__).resolve().parent.parent


def _step(title: str) -> float:
    log.info("== %s", title)
    return time.perf_counter()


def make_dataset(out: Path, n_images: int) -> Path:
    """Synthetic images -> datagen tiny pipeline -> shards; returns the dataset path."""
    from datagen.config import load_config
    from datagen.run import run
    from datagen.synthetic import make_image_folder
    from shards import validate_dataset

    raw = out / "raw_images"
    make_image_folder(raw, n_images, seed=0)
    # A few broken inputs, to show that every input is accounted for.
    (raw / "empty.jpg").write_bytes(b"")
    (raw / "not_an_image.jpg").write_text("this is text, not a JPEG")
    dataset = out / "dataset"
    cfg = load_config(REPO / "configs/datagen/tiny.yaml")
    summary = run(cfg, [str(raw)], str(dataset), new_run=True, progress=False)
    log.info("\n%s", summary.format())
    problems = validate_dataset(str(dataset))
    if problems:
        raise SystemExit("dataset failed validation:\n" + "\n".join(map(str, problems)))
    return dataset


def make_report(dataset: Path, out: Path) -> Path:
    """The static HTML report of the dataset."""
    from shards.report import main as report_main

    path = out / "report.html"
    if report_main([str(dataset), "--out", str(path)]) != 0:
        raise SystemExit("report failed")
    return path


def train(dataset: Path, out: Path, steps: int) -> Path:
    """A few training steps of the tiny regional-attention SDXL on the shards; returns the adapter path."""
    from training.trainer.config import load_train_config
    from training.trainer.loop import train as run_training

    cfg = load_train_config(
        REPO / "configs/train/tiny.yaml",
        overrides={
            "data.datasets": [{"path": str(dataset), "weight": 1.0,
                               "augment": {"size": [64, 64], "min_visibility": 0.3, "max_objects": 8}}],
            "train.max_steps": steps,
            "validation.every_steps": steps,
            "checkpoint.every_steps": steps,
            "output_dir": str(out / "train"),
        },
    )
    result = run_training(cfg)
    log.info("training: %d steps, losses %s; validation images %s", result.step,
             [round(v, 4) for v in result.losses], [str(p) for p in result.validation_images])
    return Path(result.ema_adapter_path or result.adapter_path)


def generate(adapter: Path, out: Path) -> Path:
    """One image from a layout with the trained tiny adapter, and its overlay."""
    from training.inference.generate import main as generate_main

    layouts = out / "layouts.jsonl"
    layout = {
        "id": "demo",
        "caption": "a red circle left of a blue square",
        "boxes": [[8, 16, 56, 64], [72, 24, 120, 96]],
        "labels": ["a red circle on the left", "a blue square on the right"],
        "height": 128,
        "width": 128,
    }
    layouts.write_text(json.dumps(layout) + "\n")
    gen = out / "generated"
    code = generate_main(["--tiny", "--layouts", str(layouts), "--out", str(gen), "--adapter", str(adapter),
                          "--steps", "4"])
    if code != 0:
        raise SystemExit("generation failed")
    return gen / "demo.png"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; print where everything is."""
    p = argparse.ArgumentParser(
        prog="python -m training.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_out", help="output folder (recreated)")
    p.add_argument("--images", type=int, default=24, help="synthetic input images")
    p.add_argument("--steps", type=int, default=4, help="training steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = _step("1/4 dataset: synthetic images -> datagen (Ray Data, tiny models) -> shards")
    dataset = make_dataset(out, args.images)
    _step("2/4 statistics report")
    report = make_report(dataset, out)
    _step("3/4 training steps on the shards")
    adapter = train(dataset, out, args.steps)
    _step("4/4 generation from a layout")
    gen = generate(adapter, out)

    from shards.__main__ import main as shards_main

    print(f"\ndataset: {dataset}")
    shards_main(["info", str(dataset)])
    print(f"report:    {report}")
    print(f"adapter:   {adapter}")
    print(f"generated: {gen}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
