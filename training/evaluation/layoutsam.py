"""LayoutSAM-Eval's region scores (CreatiLayout's benchmark): ``training.evaluate --protocol layoutsam``.

As the benchmark's scorer (``score_layoutsam_benchmark.py``), for every box of every row of the LayoutSAM-Eval
parquet (``training.layout.layoutsam``): the box normalised by the row's size (``round(x / width, 3)``, held
as float32 as its loader's tensors are), times the generated image's side (``resolution``, 512 as its
scorer; a generated image of another size is refused) in float32, cast to int (truncation); that crop of
the generated image goes to a VLM with the benchmark's yes/no questions: is the subject (the region caption,
``/`` removed) present, and only when it is, do its colour, texture and shape agree with the detailed
caption. An answer holding "Yes" or "yes" scores 1. Each of the four scores is summed over all boxes of all
images and divided by the number of boxes (box-weighted, not a mean of per-image means).

The VLM: a native transformers chat VLM through datagen's wrapper (``datagen.stages.vlm``: the processor's
chat template, greedy decoding), Qwen2.5-VL by default. The published table used MiniCPM-V 2.6, whose code
is remote (``trust_remote_code``) and written for transformers 4: ``engine="minicpm"`` loads it, only with
``trust_remote_code`` set by hand, in an environment of its own (training/GENERATE.md). Scores of any
other VLM are marked not comparable with the published table.

Where we differ from the scorer, on purpose: a crop without pixels (a box that truncates to zero width or
height, or a NaN) scores 0 with its error instead of reaching the VLM; a missing or unreadable generated
image scores its boxes 0 with the reason (the scorer would stop); answers are greedy (its MiniCPM call
keeps ``chat``'s default, sampling: ``minicpm_sampling`` restores that).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datagen.models import ModelSpec
from shards.config import PositiveInt
from training.layout.layoutsam import LayoutSamRow, is_layoutsam, read_layoutsam

log = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTES",
    "LAYOUTSAM",
    "SCORES",
    "LayoutSamConfig",
    "Question",
    "attribute_question",
    "benchmark_rows",
    "box_weighted",
    "check_sizes",
    "crop_box",
    "presence_question",
    "said_yes",
    "score_chunk",
]

LAYOUTSAM = "layoutsam"  # the protocol's name in training.evaluate
ATTRIBUTES = ("color", "texture", "shape")
SCORES = ("spatial", *ATTRIBUTES)  # the scorer's names: spatial is the presence question
MINICPM = "openbmb/MiniCPM-V-2_6"
NOT_COMPARABLE = ("not comparable with the published table: it was scored by MiniCPM-V 2.6 (this run: {vlm}, "
                  "engine {engine})")  # fmt: skip


@dataclass(frozen=True)
class LayoutSamConfig:
    """The ``layoutsam`` section of an evaluate preset."""

    # the VLM: a transformers chat VLM (hub id, local folder; backend tiny: datagen's tiny-qwen2.5-vl)
    vlm: ModelSpec = ModelSpec("vlm", "Qwen/Qwen2.5-VL-7B-Instruct")
    # transformers: the native chat VLM above; minicpm: MiniCPM-V 2.6's remote code (vlm.name its hub id or
    # folder), needs trust_remote_code and transformers 4 (its own venv)
    engine: Literal["transformers", "minicpm"] = "transformers"
    trust_remote_code: bool = False  # only with engine minicpm, set by hand: runs the model repository's code
    minicpm_sampling: bool = False  # minicpm: MiniCPM chat's default sampling as the scorer calls it (else greedy)
    resolution: PositiveInt = 512  # the generated images' side (the scorer's 512); another size is refused
    max_new_tokens: PositiveInt = 32  # answer length cap (the answer is meant to be "Yes" or "No")
    batch_size: PositiveInt = 8  # questions per generate call (transformers engine; 1: one at a time)


@dataclass(frozen=True)
class Question:
    """One question about one crop: what an answerer sees."""

    crop: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    box: tuple[int, int, int, int]  # the crop's int box in the generated image
    text: str


Answerer = Callable[[Sequence[Question]], list[str]]


def presence_question(region: str) -> str:
    """The scorer's spatial question about a region caption (its ``/`` removed, as the scorer does)."""
    subject = region.replace("/", "")
    return (f'Is the subject "{subject}" present in the image? Strictly answer with "Yes" or "No", '
            "without any irrelevant words.")  # fmt: skip


def attribute_question(attribute: str, region: str, detail: str) -> str:
    """The scorer's colour / texture / shape question (both captions without ``/``)."""
    subject, description = region.replace("/", ""), detail.replace("/", "")
    return (f'Is the subject in "{subject}" in the image consistent with the {attribute} described in the '
            f'detailed description: "{description}"? Strictly answer with "Yes" or "No", without any '
            f'irrelevant words. If the {attribute} is not mentioned in the detailed description, the answer '
            'is "Yes".')  # fmt: skip


def said_yes(answer: str) -> bool:
    """The scorer's rule: "Yes" or "yes" anywhere in the answer (so "YES" does not count, "eyes" does)."""
    return "Yes" in answer or "yes" in answer


def crop_box(box: Sequence[float], resolution: int) -> tuple[int, int, int, int]:
    """The scorer's crop box: the normalised box as float32 (its loader's array, collated into a float32
    tensor) times the side in float32, each cast to int (truncation toward zero). In float64 some boxes
    land one pixel off (0.57 x 100 is 56.99... in float64, 57.0 in float32)."""
    scaled = np.asarray(box, dtype=np.float64).astype(np.float32) * np.float32(resolution)
    if not np.isfinite(scaled).all():
        raise ValueError(f"box {list(map(float, box))} is not finite")
    return tuple(int(v) for v in scaled)  # type: ignore[return-value]


def _crop(image: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """``PIL.Image.crop`` (outside the image: black), refused when it has no pixels (nothing to ask about)."""
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"crop {list(box)} has no pixels")
    return np.asarray(image.crop(box))


def benchmark_rows(layouts: str | Path) -> list[LayoutSamRow]:
    """The LayoutSAM-Eval rows of ``--layouts`` (its parquet: the questions need both captions of each box)."""
    if not is_layoutsam(layouts):
        raise ValueError(f"--layouts {layouts}: the layoutsam protocol reads the LayoutSAM-Eval parquet (a .parquet "
                         "file or a folder of them): its region and detailed captions are the questions")  # fmt: skip
    return read_layoutsam(layouts)[0]


def check_sizes(found: dict[str, Path | None], resolution: int) -> None:
    """Every generated image found is ``resolution`` x ``resolution`` (headers only, before any model
    loads): the scorer scales every box to that side, so another size would score the wrong pixels."""
    from PIL import Image, UnidentifiedImageError

    for path in found.values():
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                size = im.size
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            continue  # unreadable: scored 0 with its error when loaded
        if size != (resolution, resolution):
            raise ValueError(
                f"{path}: {size[0]}x{size[1]}, but the layoutsam protocol scores {resolution}x{resolution} "
                "images (boxes are scaled to that side, as the benchmark's scorer): generate at that size or "
                f"give --resolution {size[0]} for square images"
            )


def _rows_of(row: LayoutSamRow, image_error: str | None) -> list[dict]:
    return [
        {"image": row.id, "file_name": row.file_name, "image_id": row.image_id, "object": j,
         "region_caption": region, "detail_caption": detail,
         "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
         "crop_x1": None, "crop_y1": None, "crop_x2": None, "crop_y2": None,
         **dict.fromkeys(SCORES, 0.0), **{f"answer_{s}": None for s in SCORES}, "error": image_error}
        for j, (box, region, detail) in enumerate(zip(row.boxes, row.regions, row.details, strict=True))
    ]  # fmt: skip


def score_chunk(chunk: Sequence[tuple[LayoutSamRow, Any, str | None]], answer: Answerer, resolution: int) -> list[dict]:
    """The box rows of a few rows' images (a PIL image, or None and why): every box a row, scored by
    ``answer``: the presence question for every crop first, then the three attribute questions for the
    crops whose subject is present."""
    out: list[dict] = []
    asked: list[tuple[dict, Question]] = []
    for row, image, error in chunk:
        boxes = _rows_of(row, error)
        out += boxes
        if image is None:
            continue
        for entry, box in zip(boxes, row.boxes, strict=True):
            try:
                crop = crop_box(box, resolution)
                entry.update(zip(("crop_x1", "crop_y1", "crop_x2", "crop_y2"), crop, strict=True))
                pixels = _crop(image, crop)
            except ValueError as err:
                entry["error"] = f"empty crop: {err}"
                continue
            asked.append((entry, Question(pixels, crop, presence_question(entry["region_caption"]))))
    present = []
    for (entry, question), text in zip(asked, answer([q for _, q in asked]), strict=True):
        entry["answer_spatial"], entry["spatial"] = text, float(said_yes(text))
        if said_yes(text):
            present += [(entry, a, Question(question.crop, question.box,
                         attribute_question(a, entry["region_caption"], entry["detail_caption"])))
                        for a in ATTRIBUTES]  # fmt: skip
    for (entry, attribute, _), text in zip(present, answer([q for _, _, q in present]), strict=True):
        entry[f"answer_{attribute}"], entry[attribute] = text, float(said_yes(text))
    return out


def box_weighted(table: Any) -> dict:
    """The benchmark's figures: each score summed over every box, divided by the number of boxes."""
    boxes = len(table)
    sums = {s: float(table[s].sum()) for s in SCORES}
    return {**{s: sums[s] / boxes for s in SCORES}, "sums": sums, "boxes": boxes}


def _per_image(table: Any) -> list[dict]:
    """The scorer's per-image record: box count and the four sums, by file_name."""
    grouped = table.groupby("file_name", sort=False)
    counts, sums = grouped.size(), grouped[list(SCORES)].sum()
    return [{"file_name": name, "bbox_count": int(counts[name]), **{f"score_{s}": float(sums.loc[name, s])
             for s in SCORES}} for name in counts.index]  # fmt: skip


class MiniCpmAnswerer:
    """MiniCPM-V 2.6's ``chat`` as the benchmark's scorer calls it: one message per question, the crop then
    the question, ``image=None``. Greedy unless ``minicpm_sampling`` (chat's own default: top-p sampling;
    its ``sampling=False`` is a 3-beam search, so greedy sets one beam and no repetition penalty)."""

    def __init__(self, model: Any, tokenizer: Any, cfg: LayoutSamConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg

    @classmethod
    def load(cls, cfg: LayoutSamConfig) -> MiniCpmAnswerer:
        """The model and tokenizer from ``cfg.vlm.name``: only with ``trust_remote_code`` given by hand,
        and only under transformers 4 (its code predates 5)."""
        if not cfg.trust_remote_code:
            raise ValueError("layoutsam engine minicpm runs the model repository's own Python code: give "
                             "--trust-remote-code (after reading that code); it is never on by default")  # fmt: skip
        import transformers

        if int(transformers.__version__.split(".")[0]) >= 5:
            raise ValueError(f"MiniCPM-V 2.6's remote code is written for transformers 4, this environment has "
                             f"{transformers.__version__}: run it in its own venv (training/GENERATE.md)")  # fmt: skip
        from transformers import AutoModel, AutoTokenizer

        spec = cfg.vlm
        try:
            model = AutoModel.from_pretrained(spec.name, revision=spec.revision, trust_remote_code=True,
                                              attn_implementation="sdpa", torch_dtype=spec.resolved_dtype())  # fmt: skip
            tokenizer = AutoTokenizer.from_pretrained(spec.name, revision=spec.revision, trust_remote_code=True)
        except OSError as err:
            raise ValueError(f"layoutsam.vlm {spec.name!r}: cannot load: {' '.join(str(err).split())}") from None
        return cls(model.to(spec.resolved_device()).eval(), tokenizer, cfg)

    def __call__(self, questions: Sequence[Question]) -> list[str]:
        """One ``chat`` call per question, in order."""
        from PIL import Image

        options = {} if self.cfg.minicpm_sampling else {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}
        return [
            self.model.chat(image=None, msgs=[{"role": "user", "content": [Image.fromarray(q.crop), q.text]}],
                            tokenizer=self.tokenizer, max_new_tokens=self.cfg.max_new_tokens, **options)
            for q in questions
        ]  # fmt: skip


def build_answerer(cfg: LayoutSamConfig) -> tuple[Answerer, str]:
    """The configured VLM as an answerer, and its name for the summary."""
    if cfg.engine == "minicpm":
        return MiniCpmAnswerer.load(cfg), cfg.vlm.name
    if cfg.trust_remote_code:
        raise ValueError("layoutsam.trust_remote_code is only for engine minicpm (a native VLM needs no remote code)")
    from datagen.stages.vlm import generate, load_chat_vlm

    try:
        model, processor = load_chat_vlm(cfg.vlm)  # refuses a processor without a chat template
    except OSError as err:  # not a folder, not in the cache offline, no such hub id
        raise ValueError(f"layoutsam.vlm {cfg.vlm.name!r}: cannot load: {' '.join(str(err).split())}") from None

    def answer(questions: Sequence[Question]) -> list[str]:
        if not questions:
            return []
        return generate(model, processor, [q.crop for q in questions], [q.text for q in questions],
                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)  # fmt: skip

    return answer, cfg.vlm.name


def evaluate_layoutsam(cfg: Any, rows: list[LayoutSamRow], found: dict[str, Path | None], out: Path,
                       load: Callable, answer: Answerer | None = None) -> dict:  # fmt: skip
    """Score every box; write the box table, the per-image records and ``summary.json`` into ``out``.

    ``cfg``: an ``EvalConfig`` (its ``layoutsam`` section, ``chunk_images``, ``table_format``); ``found``:
    each row id's image (None: missing); ``load(path, row)``: ``(PIL image or None, error)``; ``answer``:
    the VLM (default: ``build_answerer(cfg.layoutsam)``).
    """
    import pandas as pd
    from tqdm import tqdm

    ls: LayoutSamConfig = cfg.layoutsam
    check_sizes(found, ls.resolution)
    vlm = ls.vlm.name
    if answer is None:
        answer, vlm = build_answerer(ls)
    comparable = ls.engine == "minicpm"
    start = time.perf_counter()
    records: list[dict] = []
    for first in tqdm(range(0, len(rows), cfg.chunk_images), desc="layoutsam", unit="chunk"):
        chunk = [(r, *load(found[r.id], r)) for r in rows[first : first + cfg.chunk_images]]
        records += score_chunk(chunk, answer, ls.resolution)
    table = pd.DataFrame(records)
    if table.empty:
        raise ValueError("the LayoutSAM rows hold no boxes: nothing to score")
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / f"boxes.{cfg.table_format}"
    if cfg.table_format == "parquet":
        table.to_parquet(table_path, index=False)
    else:
        table.to_csv(table_path, index=False)
    images_path = out / "images.jsonl"
    images_path.write_text("".join(json.dumps(r) + "\n" for r in _per_image(table)))
    failed = table[table["error"].notna()]
    note = ("MiniCPM-V 2.6 as the published table" + ("" if ls.minicpm_sampling else
            "; greedy answers where its scorer samples (layoutsam.minicpm_sampling)")
            if comparable else NOT_COMPARABLE.format(vlm=vlm, engine=ls.engine))  # fmt: skip
    summary = {
        "protocol": LAYOUTSAM,
        **box_weighted(table),
        "images": len(rows),
        "images_missing": int(sum(p is None for p in found.values())),
        "failed_boxes": len(failed),
        "failures_by_reason": dict(sorted(Counter(e.split(":")[0] for e in failed["error"]).items())),
        "vlm": vlm,
        "engine": ls.engine,
        "comparable_with_published_table": comparable,
        "comparability": note,
        "resolution": ls.resolution,
        "seconds": round(time.perf_counter() - start, 3),
        "table": str(table_path),
        "images_table": str(images_path),
        "config": dataclasses.asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if not comparable:
        log.warning("layoutsam scores %s", note)
    if summary["images_missing"]:
        log.warning("%d of %d images missing: their boxes scored 0", summary["images_missing"], len(rows))
    if len(failed):
        log.warning("%d of %d boxes scored 0 unasked: %s", len(failed), len(table), summary["failures_by_reason"])
    return summary
