"""Stage 3, caption: a global caption from the VLM, as a ``caption`` column (str, or None when the
model returns nothing usable). The source alt-text stays in ``source_caption``, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shards.config import PositiveInt

from ..models import ModelSpec, default_spec
from . import Batch, as_image, run_rows
from .vlm import ask, clean_text, load_chat_vlm

STAGE = "caption"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences: the main objects, their attributes and where they are."
)


@dataclass(frozen=True)
class CaptionConfig:
    """How the global caption is written."""

    model: ModelSpec = field(default_factory=lambda: default_spec("vlm"))
    prompt: str = DEFAULT_PROMPT  # the VLM's instruction
    max_new_tokens: PositiveInt = 96  # caption length cap in VLM tokens
    max_pixels: PositiveInt | None = 448 * 448  # images are downscaled to at most this area for the VLM
    generate_batch_size: PositiveInt = 16  # images per generate call
    batch_size: PositiveInt = 16  # rows per Ray batch (a hint for the pipeline)


class CaptionStage:
    """Adds ``caption`` to each ok row."""

    def __init__(self, config: CaptionConfig) -> None:
        self.config = config
        self.model, self.processor = load_chat_vlm(config.model)

    def __call__(self, batch: Batch) -> Batch:
        def caption(rows: list[int]) -> dict[str, list]:
            images = [as_image(batch["image"][i]) for i in rows]
            answers = ask(self.model, self.processor, images, self.config)
            return {"caption": [clean_caption(a) for a in answers]}

        return run_rows(batch, STAGE, caption, ("caption",))


def clean_caption(answer: str) -> str | None:
    """The answer with whitespace collapsed; None when it holds no word at all."""
    text = clean_text(answer)
    return text if any(c.isalpha() for c in text) else None
