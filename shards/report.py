"""Galleries and a static HTML report for one or several datasets side by side.

``python -m shards report DIR [DIR ...] --out report.html`` writes one self-contained HTML file (PNG
figures embedded as data URIs, so it can be mailed or attached to a ticket). The figures come from
``shards.figures``; they and the gallery functions feed ``notebooks/dataset_stats.ipynb``.

Figures are built on ``matplotlib.figure.Figure`` and rendered by the Agg canvas: no pyplot, so no
global figure registry and no GUI backend, whatever the caller's matplotlib backend is.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import provenance, stats
from .cli import require_output_file, require_shards, run_command
from .draw import color_hex, draw_sample

# Re-exported: the notebook and the tests reach the figures as report.X.
from .figures import (  # noqa: F401
    FIGURES,
    STATUS_COLORS,
    DatasetTables,
    boxes_figure,
    figure_png,
    inputs_figure,
    load_datasets,
    objects_figure,
    paper_figure,
    phrases_figure,
    scores_figure,
    shards_figure,
    short_names,
    summary_table,
)
from .paths import fs_and_root, is_local
from .reader import ImageRefused, Sample, ShardReadError, shard_samples, to_sample
from .schema import STATUS_OK
from .stats import SHARD_ERRORS

log = logging.getLogger(__name__)


# --- galleries -------------------------------------------------------------------------------------


def _jpeg(image: Image.Image) -> bytes:
    # Photos: JPEG is a tenth of the PNG size, and a gallery of PNG photos makes a report of many MB.
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class GalleryItem:
    """One card of a gallery: a title, an optional JPEG and coloured lines of text."""

    title: str
    jpeg: bytes | None
    lines: tuple[tuple[str, str], ...]  # (css colour, text)


def _readable_samples(dataset: str, left_out: dict[str, str]) -> Iterator[Sample]:
    # A damaged shard or sample is left out of the gallery and named in ``left_out``.
    def on_error(e: ShardReadError) -> None:
        log.warning("gallery of %s: %s", dataset, e)
        left_out.setdefault(e.url.rsplit("/", 1)[-1].split(".")[0], str(e))

    for raw in shard_samples(dataset, on_error=on_error):
        try:
            yield to_sample(raw)
        except SHARD_ERRORS as e:
            log.warning("gallery of %s: %s", dataset, e)
            left_out.setdefault(f"{raw.url.rsplit('/', 1)[-1].split('.')[0]} key {raw.key}",
                                e.args[0] if isinstance(e, KeyError) else str(e))


def sample_gallery(dataset: str, n: int = 8, max_size: int = 384, left_out: dict[str, str] | None = None) -> list[GalleryItem]:
    """The first ``n`` readable samples drawn with masks, numbered boxes and phrases; descriptions below.

    A damaged shard or sample is passed over, and an image too large to decode (``Sample.image``) gets a
    card saying so; each is named in ``left_out`` (``"<shard>"`` or ``"<shard> key <key>"`` -> why).
    """
    left_out = {} if left_out is None else left_out
    items = []
    for sample in islice(_readable_samples(dataset, left_out), n):
        rec = sample.record
        try:
            drawn = _jpeg(draw_sample(sample, max_size))
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's kinds of bad bytes; ImageRefused
            why = str(e) if isinstance(e, (ImageRefused, ValueError)) and str(e).startswith(sample.url) else \
                f"{sample.url} key {rec.key!r}: cannot be drawn ({type(e).__name__}: {e})"
            log.warning("gallery of %s: %s", dataset, why)
            left_out[f"{sample.url.rsplit('/', 1)[-1].split('.')[0]} key {rec.key}"] = why
            title = "image refused" if isinstance(e, ImageRefused) else "cannot be drawn"
            items.append(GalleryItem(f"{rec.key} ({title})", None, (("#e15759", why),)))
            continue
        lines = [("#444", f"caption: {rec.caption or rec.source_caption or '-'}")]
        lines += [
            (
                color_hex(i),
                f"{i + 1}. {o.phrase}: {o.description or '(no description)'}"
                + (f"  [CLIP {o.clip_score:.1f}]" if o.clip_score is not None else ""),
            )
            for i, o in enumerate(rec.objects)
        ]
        items.append(GalleryItem(f"{rec.key} ({rec.width}x{rec.height})", drawn, tuple(lines)))
    return items


def _thumbnail(source: str, max_size: int) -> bytes | None:
    # A failed input's source is often unreadable (that may be why it failed): show it when PIL can.
    path = Path(source) if source else None
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_size, max_size))
            return _jpeg(im)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def failure_gallery(index: pd.DataFrame, n: int = 12, max_size: int = 256) -> list[GalleryItem]:
    """Up to ``n`` inputs not kept, spread over the failure reasons (most frequent first), with their errors."""
    bad = index[index["status"] != STATUS_OK].copy()
    if bad.empty:
        return []
    bad["reason"] = [stats.failure_reason(e) for e in bad["error"]]
    # Round-robin over reasons so one frequent cause does not hide the rare ones.
    bad["rank"] = bad.groupby(["error_stage", "reason"], dropna=False).cumcount()
    bad = bad.sort_values(["rank", "status", "error_stage", "key"], kind="stable").head(n)
    return [
        GalleryItem(
            f"{r.key} ({r.status} at {r.error_stage})",
            _thumbnail(str(r.source or ""), max_size),
            (
                (STATUS_COLORS[r.status], str(r.error)),
                ("#666", f"source: {r.source}"),
                ("#666", f"shard {r.shard}"),
            ),
        )
        for r in bad.itertuples()
    ]


def gallery_html(items: Sequence[GalleryItem], css_class: str = "gallery") -> str:
    """A grid of cards; for the report and for ``IPython.display.HTML`` in the notebook."""
    if not items:
        return f'<p class="{css_class} empty">nothing to show</p>'
    cards = []
    for item in items:
        img = (
            f'<img src="{_data_uri(item.jpeg, "image/jpeg")}" alt="{html.escape(item.title)}">'
            if item.jpeg is not None
            else '<div class="noimg">no image</div>'
        )
        lines = "".join(f'<li style="color:{c}">{html.escape(t)}</li>' for c, t in item.lines)
        cards.append(
            f'<figure class="card">{img}<figcaption><b>{html.escape(item.title)}</b><ul>{lines}</ul></figcaption></figure>'
        )
    return f'<div class="{css_class}">' + "".join(cards) + "</div>"


# --- provenance ------------------------------------------------------------------------------------


def provenance_table(datasets: Sequence[DatasetTables]) -> pd.DataFrame:
    """Which model made each record field (``shards.provenance.FIELDS``), one column per dataset:
    ``unknown`` for a dataset whose ``run.json`` records no models, the reason when it cannot be read."""
    from .dataset import DatasetError, read_run

    columns = {}
    for d in datasets:
        try:
            made = {f: provenance.describe(m) for f, m in provenance.fields_of(read_run(d.path)).items()}
        except (DatasetError, OSError) as e:  # the figures still come from the shards
            made = dict.fromkeys(provenance.FIELDS, f"{provenance.UNKNOWN} (run.json unreadable: {e})")
        columns[d.name] = pd.Series(made, dtype=object)
    return pd.DataFrame(columns).rename_axis("field")


# --- the page --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{margin-bottom:0.2em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ddd;padding:0.25em 0.6em;text-align:right}
th{background:#f4f4f4}td.text{text-align:left}
figure.plot img{max-width:100%;height:auto}
.muted{color:#777}
"""
# Also shown once in the notebook, before its galleries.
GALLERY_CSS = """
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:1em}
.card{margin:0;border:1px solid #ddd;border-radius:6px;padding:0.5em;background:#fafafa}
.card img{max-width:100%;height:auto;display:block;margin:0 auto}
.card ul{padding-left:1.1em;margin:0.4em 0;font-size:0.85em}.noimg{color:#999;padding:2em;text-align:center}
"""


def _format(v: object) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:,.2f}"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    return str(v)


def table_html(df: pd.DataFrame, text_columns: Sequence[str] = ()) -> str:
    """A DataFrame as an HTML table, every cell escaped; ``text_columns`` left-aligned."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [df.index.name or "", *df.columns])
    rows = []
    for idx, row in df.iterrows():
        cells = [f'<td class="text">{html.escape(str(idx))}</td>']
        cells += [
            ('<td class="text">' if c in text_columns else "<td>") + f"{html.escape(_format(v))}</td>"
            for c, v in row.items()
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(datasets: Sequence[DatasetTables], gallery: int = 8) -> str:
    """The whole report page: summary, every figure of ``FIGURES``, failure reasons and both galleries."""
    esc = html.escape
    names = ", ".join(f"{d.name} ({d.path})" for d in datasets)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Dataset report: '
        f"{esc(', '.join(d.name for d in datasets))}</title><style>{_CSS}{GALLERY_CSS}</style></head><body>",
        f'<h1>Dataset report</h1><p class="muted">{esc(names)} &middot; {esc(now)}</p>',
        '<section id="summary"><h2>Summary</h2>',
        table_html(summary_table(datasets).rename_axis("")),
        '<p class="muted">Counts come from every parquet row; text, box and score statistics from the '
        "objects of the samples measured (a capped read of the JSON members). An object's text is its "
        "description, or its phrase when it has none.</p></section>",
        '<section id="models"><h2>Models</h2>',
        table_html(provenance_table(datasets), text_columns=[d.name for d in datasets]),
        '<p class="muted">The model that made each field of the records, from each dataset\'s run.json '
        "(unknown: written before datagen recorded its models, or not made by datagen).</p></section>",
    ]
    for fig_id, (heading, make) in FIGURES.items():
        log.info("figure %s", fig_id)
        png = figure_png(make(datasets))
        parts.append(
            f'<section id="figure-{fig_id}"><h2>{esc(heading)}</h2><figure class="plot">'
            f'<img id="img-{fig_id}" src="{_data_uri(png, "image/png")}" alt="{esc(heading)}"></figure></section>'
        )
    # The galleries first: an image they refuse joins the dataset's left-out list shown above them.
    galleries = [gallery_html(sample_gallery(d.path, gallery, left_out=d.skipped)) for d in datasets]
    parts.append('<section id="failure-reasons"><h2>Failure reasons</h2>')
    for d in datasets:
        reasons = stats.failure_reasons(d.index).head(30).set_index("status")
        parts.append(f"<h3>{esc(d.name)}</h3>")
        parts.append(
            table_html(
                reasons[["stage", "reason", "count", "example_key"]],
                text_columns=("stage", "reason", "example_key"),
            )
            if len(reasons)
            else '<p class="muted">every input was kept</p>'
        )
        if d.skipped:
            left_out = pd.DataFrame({"reason": list(d.skipped.values())},
                                    index=pd.Index(list(d.skipped), name="shard or sample"))
            parts.append(
                f'<h4 id="skipped-shards-{esc(d.name)}">{len(d.skipped)} damaged shard(s) or sample(s) left out '
                f"(a shard of every table and figure, a sample of the object statistics and the gallery)</h4>"
                f"{table_html(left_out, text_columns=('reason',))}"
            )
    parts.append("</section>")
    for i, d in enumerate(datasets):
        parts.append(
            f'<section id="gallery-samples-{i}"><h2>Samples: {esc(d.name)}</h2>{galleries[i]}</section>'
        )
        parts.append(
            f'<section id="gallery-failures-{i}"><h2>Failures: {esc(d.name)}</h2>'
            f"{gallery_html(failure_gallery(d.index, gallery), 'gallery failures')}</section>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(
    paths: Sequence[str], out: str | Path, max_samples: int | None = 1000, gallery: int = 8
) -> tuple[Path | str, dict[str, dict[str, str]]]:
    """Load the datasets, render the page and write it to ``out`` (a path or an fsspec URI).

    Returns where it was written and, per dataset name, what was left out (shard or ``"<shard> key
    <key>"`` -> why; empty when nothing was).
    """
    tables = load_datasets(paths, max_samples)
    html_text = render_html(tables, gallery)
    fs, path = fs_and_root(str(out))
    if is_local(fs):  # object stores have no folders to make
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(html_text.encode("utf-8"))
    return (Path(out) if is_local(fs) else out), {t.name: dict(t.skipped) for t in tables}


def add_report_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The report command's arguments; ``python -m shards report`` is the one command line that uses them."""
    p.description = ("Write a static HTML report (figures and galleries, PNGs embedded) of one or several datasets. "
                     "Exit 1 (the report still written) when a damaged shard or sample was left out, each named.")
    p.add_argument("datasets", nargs="+", help="dataset folders or fsspec URIs, compared side by side")
    p.add_argument("--out", required=True, help="report.html path")
    p.add_argument(
        "--max-samples",
        type=int,
        default=1000,
        help="samples per dataset whose JSON is read for text, box and score statistics (0: all)",
    )
    p.add_argument("--gallery", type=int, default=8, help="samples and failures shown per dataset")
    p.set_defaults(fn=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    for d in args.datasets:
        require_shards(d)
    require_output_file(args.out, make_folder=True)
    out, left_out = write_report(args.datasets, args.out, args.max_samples or None, args.gallery)
    log.info("wrote %s", out)  # run_command set logging up: the CLI's one line of output
    n = sum(map(len, left_out.values()))
    if not n:
        return 0
    for name, entries in left_out.items():
        for where, why in entries.items():
            print(f"{name}: {where} left out: {why}", file=sys.stderr)
    # Data problems exit 1 (the report is written and lists them): a script never takes it for a clean one.
    print(f"error: {n} damaged shard(s) or sample(s) left out of {out} (listed above and in the report)",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m shards report ARGS`` callable from Python (same arguments); returns the exit code."""
    return run_command(add_report_arguments(argparse.ArgumentParser(prog="python -m shards report")), argv)


if __name__ == "__main__":
    sys.exit(main())
