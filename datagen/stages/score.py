"""Stage 7a, score: the open_clip score of each object's crop against its description.

``clip_score`` = 100 * cosine(CLIP image embedding of the box crop, CLIP text embedding of the
description, or of the phrase when there is none). CLIP reads 77 tokens: the tokenizer truncates
longer descriptions, so the score judges what a CLIP-conditioned model would see. Crops and texts of
all the objects of a batch are encoded together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from shards.config import PositiveInt

from ..models import ModelSpec, default_spec, load_model
from ..scoring import clip_crop_scores, crop_box
from . import Batch, as_image, as_objects, run_rows

STAGE = "score"


@dataclass(frozen=True)
class ScoreConfig:
    """How crops are scored."""

    model: ModelSpec = field(default_factory=lambda: default_spec("clip"))
    encode_batch_size: PositiveInt = 64  # crops (and texts) per CLIP forward
    batch_size: PositiveInt = 16  # rows per Ray batch (a hint for the pipeline)


class ScoreStage:
    """Fills ``clip_score`` of every object of each ok row."""

    def __init__(self, config: ScoreConfig) -> None:
        self.config = config
        self.model, (self.preprocess, self.tokenizer) = load_model(config.model)

    def __call__(self, batch: Batch) -> Batch:
        def score(rows: list[int]) -> dict[str, list]:
            objects = [as_objects(batch["objects"][i]) for i in rows]
            crops, texts = [], []
            for k, objs in enumerate(objects):
                image = as_image(batch["image"][rows[k]]) if objs else None
                for obj in objs:
                    crops.append(Image.fromarray(crop_box(image, obj["box"], at_least_one_pixel=True)))
                    texts.append(obj["description"] or obj["phrase"])
            scores = iter(self.scores(crops, texts))
            for objs in objects:
                for obj in objs:
                    obj["clip_score"] = next(scores)
            return {"objects": objects}

        return run_rows(batch, STAGE, score, ("objects",))

    def scores(self, crops: list[Image.Image], texts: list[str]) -> list[float]:
        """100 * cosine(image, text) for each (crop, text) pair (``datagen.scoring``, as evaluation)."""
        return clip_crop_scores(
            self.model, self.preprocess, self.tokenizer, crops, texts, self.config.encode_batch_size
        ).tolist()
