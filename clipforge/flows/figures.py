"""Figures people would rather look at than numbers: the curation funnel, the loss curve, the
evaluators' recall curves, similarity and confusion matrices.

Figures are built with matplotlib's object API, not pyplot: no display backend, no global
state to clean up on servers and workers.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from clipforge.core.results import StepCounts


def _figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def funnel_figure(funnel: dict[str, StepCounts]) -> Figure:
    """Kept and dropped pairs per step; each bar's counts written beside it, the legend below the plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    steps = list(funnel)
    kept = [funnel[s].kept for s in steps]
    dropped = [funnel[s].dropped for s in steps]
    fig = Figure(figsize=(7, 0.6 * len(steps) + 2.0), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to measure the labels
    ax = fig.subplots()
    ax.barh(steps, kept, color="#4c72b0", label="kept")
    ax.barh(steps, dropped, left=kept, color="#dd8452", label="dropped")
    labels = [
        ax.text(k + d, i, f" {k:,} kept / {d:,} dropped", va="center", fontsize=8) for i, (k, d) in enumerate(zip(kept, dropped))
    ]
    ax.invert_yaxis()
    ax.set_xlabel("pairs")
    ax.set_title("curation funnel")
    # the legend outside the axes, so that it never covers a bar or its counts
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    ax.set_xlim(0, max([1, *(k + d for k, d in zip(kept, dropped))]))
    # widen the x axis until every label ends inside it (the axes shrink as the limit grows: repeat)
    for _ in range(5):
        fig.canvas.draw()
        to_data = ax.transData.inverted()
        right = max(to_data.transform((label.get_window_extent().x1, 0))[0] for label in labels)
        if right <= ax.get_xlim()[1]:
            break
        ax.set_xlim(0, right * 1.02)
    return fig


def loss_figure(history: list[dict[str, float]]) -> Figure:
    steps = [h["step"] for h in history]
    fig, ax = _figure(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], color="#4c72b0", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="#dd8452", lw=1, alpha=0.6)
    ax2.set_ylabel("learning rate", color="#dd8452")
    fig.tight_layout()
    return fig


def similarity_figure(similarity: list[list[float]], title: str = "image-caption similarity") -> Figure:
    """Cosine similarities of the first images (rows) with their captions (columns): a bright diagonal is good."""
    n = len(similarity)
    fig, ax = _figure(figsize=(5.5, 4.8))
    im = ax.imshow(similarity, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_xlabel(f"caption of image j (first {n})")
    ax.set_ylabel("image i")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def recall_curve_figure(curve: dict[str, list[float]], title: str = "recall@k") -> Figure:
    fig, ax = _figure(figsize=(5.5, 3.5))
    ax.plot(curve["k"], curve["image_retrieval"], marker=".", label="image retrieval (text -> image)")
    ax.plot(curve["k"], curve["text_retrieval"], marker=".", label="text retrieval (image -> text)")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str = "confusion matrix") -> Figure:
    """Rows: true class; columns: predicted class; each row normalised to the class's recall."""
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(12, 2.5 + 0.3 * len(classes))
    fig, ax = _figure(figsize=(side + 1, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def evaluation_figures(details: dict[str, dict[str, Any]]) -> dict[str, Figure]:
    """Figures of the evaluators' details, by artifact path (``evaluation/<evaluator>/<figure>.png``)."""
    figures = {}
    for label, d in details.items():
        if d.get("similarity"):
            figures[f"evaluation/{label}/similarity.png"] = similarity_figure(
                d["similarity"], f"{label}: image-caption similarity"
            )
        if d.get("recall_curve"):
            figures[f"evaluation/{label}/recall_at_k.png"] = recall_curve_figure(d["recall_curve"], f"{label}: recall@k")
        if d.get("confusion"):
            figures[f"evaluation/{label}/confusion.png"] = confusion_figure(d["confusion"], d["classes"], f"{label}: confusion")
    return figures
