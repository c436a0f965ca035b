"""Figures, galleries and a static HTML report for one or several datasets side by side.

``python -m shards report DIR [DIR ...] --out report.html`` writes one self-contained HTML file (PNG
figures embedded as data URIs, so it can be mailed or attached to a ticket). The same figure and
gallery functions feed ``notebooks/dataset_stats.ipynb``.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from PIL import Image

from . import stats
from .draw import color_hex, draw_sample
from .reader import iter_samples
from .writer import STATUS_FAILED, STATUS_FILTERED, STATUS_OK, STATUSES

log = logging.getLogger(__name__)

STATUS_COLORS = {STATUS_OK: "#59a14f", STATUS_FAILED: "#e15759", STATUS_FILTERED: "#f28e2b"}


@dataclass(frozen=True)
class DatasetTables:
    """What the figures need from one dataset: its parquet index and a sample of its objects."""

    name: str  # short label for legends
    path: str  # folder or fsspec URI
    index: pd.DataFrame  # stats.load_index
    objects: pd.DataFrame  # stats.load_objects


def short_names(paths: Sequence[str]) -> list[str]:
    """The last path component of each dataset, made unique with ``#2``, ``#3`` suffixes."""
    names: list[str] = []
    for p in paths:
        base = str(p).rstrip("/").rsplit("/", 1)[-1] or str(p)
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def load_datasets(paths: Sequence[str], max_samples: int | None = 1000) -> list[DatasetTables]:
    """Load the index and (at most ``max_samples`` samples of) the objects of each dataset."""
    return [
        DatasetTables(name, str(p), stats.load_index(str(p)), stats.load_objects(str(p), max_samples))
        for name, p in zip(short_names(paths), paths, strict=True)
    ]


def summary_table(datasets: Sequence[DatasetTables]) -> pd.DataFrame:
    """``stats.summary`` of each dataset, one column per dataset."""
    return pd.DataFrame({d.name: stats.summary(d.index, d.objects) for d in datasets}, dtype=object)


# --- figures ---------------------------------------------------------------------------------------


def _legend_below(ax, ncols: int = 1) -> None:
    # Below the axes, so it never hides bars; constrained layout makes room for it.
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=ncols)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _bins(
    values: list[np.ndarray], integer: bool, limits: tuple[float, float] | None, log: bool
) -> np.ndarray:
    # Shared bins over all datasets so the curves compare; the top 0.5 % is folded into the last bin
    # so one very long description does not squash every other bar into the first one.
    allv = np.concatenate(values)
    lo, hi = limits if limits else (float(allv.min()), float(np.quantile(allv, 0.995)))
    if log:
        return np.geomspace(lo, hi, 25)
    if integer:
        lo, hi = math.floor(lo), math.ceil(hi)
        step = max(1, math.ceil((hi - lo + 1) / 40))
        return np.arange(lo, hi + step + 1, step) - 0.5
    return np.linspace(lo, hi if hi > lo else lo + 1, 31)


def _hist_panel(
    ax,
    series: dict[str, pd.Series],
    title: str,
    xlabel: str,
    integer: bool = False,
    limits: tuple[float, float] | None = None,
    log: bool = False,
) -> None:
    """Overlaid density histograms, one per dataset, with its median dashed."""
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    data = {n: s.dropna().to_numpy(dtype=float) for n, s in series.items()}
    present = [v for v in data.values() if len(v)]
    if not present:
        _no_data(ax)
        return
    bins = _bins(present, integer, limits, log)
    for i, (name, v) in enumerate(data.items()):
        if not len(v):
            continue
        c = color_hex(i)
        density, _ = np.histogram(np.clip(v, bins[0], bins[-1]), bins=bins, density=True)
        median = float(np.median(v))
        # stairs draw one patch per dataset where hist draws one per bar: several times faster to render.
        ax.stairs(density, bins, fill=True, color=c, alpha=0.25)
        ax.stairs(density, bins, color=c, linewidth=1.8, label=f"{name} (median {median:.3g}, n={len(v)})")
        ax.axvline(median, color=c, linestyle="--", linewidth=1.2)
    if log:
        ax.set_xscale("log")
        ticks = [t for t in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8) if bins[0] <= t <= bins[-1]]
        ax.set_xticks(ticks, [f"1/{round(1 / t)}" if t < 1 else f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("density")
    _legend_below(ax)
    ax.grid(alpha=0.3)


def _figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.4) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def paper_figure(datasets: Sequence[DatasetTables]) -> Figure:
    """The paper's dataset figure: description length, fog index, unique words per sample, CLIP crop score."""
    fig, axes = _figure(4)
    metrics = {d.name: stats.paper_metrics(d.objects) for d in datasets}
    for ax, (key, (title, xlabel)) in zip(axes, stats.PAPER_METRICS.items(), strict=True):
        _hist_panel(
            ax,
            {n: m[key] for n, m in metrics.items()},
            title,
            xlabel,
            integer=key in ("description_words", "unique_words"),
        )
    fig.suptitle("Object descriptions: length, readability, vocabulary and alignment with the crop")
    return fig


def inputs_figure(datasets: Sequence[DatasetTables]) -> Figure:
    """Inputs by status (share of each dataset), and inputs not kept by stage."""
    fig, (left, right) = _figure(2, width=5.5, height=max(2.6, 0.5 * len(datasets) + 2))
    names = [d.name for d in datasets]
    counts = pd.DataFrame({d.name: stats.status_counts(d.index) for d in datasets}).T.reindex(names)
    share = counts.div(counts.sum(axis=1).replace(0, 1), axis=0) * 100
    start = np.zeros(len(names))
    for status in STATUSES:
        left.barh(names, share[status], left=start, color=STATUS_COLORS[status], label=status)
        for y, (x0, w, n) in enumerate(zip(start, share[status], counts[status], strict=True)):
            if w >= 8:
                left.text(x0 + w / 2, y, f"{n}", ha="center", va="center", fontsize=8, color="white")
        start += share[status].to_numpy()
    left.set_xlim(0, 100)
    left.set_xlabel("% of inputs")
    left.set_title("Inputs by status", fontsize=11)
    left.invert_yaxis()
    _legend_below(left, ncols=3)
    stages = pd.DataFrame({d.name: stats.failures_by_stage(d.index).sum(axis=1) for d in datasets}).fillna(0)
    right.set_title("Inputs not kept, by stage", fontsize=11)
    if stages.empty or stages.to_numpy().sum() == 0:
        _no_data(right)
        return fig
    stages = stages.loc[stages.sum(axis=1).sort_values(ascending=False).index]
    height = 0.8 / len(names)
    y = np.arange(len(stages))
    for i, name in enumerate(names):
        right.barh(y + i * height, stages[name], height=height, color=color_hex(i), label=name)
    right.set_yticks(y + height * (len(names) - 1) / 2, stages.index)
    right.invert_yaxis()
    right.set_xlabel("inputs (failed + filtered)")
    _legend_below(right, ncols=min(3, len(names)))
    return fig


def objects_figure(datasets: Sequence[DatasetTables]) -> Figure:
    """Objects per kept image."""
    fig, (ax,) = _figure(1, width=5.5)
    _hist_panel(
        ax,
        {d.name: stats.objects_per_image(d.index) for d in datasets},
        "Objects per image",
        "objects",
        integer=True,
    )
    return fig


def boxes_figure(datasets: Sequence[DatasetTables]) -> Figure:
    """Box area (fraction of the image) and aspect ratio (width / height, log scale)."""
    fig, axes = _figure(2, width=5)
    geo = {d.name: stats.box_geometry(d.objects) for d in datasets}
    _hist_panel(
        axes[0],
        {n: g["area"] for n, g in geo.items()},
        "Box area",
        "box area / image area",
        limits=(0.0, 1.0),
    )
    _hist_panel(
        axes[1],
        {n: g["aspect"] for n, g in geo.items()},
        "Box aspect ratio",
        "width / height (log scale; clipped to 1/8..8)",
        limits=(1 / 8, 8),
        log=True,
    )
    return fig


def scores_figure(datasets: Sequence[DatasetTables]) -> Figure:
    """Detector score, mask score (SAM's predicted IoU) and CLIP crop score per object."""
    fig, axes = _figure(3)
    panels = {
        "detector_score": ("Detector score", "box confidence", (0.0, 1.0)),
        "mask_score": ("Mask score", "SAM's predicted IoU", (0.0, 1.0)),
        "clip_score": ("CLIP crop score", "100 x cosine(crop, text)", None),
    }
    for ax, (col, (title, xlabel, limits)) in zip(axes, panels.items(), strict=True):
        _hist_panel(ax, {d.name: d.objects[col] for d in datasets}, title, xlabel, limits=limits)
    return fig


def phrases_figure(datasets: Sequence[DatasetTables], n: int = 15) -> Figure:
    """The ``n`` most frequent detector phrases of each dataset."""
    fig, axes = _figure(len(datasets), width=4.5, height=max(3.0, 0.25 * n + 1))
    for i, (ax, d) in enumerate(zip(axes, datasets, strict=True)):
        top = stats.top_phrases(d.objects, n)
        ax.set_title(f"{d.name}: most frequent phrases", fontsize=11)
        if top.empty:
            _no_data(ax)
            continue
        ax.barh(top.index, top.to_numpy(), color=color_hex(i))
        ax.invert_yaxis()
        ax.set_xlabel(f"objects (of {len(d.objects)} measured)")
    return fig


def shards_figure(datasets: Sequence[DatasetTables]) -> Figure:
    """Inputs of each shard, stacked by status."""
    fig, axes = _figure(1, nrows=len(datasets), width=10, height=2.6)
    for ax, d in zip(axes, datasets, strict=True):
        counts = stats.per_shard_counts(d.index)
        ax.set_title(f"{d.name}: inputs per shard", fontsize=11)
        if counts.empty:
            _no_data(ax)
            continue
        x = np.arange(len(counts))
        bottom = np.zeros(len(counts))
        for status in STATUSES:
            ax.bar(x, counts[status], bottom=bottom, width=0.9, color=STATUS_COLORS[status], label=status)
            bottom += counts[status].to_numpy()
        step = max(1, len(counts) // 20)
        ax.set_xticks(x[::step], counts.index[::step], rotation=45, fontsize=7)
        ax.set_xlabel("shard")
        ax.set_ylabel("inputs")
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# Report order: id -> (heading, figure function).
FIGURES: dict[str, tuple[str, Callable[[Sequence[DatasetTables]], Figure]]] = {
    "paper": ("Descriptions and alignment (the paper's dataset figure)", paper_figure),
    "inputs": ("Inputs, failures and filters", inputs_figure),
    "objects": ("Objects per image", objects_figure),
    "boxes": ("Box sizes and shapes", boxes_figure),
    "scores": ("Detector, mask and CLIP scores", scores_figure),
    "phrases": ("Most frequent phrases", phrases_figure),
    "shards": ("Per-shard counts", shards_figure),
}


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


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


def sample_gallery(dataset: str, n: int = 8, max_size: int = 384) -> list[GalleryItem]:
    """The first ``n`` samples drawn with masks, numbered boxes and phrases; descriptions listed below."""
    items = []
    for sample in islice(iter_samples(dataset), n):
        rec = sample.record
        lines = [("#444", f"caption: {rec.caption or rec.source_caption or '-'}")]
        lines += [
            (
                color_hex(i),
                f"{i + 1}. {o.phrase}: {o.description or '(no description)'}"
                + (f"  [CLIP {o.clip_score:.1f}]" if o.clip_score is not None else ""),
            )
            for i, o in enumerate(rec.objects)
        ]
        items.append(
            GalleryItem(
                f"{rec.key} ({rec.width}x{rec.height})", _jpeg(draw_sample(sample, max_size)), tuple(lines)
            )
        )
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
    ]
    for fig_id, (heading, make) in FIGURES.items():
        log.info("figure %s", fig_id)
        png = figure_png(make(datasets))
        parts.append(
            f'<section id="figure-{fig_id}"><h2>{esc(heading)}</h2><figure class="plot">'
            f'<img id="img-{fig_id}" src="{_data_uri(png, "image/png")}" alt="{esc(heading)}"></figure></section>'
        )
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
    parts.append("</section>")
    for i, d in enumerate(datasets):
        parts.append(
            f'<section id="gallery-samples-{i}"><h2>Samples: {esc(d.name)}</h2>'
            f"{gallery_html(sample_gallery(d.path, gallery))}</section>"
        )
        parts.append(
            f'<section id="gallery-failures-{i}"><h2>Failures: {esc(d.name)}</h2>'
            f"{gallery_html(failure_gallery(d.index, gallery), 'gallery failures')}</section>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(
    paths: Sequence[str], out: str | Path, max_samples: int | None = 1000, gallery: int = 8
) -> Path:
    """Load the datasets, render the page and write it to ``out``."""
    html_text = render_html(load_datasets(paths, max_samples), gallery)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_text, encoding="utf-8")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shards report",
        description="Write a static HTML report (figures and galleries, PNGs embedded) of one or several datasets.",
    )
    p.add_argument("datasets", nargs="+", help="dataset folders or fsspec URIs, compared side by side")
    p.add_argument("--out", required=True, help="report.html path")
    p.add_argument(
        "--max-samples",
        type=int,
        default=1000,
        help="samples per dataset whose JSON is read for text, box and score statistics (0: all)",
    )
    p.add_argument("--gallery", type=int, default=8, help="samples and failures shown per dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = write_report(args.datasets, args.out, args.max_samples or None, args.gallery)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
