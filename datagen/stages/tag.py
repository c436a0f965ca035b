"""Stage 2, tag: the phrases the detector is asked to ground, as a ``tags`` column (list[str]).

Taggers are plugged in by name (``TagConfig.method``), never by class path:
- "vlm" (default): the VLM lists the visible objects; its answer is parsed into a clean, deduplicated
  phrase list. An answer that is a sentence gives its noun phrases; when nothing usable comes back,
  the source caption's noun phrases stand in (``caption_fallback``).
- "caption": noun phrases of the source caption (alt-text), by a deterministic heuristic.
A new tagger (e.g. a RAM tagging model) registers with ``@register_tagger("name")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from shards.config import PositiveInt

from ..models import ModelSpec, default_spec
from . import Batch, as_image, run_rows
from .vlm import ask, load_chat_vlm

STAGE = "tag"
DEFAULT_PROMPT = (
    "List the distinct objects visible in this image as a comma-separated list of short noun phrases "
    "(at most three words each). Answer with the list only."
)


@dataclass(frozen=True)
class TagConfig:
    """Where the phrases to ground come from."""

    method: str = "vlm"  # a registered tagger: "vlm" or "caption"
    model: ModelSpec = field(default_factory=lambda: default_spec("vlm"))  # used by "vlm"
    prompt: str = DEFAULT_PROMPT  # the VLM's instruction
    max_new_tokens: PositiveInt = 64  # length of the VLM's list
    max_pixels: PositiveInt | None = 448 * 448  # images are downscaled to at most this area for the VLM
    generate_batch_size: PositiveInt = 16  # images per generate call
    max_tags: PositiveInt = 20  # phrases kept per image, in order of appearance
    max_words: PositiveInt = 4  # longer phrases are sentences, not object names: dropped
    caption_fallback: bool = True  # "vlm": use the source caption's phrases when the list parses empty
    batch_size: PositiveInt = 16  # rows per Ray batch (a hint for the pipeline)


Tagger = Callable[[Sequence[np.ndarray], Sequence[str | None]], list[list[str]]]
TAGGERS: dict[str, Callable[[TagConfig], Tagger]] = {}


def register_tagger(name: str) -> Callable:
    """Register a tagger factory ``factory(config) -> tagger(images, captions) -> tags`` by name."""

    def register(factory: Callable[[TagConfig], Tagger]) -> Callable[[TagConfig], Tagger]:
        TAGGERS[name] = factory
        return factory

    return register


class TagStage:
    """Adds ``tags`` to each ok row."""

    def __init__(self, config: TagConfig) -> None:
        if config.method not in TAGGERS:
            raise ValueError(f"unknown tag method {config.method!r}; registered: {sorted(TAGGERS)}")
        self.config = config
        self.tagger = TAGGERS[config.method](config)

    def __call__(self, batch: Batch) -> Batch:
        def tag(rows: list[int]) -> dict[str, list]:
            images = [as_image(batch["image"][i]) for i in rows]
            captions = [batch["source_caption"][i] if "source_caption" in batch else None for i in rows]
            return {"tags": self.tagger(images, captions)}

        return run_rows(batch, STAGE, tag, ("tags",))


@register_tagger("vlm")
class VlmTagger:
    """The VLM lists what it sees; the answer is parsed by ``parse_tag_list``."""

    def __init__(self, config: TagConfig) -> None:
        self.config = config
        self.model, self.processor = load_chat_vlm(config.model)

    def __call__(self, images: Sequence[np.ndarray], captions: Sequence[str | None]) -> list[list[str]]:
        answers = ask(self.model, self.processor, images, self.config)
        return [tags_from_answer(a, c, self.config) for a, c in zip(answers, captions, strict=True)]


def tags_from_answer(answer: str, caption: str | None, cfg: TagConfig) -> list[str]:
    """The tags of one VLM answer (any engine): a list, else the phrases of a sentence answer, else
    (``caption_fallback``) the source caption's phrases."""
    found = parse_tag_list(answer, cfg.max_tags, cfg.max_words)
    if not found:
        found = caption_phrases(answer, cfg.max_tags, cfg.max_words)
    if not found and cfg.caption_fallback:
        found = caption_phrases(caption, cfg.max_tags, cfg.max_words)
    return found


@register_tagger("caption")
def caption_tagger(config: TagConfig) -> Tagger:
    """Noun phrases of each row's source caption; no model."""

    def tagger(images: Sequence[np.ndarray], captions: Sequence[str | None]) -> list[list[str]]:
        return [caption_phrases(c, config.max_tags, config.max_words) for c in captions]

    return tagger


# Words that are not objects to ground, whether listed by the VLM or found in alt-text.
GENERIC = frozenset(
    "image images picture pictures photo photos photograph photography stock illustration vector "
    "background foreground scene view object objects thing things item items none nothing other "
    "visible list answer closeup close-up shot frame copy space royalty free".split()
)
_LEADING = frozenset(
    "a an the some several many various multiple few this that these those one two three four five six "
    "seven eight nine ten".split()
)
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u00b7]+|\(?\d+[.)]|\(?[a-z][.)](?=\s))\s*")
_NOT_WORD = re.compile(r"[^a-z0-9' -]+")


def normalize_phrase(text: str, max_words: int) -> str | None:
    """One list item as a clean lowercase phrase, or None when it is not an object name."""
    text = _BULLET.sub("", text.lower())
    text = text.rsplit(":", 1)[-1]  # "objects: dog" -> "dog"
    text = re.sub(r"\([^)]*\)", " ", text)  # "(partially visible)"
    words = [w.strip("'-") for w in _NOT_WORD.sub(" ", text).split()]
    words = [w for w in words if w]
    while words and (words[0] in _LEADING or words[0].isdigit()):
        words = words[1:]
    if not words or len(words) > max_words or words[-1] in GENERIC:
        return None
    if not any(sum(c.isalpha() for c in w) >= 2 for w in words):
        return None
    return " ".join(words)


def _dedupe(phrases: Sequence[str | None], max_tags: int) -> list[str]:
    """Unique phrases in order, treating a plural "s" as the same phrase (dog / dogs)."""
    out: list[str] = []
    seen: set[str] = set()
    for p in phrases:
        if p is None:
            continue
        stem = p[:-1] if p.endswith("s") and not p.endswith("ss") else p
        if stem in seen:
            continue
        seen.add(stem)
        out.append(p)
        if len(out) == max_tags:
            break
    return out


def parse_tag_list(answer: str, max_tags: int = 20, max_words: int = 4) -> list[str]:
    """A VLM's object list ("1. a dog\\n2. red car", "dog, cat and tree.") as clean unique phrases."""
    items = re.split(r"[\n,;|]+", answer or "")
    if len(items) > 1:  # "..., cat and tree": the last item of a list joined by "and"
        items[-1:] = re.split(r"\s+(?:and|&)\s+", items[-1])
    return _dedupe([normalize_phrase(re.sub(r"[.!?]+\s*$", "", it), max_words) for it in items], max_tags)


# Caption heuristic: a noun phrase is a run of words between break words (determiners, prepositions,
# conjunctions, pronouns, common verbs and adverbs); words ending in -ing/-ed are verbs unless listed.
_BREAK = frozenset(
    """
    a an the this that these those some any each every all both several many few other another its his
    her their our my your of on in at to for from with without by into onto over under above below
    near next beside behind between among through across along around against up down off out about
    after before during while as like than and or but nor so yet is are was were be been being am has
    have had do does did can could will would shall should may might must it he she they we you i me
    him them us there here who which what where when how very too also just not no only sits sit
    stands stand holds hold walks walk runs run looks look lies lie rides ride plays play wears wear
    eats eat shows show features feature poses pose waits wait flies fly jumps jump swims swim
    """.split()
)
_NOUN_ING_ED = frozenset(
    "building buildings clothing ceiling painting paintings ring rings king wedding evening morning "
    "sibling siblings railing railings bed shed sled sledding pudding stocking stockings "
    "awning awnings string swing swings wing wings spring".split()
)
_COLORS_SIZES = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey golden silver dark light "
    "bright big small large tiny huge tall short long old new young beautiful".split()
)


def caption_phrases(caption: str | None, max_tags: int = 20, max_words: int = 4) -> list[str]:
    """Noun phrases of a caption: "A man riding a horse on the beach." -> ["man", "horse", "beach"]."""
    phrases: list[str | None] = []
    text = caption.lower() if isinstance(caption, str) else ""  # None / NaN from a table: no caption
    for clause in re.split(r"[,.;:!?()\"\[\]]+", text):
        run: list[str] = []
        for word in re.findall(r"[a-z][a-z'-]*", clause) + [""]:
            verb_like = (
                (word.endswith("ing") and len(word) > 5) or (word.endswith("ed") and len(word) > 4)
            ) and word not in _NOUN_ING_ED
            if word and word not in _BREAK and word not in GENERIC and not verb_like:
                run.append(word)
                continue
            if run and run[-1] not in _COLORS_SIZES:
                phrases.append(normalize_phrase(" ".join(run[-max_words:]), max_words))
            run = []
    return _dedupe(phrases, max_tags)
