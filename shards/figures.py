"""Dataset figures: one matplotlib ``Figure`` per view, each drawing one or several datasets side by side.

Used by the HTML report (``shards.report``) and the dataset-stats notebook. Figures are drawn on the Agg
canvas directly (no pyplot), so they work whatever backend the caller uses.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from . import stats
from .draw import color_hex
from .schema import STATUS_FAILED, STATUS_FILTERED, STATUS_OK, STATUSES

STATUS_COLORS = {STATUS_OK: "#59a14f", STATUS_FAILED: "#e15759", STATUS_FILTERED: "#f28e2b"}


@dataclass(frozen=True)
class DatasetTables:
    """What the figures need from one dataset: its parquet index and a sample of its objects."""

    name: str  # short label for legends
    path: str  # folder or fsspec URI
    index: pd.DataFrame  # stats.load_index
    objects: pd.DataFrame  # stats.load_objects
    skipped: dict[str, str] = field(default_factory=dict)  # damaged shard -> why it was left out


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
    """Load the index and (at most ``max_samples`` samples of) the objects of each dataset.

    A damaged shard is left out of the tables and named, with the reason, in ``skipped``.
    """
    tables = []
    for name, p in zip(short_names(paths), paths, strict=True):
        skipped: dict[str, str] = {}
        index = stats.load_index(str(p), skipped=skipped)
        objects = stats.load_objects(str(p), max_samples, skipped=skipped)
        tables.append(DatasetTables(name, str(p), index, objects, dict(sorted(skipped.items()))))
    return tables


def summary_table(datasets: Sequence[DatasetTables]) -> pd.DataFrame:
    """``stats.summary`` of each dataset, one column per dataset."""
    # Each column built as an object Series: a dict of ints and floats alone would become floats ("26.00").
    return pd.DataFrame({d.name: pd.Series(stats.summary(d.index, d.objects), dtype=object) for d in datasets})


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
