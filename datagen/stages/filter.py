"""Stage 7b, filter: drop objects below the quality floors, keep the best ``max_objects``, fit each
description to CLIP's token budget; an image left without objects becomes a ``filtered`` row.

Floors (each ``None`` to disable; a score that was never measured, e.g. no mask, is not judged):
CLIP crop score, detector score, mask-box agreement (IoU of the SAM mask's tight box and the prompt
box). The description budget is counted in CLIP BPE tokens: CLIP reads 77 (75 between its start and
end tokens) and overlapping regions concatenate descriptions, so longer text is cut at the last
sentence that fits, or at a word when even the first sentence does not.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass

from shards import STATUS_FILTERED, STATUS_OK
from shards.config import ClipScore, PositiveInt, UnitFloat

from . import Batch, as_objects, run_rows
from .segment import mask_agreement

STAGE = "filter"
COLUMNS = ("objects", "status", "error_stage", "error")


@dataclass(frozen=True)
class FilterConfig:
    """Object quality floors and caps."""

    min_clip_score: ClipScore | None = 15.0  # 100 * cosine(crop, description), CLIP ViT-L/14 scale
    min_detector_score: UnitFloat | None = 0.3  # on top of the detector's own box threshold
    min_mask_agreement: UnitFloat | None = 0.5  # IoU(mask tight box, prompt box)
    max_objects: PositiveInt | None = 20  # best detector scores kept per image
    max_description_tokens: PositiveInt | None = 75  # CLIP BPE tokens a description may use
    batch_size: PositiveInt = 64  # rows per Ray batch (a hint for the pipeline)


class FilterStage:
    """Applies the floors to each ok row's objects; marks rows with none left ``filtered``."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        def apply(rows: list[int]) -> dict[str, list]:
            out: dict[str, list] = {c: [] for c in COLUMNS}
            for i in rows:
                objects, reason = self.filter_objects(as_objects(batch["objects"][i]))
                out["objects"].append(objects)
                out["status"].append(STATUS_FILTERED if reason else STATUS_OK)
                out["error_stage"].append(STAGE if reason else None)
                out["error"].append(reason)
            return out

        return run_rows(batch, STAGE, apply, COLUMNS)

    def filter_objects(self, objects: list[dict]) -> tuple[list[dict], str | None]:
        """The objects kept, and the reason when none is (else None)."""
        cfg = self.config
        if not objects:
            return [], "no objects detected"
        agreement = mask_agreement([o["box"] for o in objects], [o["mask_box"] for o in objects])
        kept, dropped = [], Counter()
        for obj, agree in zip(objects, agreement, strict=True):
            failed = self._failed_floor(obj, agree)
            if failed:
                dropped[failed] += 1
            else:
                kept.append(obj)
        if not kept:
            why = ", ".join(f"{n} with {floor}" for floor, n in sorted(dropped.items()))
            return [], f"no object passed the floors ({why})"
        if cfg.max_objects is not None:
            best = sorted(kept, key=lambda o: -_or(o["detector_score"], float("-inf")))[: cfg.max_objects]
            kept = [o for o in kept if any(o is b for b in best)]
        if cfg.max_description_tokens is not None:
            for obj in kept:
                if obj["description"]:
                    fitted = fit_tokens(obj["description"], cfg.max_description_tokens)
                    obj["description"] = fitted or obj["phrase"]
        return kept, None

    def _failed_floor(self, obj: dict, agreement: float) -> str | None:
        cfg = self.config
        if _below(obj["clip_score"], cfg.min_clip_score):
            return f"clip_score < {cfg.min_clip_score}"
        if _below(obj["detector_score"], cfg.min_detector_score):
            return f"detector_score < {cfg.min_detector_score}"
        if obj["mask"] is not None and _below(agreement, cfg.min_mask_agreement):
            return f"mask_agreement < {cfg.min_mask_agreement}"
        return None


def _below(value: float | None, floor: float | None) -> bool:
    return value is not None and floor is not None and value < floor


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip import SimpleTokenizer

    return SimpleTokenizer()


def count_tokens(text: str) -> int:
    """CLIP BPE tokens of ``text`` (without the start/end tokens)."""
    return len(_clip_tokenizer().encode(text))


def fit_tokens(text: str, budget: int) -> str:
    """``text`` cut to at most ``budget`` CLIP tokens: whole sentences when one fits, else words."""
    if count_tokens(text) <= budget:
        return text
    kept = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        longer = f"{kept} {sentence}".strip()
        if count_tokens(longer) > budget:
            break
        kept = longer
    if kept:
        return kept
    words = text.split()
    lo, hi = 0, len(words)  # the most words that fit: count is monotone in the prefix length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])
