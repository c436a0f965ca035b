"""Dataset statistics from the shards: the parquet indexes (every input) and the sample JSON (objects, text).

Two tables feed every statistic:

- ``load_index(dataset)``: all shards' parquet rows concatenated, one row per *input* (ok, failed,
  filtered), with a ``shard`` column. Cheap: the parquet files are small and read in parallel.
- ``load_objects(dataset, max_samples)``: one row per object, from the ``{key}.json`` members of at most
  ``max_samples`` ok samples spread over the shards. Needed for text, box and per-object score
  statistics, which the parquet summarises only as per-sample means.

The functions below take these tables and return pandas objects with exact, testable values; the
figures and galleries built on them live in ``shards.report``.

Text statistics measure an object's *text*: its rich description, or its detector phrase when it has
none (COCO converted with ``shards from-coco``), so datasets with and without descriptions compare on
the same scale, as in the paper's dataset figure.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .dataset import list_shards
from .paths import fs_and_root
from .reader import ShardReadError, checked_samples, to_sample
from .schema import STATUS_FAILED, STATUS_FILTERED, STATUS_OK, STATUSES, SchemaError
from .writer import PARQUET_COLUMNS

log = logging.getLogger(__name__)

# Columns of the object table, in order.
OBJECT_COLUMNS = {
    "shard": "string",
    "key": "string",
    "index": "Int64",  # position of the object in the sample's ``objects``
    "phrase": "string",
    "description": "string",
    "text": "string",  # description, or the phrase when there is none
    "x1": "Float64",
    "y1": "Float64",
    "x2": "Float64",
    "y2": "Float64",
    "width": "Int64",  # of the image
    "height": "Int64",
    "detector_score": "Float64",
    "mask_score": "Float64",
    "clip_score": "Float64",
    "has_mask": "boolean",
}


# --- loading ---------------------------------------------------------------------------------------


_ARROW_SCHEMA = pa.schema([(c, {"string": pa.string(), "Int64": pa.int64(), "Float64": pa.float64()}[t])
                           for c, t in PARQUET_COLUMNS.items()])


def _read_parquet(fs, path: str, shard: str) -> pa.Table | str:
    """The shard's parquet rows with a ``shard`` column, or why they cannot be read."""
    try:
        with fs.open(fs_and_root(path)[1], "rb") as f:
            table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        return f"parquet unreadable: {type(e).__name__}: {e}"
    missing = sorted(set(PARQUET_COLUMNS) - set(table.column_names))
    if missing:
        return f"parquet lacks columns {missing} (written by an older richlayout?)"
    try:  # the writer's column types, so that shards concatenate (a column of another type is damage)
        table = table.select(list(PARQUET_COLUMNS)).cast(_ARROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        return f"parquet columns are not of the writer's types: {type(e).__name__}: {e}"
    if unknown := set(table.column("status").unique().to_pylist()) - set(STATUSES):
        return f"parquet has rows whose status is not one of {list(STATUSES)}: {sorted(map(str, unknown))}"
    return table.append_column("shard", pa.array([shard] * table.num_rows, pa.string()))


def _skip(skipped: dict[str, str] | None, dataset: str, shard: str, why: str) -> None:
    # A damaged shard is left out, never silently: logged, and named in ``skipped`` for the caller.
    log.warning("%s: shard %s left out: %s", dataset, shard, why)
    if skipped is not None:
        skipped[shard] = why


def load_index(
    dataset: str, complete_only: bool = True, threads: int = 8, skipped: dict[str, str] | None = None
) -> pd.DataFrame:
    """All parquet rows of a dataset (one per input sample) with a ``shard`` column.

    Only complete shards (stats file present) by default: an incomplete shard may be rewritten. A shard
    whose parquet cannot be read is left out and recorded in ``skipped`` (shard name -> reason).
    """
    fs, _ = fs_and_root(dataset)
    listed = list_shards(dataset)
    for s in listed:
        if s.complete and not s.has_parquet:
            _skip(skipped, dataset, s.name, "parquet missing (the stats file says the shard is complete)")
    shards = [s for s in listed if s.has_parquet and (s.complete or not complete_only)]
    columns = {**PARQUET_COLUMNS, "shard": "string"}
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    if not shards:
        log.warning("%s: no %sshards with a parquet index", dataset, "complete " if complete_only else "")
        return empty
    # Object stores have high latency per file and parquet decoding releases the GIL: threads overlap both.
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        results = list(pool.map(lambda s: _read_parquet(fs, s.parquet, s.name), shards))
    tables = []
    for s, result in zip(shards, results, strict=True):
        if isinstance(result, str):
            _skip(skipped, dataset, s.name, result)
        else:
            tables.append(result)
    if not tables:
        return empty
    df = pa.concat_tables(tables, promote_options="default").to_pandas()
    return df[list(columns)].astype(columns).reset_index(drop=True)


def _object_rows(sample, shard: str) -> list[dict]:
    rec = sample.record
    return [
        {
            "shard": shard,
            "key": rec.key,
            "index": i,
            "phrase": o.phrase,
            "description": o.description,
            "text": o.description if o.description else o.phrase,
            "x1": o.box[0],
            "y1": o.box[1],
            "x2": o.box[2],
            "y2": o.box[3],
            "width": rec.width,
            "height": rec.height,
            "detector_score": o.detector_score,
            "mask_score": o.mask_score,
            "clip_score": o.clip_score,
            "has_mask": o.mask is not None,
        }
        for i, o in enumerate(rec.objects)
    ]


# What reading a damaged shard raises: the tar (ShardReadError), a member (KeyError), a record (SchemaError).
SHARD_ERRORS = (ShardReadError, KeyError, SchemaError, OSError, ValueError)


def load_objects(
    dataset: str, max_samples: int | None = 1000, skipped: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per object of at most ``max_samples`` samples (None: all), taken evenly from every shard.

    Reads the JSON members with ``shards.reader.checked_samples`` (a shard read to its end is hashed, a
    capped read has its size checked); a capped read takes the first ``ceil(max_samples / shards)``
    samples of each complete shard. A shard that fails is left out whole and named in ``skipped``
    (shard -> reason), a sample that is not sound as ``"<shard> key <key>"`` -> reason.
    """
    shards = [s for s in list_shards(dataset) if s.complete]
    per_shard = None if max_samples is None else math.ceil(max_samples / max(1, len(shards)))
    rows: list[dict] = []
    taken = 0
    for s in tqdm(shards, desc=f"objects of {dataset}", unit="shard", disable=None):
        limit = None if max_samples is None else min(per_shard, max_samples - taken)
        if limit == 0:
            break
        shard_rows, bad, n = [], {}, 0  # kept only if the shard reads to its end (or cap) and checks out
        try:
            for raw in islice(checked_samples(dataset, s), limit):
                try:
                    shard_rows.extend(_object_rows(to_sample(raw), s.name))
                    n += 1
                except (KeyError, SchemaError) as e:
                    bad[f"{s.name} key {raw.key}"] = e.args[0] if isinstance(e, KeyError) else str(e)
        except ShardReadError as e:
            _skip(skipped, dataset, s.name, str(e))
            continue
        for where, why in bad.items():
            _skip(skipped, dataset, where, why)
        rows.extend(shard_rows)
        taken += n
    log.info("%s: %d objects from %d samples", dataset, len(rows), taken)
    return pd.DataFrame(rows, columns=list(OBJECT_COLUMNS)).astype(OBJECT_COLUMNS)


# --- inputs, failures, shards ----------------------------------------------------------------------


def status_counts(index: pd.DataFrame) -> pd.Series:
    """Number of inputs per status (ok, failed, filtered; zeros included)."""
    return index["status"].value_counts().reindex(list(STATUSES), fill_value=0).astype(int)


def failures_by_stage(index: pd.DataFrame) -> pd.DataFrame:
    """Inputs not kept, per pipeline stage (rows) and status (columns failed, filtered), most first."""
    bad = index[index["status"] != STATUS_OK]
    table = pd.crosstab(bad["error_stage"].fillna("?"), bad["status"])
    table = table.reindex(columns=[STATUS_FAILED, STATUS_FILTERED], fill_value=0)
    table.index.name = "stage"
    table.columns.name = None
    order = table.sum(axis=1).sort_values(ascending=False, kind="stable").index
    return table.loc[order].astype(int)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def failure_reason(error: str | None) -> str:
    """The error message with what varies per input removed, so that equal causes group together.

    First line only; quoted strings (paths, keys) become ``'…'`` and numbers become ``N``;
    at most 120 characters.
    """
    text = "" if error is None or pd.isna(error) else str(error).strip()
    if not text:
        return "?"
    line = text.splitlines()[0]
    line = _NUMBER.sub("N", _QUOTED.sub("'…'", line))
    return line if len(line) <= 120 else line[:119] + "…"


def failure_reasons(index: pd.DataFrame) -> pd.DataFrame:
    """Inputs not kept grouped by status, stage and reason: count and one example key and error, most first."""
    bad = index[index["status"] != STATUS_OK].copy()
    bad["error_stage"] = bad["error_stage"].fillna("?")
    bad["reason"] = [failure_reason(e) for e in bad["error"]]
    grouped = bad.groupby(["status", "error_stage", "reason"], sort=False, dropna=False)
    table = grouped.agg(
        count=("key", "size"), example_key=("key", "first"), example_error=("error", "first")
    ).reset_index()
    table = table.rename(columns={"error_stage": "stage"})
    return table.sort_values(["count", "stage", "reason"], ascending=[False, True, True]).reset_index(
        drop=True
    )


def per_shard_counts(index: pd.DataFrame) -> pd.DataFrame:
    """Per shard: inputs, ok, failed, filtered and objects (of ok samples)."""
    counts = pd.crosstab(index["shard"], index["status"]).reindex(columns=list(STATUSES), fill_value=0)
    counts.columns.name = None
    counts.insert(0, "inputs", counts.sum(axis=1))
    ok = index[index["status"] == STATUS_OK]
    counts["objects"] = ok.groupby("shard")["num_objects"].sum().reindex(counts.index, fill_value=0)
    return counts.astype(int)


def objects_per_image(index: pd.DataFrame) -> pd.Series:
    """Number of objects of each kept sample, indexed by key."""
    ok = index[index["status"] == STATUS_OK]
    return pd.Series(ok["num_objects"].astype(int).to_numpy(), index=ok["key"].to_numpy(), name="objects")


# --- boxes and scores ------------------------------------------------------------------------------


def box_geometry(objects: pd.DataFrame) -> pd.DataFrame:
    """Per object: ``area`` (box area / image area, 0..1) and ``aspect`` (box width / height)."""
    w = (objects["x2"] - objects["x1"]).astype(float)
    h = (objects["y2"] - objects["y1"]).astype(float)
    area = w * h / (objects["width"] * objects["height"]).astype(float)
    return pd.DataFrame({"area": area, "aspect": w / h}, index=objects.index)


SCORE_COLUMNS = ("detector_score", "mask_score", "clip_score")


def score_summary(objects: pd.DataFrame) -> pd.DataFrame:
    """count, mean, std, min, quartiles and max of the detector, mask and CLIP crop scores (None ignored)."""
    return pd.DataFrame({c: objects[c].astype(float).describe() for c in SCORE_COLUMNS}).T.rename_axis(
        "score"
    )


def top_phrases(objects: pd.DataFrame, n: int = 20) -> pd.Series:
    """The ``n`` most frequent detector phrases (lower-cased, stripped) and their counts; ties by phrase."""
    counts = Counter(p.strip().lower() for p in objects["phrase"].dropna())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return pd.Series(dict(ranked), name="count", dtype=int).rename_axis("phrase")


# --- text ------------------------------------------------------------------------------------------

# A word: a number ("3.5", "1,000") or a run of letters and digits with inner apostrophes ("don't").
# Hyphens separate words.
_WORD = re.compile(r"\d+(?:[.,]\d+)*(?![^\W_])|[^\W_]+(?:['’][^\W_]+)*")
# A sentence ends at '.', '!' or '?' followed by a space or the end; "3.5" does not end one.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased (see ``_WORD``)."""
    return [w.lower() for w in _WORD.findall(text or "")]


def count_syllables(word: str) -> int:
    """Syllables of an English word by a fixed rule (no dictionary, so counts never drift).

    1. Keep the letters a-z of the lower-cased word; a word with none (a number) has 1 syllable.
    2. Count the groups of consecutive vowels ``a e i o u y``.
    3. When that count is above 1, subtract 1 for a silent ending:
       final ``e``, unless the word ends in consonant + ``le`` (ta-ble) or in ``ee`` (a-gree);
       final ``ed``, unless after ``t`` or ``d`` (want-ed); final ``es``, unless after ``s``, ``x``,
       ``z``, ``c``, ``g``, ``ch`` or ``sh`` (box-es, pag-es).
    4. At least 1.

    Examples: cat 1, made 1, parked 1, wanted 2, table 2, beautiful 3, animal 3.
    """
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 1
    n = len(_VOWEL_GROUP.findall(w))
    if n > 1:
        if w.endswith("e"):
            silent = not (re.search(r"[^aeiouy]le$", w) or w.endswith("ee"))
        elif w.endswith("ed"):
            silent = not re.search(r"[td]ed$", w)
        elif w.endswith("es"):
            silent = not re.search(r"(?:[sxzcg]|ch|sh)es$", w)
        else:
            silent = False
        n -= int(silent)
    return max(n, 1)


def fog_index(text: str) -> float:
    """Gunning fog index: ``0.4 * (words / sentences + 100 * complex_words / words)``; NaN without words.

    Complex words have three or more syllables (``count_syllables``); Gunning's exceptions (proper
    nouns, compounds, -ed/-es/-ing endings) are not applied beyond the silent endings counted there.
    Sentences are the pieces between sentence ends (``_SENTENCE_END``) that hold a word, so text
    without a final stop still makes one.
    """
    ws = words(text)
    if not ws:
        return math.nan
    pieces = [p for p in _SENTENCE_END.split(text) if words(p)]
    complex_words = sum(count_syllables(w) >= 3 for w in ws)
    return 0.4 * (len(ws) / len(pieces) + 100.0 * complex_words / len(ws))


def description_lengths(objects: pd.DataFrame) -> pd.Series:
    """Words in each object's text (description, else phrase)."""
    return objects["text"].fillna("").map(lambda t: len(words(t))).astype(int).rename("words")


def fog_indices(objects: pd.DataFrame) -> pd.Series:
    """Gunning fog index of each object's text (NaN for empty text)."""
    return objects["text"].fillna("").map(fog_index).astype(float).rename("fog")


def unique_words_per_sample(objects: pd.DataFrame) -> pd.Series:
    """Distinct words over all object texts of a sample, indexed by key (samples without objects absent)."""
    per_key = objects.groupby("key", sort=True)["text"].agg(
        lambda texts: len({w for t in texts.fillna("") for w in words(t)})
    )
    return per_key.astype(int).rename("unique_words")


# --- headline numbers ------------------------------------------------------------------------------

# The paper's dataset figure: metric -> (panel title, axis label).
PAPER_METRICS = {
    "description_words": ("Description length", "words per object text"),
    "fog_index": ("Gunning fog index", "fog index per object text"),
    "unique_words": ("Unique words per sample", "distinct words over a sample's objects"),
    "clip_score": ("CLIP alignment", "CLIP score, object crop vs. its text"),
}


def paper_metrics(objects: pd.DataFrame) -> dict[str, pd.Series]:
    """The four distributions of the paper's dataset figure (``PAPER_METRICS`` order), missing values dropped."""
    return {
        "description_words": description_lengths(objects),
        "fog_index": fog_indices(objects).dropna(),
        "unique_words": unique_words_per_sample(objects),
        "clip_score": objects["clip_score"].dropna().astype(float),
    }


def summary(index: pd.DataFrame, objects: pd.DataFrame) -> dict[str, float | int]:
    """Headline numbers of one dataset: counts from the index, medians from the object sample."""
    status = status_counts(index)
    medians = {f"median {PAPER_METRICS[k][0].lower()}": v.median() for k, v in paper_metrics(objects).items()}
    return {
        "inputs": int(len(index)),
        "shards": int(index["shard"].nunique()),
        **{k: int(v) for k, v in status.items()},
        "objects": int(index.loc[index["status"] == STATUS_OK, "num_objects"].sum()),
        "mean objects per image": float(objects_per_image(index).mean()) if status[STATUS_OK] else math.nan,
        "objects measured": int(len(objects)),
        **{k: float(v) for k, v in medians.items()},
    }
