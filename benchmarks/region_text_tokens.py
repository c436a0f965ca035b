"""How long region texts are in CLIP tokens: the figures behind the MM-DiT region-text encoder (docs/METHOD.md §10.3).

For real descriptions at hand offline (layout files in any format ``training.layout.files`` reads, e.g. the
release's demo ``{"bboxes", "labels"}``, and plain text files of one description per line), counts with
CLIP's own BPE (open_clip's ``SimpleTokenizer``: the vocabulary of CLIP-L / CLIP-G in SDXL, SD3 and FLUX)
the tokens of each description and of each *region text* (the descriptions of every object covering a
region, joined with ``"; "``, after region reorganization on the 16 px token grid), BOS and EOS included:
median, 95th percentile, maximum, the share longer than CLIP's 77 (cut), and the objects a cut drops.

    .venv/bin/python benchmarks/region_text_tokens.py --layouts demo.json --texts captions.txt

Prints a table, then one JSON line ``{"benchmark": "region_text_tokens", "figures": {...}, "targets": {...}}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.layout.regions import SEPARATOR
from training.model.encoding import N_TOKENS
from training.model.mmdit.encoding import token_layout

TARGETS = {"region_p95_fits_region_tokens": 128}  # the T5 budget of the MM-DiT presets (model.mmdit.region_tokens)


def clip_counter():
    """Tokens of a text with CLIP's BPE, BOS and EOS included."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text)) + 2


def read_layouts(path: Path) -> list[tuple[list, list[str], int, int]]:
    """(boxes, labels, height, width) of each layout of a JSON / JSONL file (``bboxes`` or ``boxes``)."""
    text = path.read_text()
    items = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
    out = []
    for item in items:
        boxes = item.get("boxes", item.get("bboxes"))
        height, width = item.get("height", 512), item.get("width", 512)
        out.append((boxes, list(item["labels"]), height, width))
    return out


def stats(counts: list[int]) -> dict:
    a = np.array(counts)
    return {"n": len(a), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "max": int(a.max()),
            "cut_at_77": round(float((a > N_TOKENS).mean()), 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="*", default=[], type=Path, help="layout files (JSON / JSONL)")
    parser.add_argument("--texts", nargs="*", default=[], type=Path, help="files of one description per line")
    args = parser.parse_args(argv)
    count = clip_counter()
    descriptions, regions, dropped = [], [], 0
    for path in args.layouts:
        for boxes, labels, height, width in read_layouts(path):
            descriptions += labels
            layout = token_layout(boxes, labels, height - height % 16, width - width % 16)
            for text in layout.texts:
                if not text:
                    continue  # the background's empty text
                regions.append(count(text))
                # A 77-token encoder keeps BOS, 75 tokens and EOS: an object whose segment starts after them is dropped.
                segments = text.split(SEPARATOR + " ")
                for k in range(1, len(segments)):
                    dropped += count(SEPARATOR.join(segments[:k]) + SEPARATOR) - 1 > N_TOKENS - 2
    for path in args.texts:
        descriptions += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    figures = {"descriptions": stats([count(d) for d in descriptions])}
    if regions:
        figures["region_texts"] = {**stats(regions), "objects_dropped_at_77": dropped}
    print(f"{'texts':<14} {'n':>4} {'median':>7} {'p95':>6} {'max':>5} {'> 77':>6}")
    for name, s in figures.items():
        print(f"{name:<14} {s['n']:>4} {s['median']:>7.1f} {s['p95']:>6.1f} {s['max']:>5} {s['cut_at_77']:>6.1%}")
    print(json.dumps({"benchmark": "region_text_tokens", "figures": figures, "targets": TARGETS}))


if __name__ == "__main__":
    main()
