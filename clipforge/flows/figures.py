"""Figures people would rather look at than numbers: the curation funnel, the loss curve."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402


def funnel_figure(funnel: dict[str, dict[str, Any]]):
    steps = list(funnel)
    kept = [funnel[s]["kept"] for s in steps]
    dropped = [funnel[s]["dropped"] for s in steps]
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(steps) + 1.5))
    ax.barh(steps, kept, color="#4c72b0", label="kept")
    ax.barh(steps, dropped, left=kept, color="#dd8452", label="dropped")
    for i, (k, d) in enumerate(zip(kept, dropped)):
        ax.text(k + d, i, f" {k:,} kept / {d:,} dropped", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("pairs")
    ax.set_title("curation funnel")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def loss_figure(history: list[dict[str, float]]):
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], color="#4c72b0", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="#dd8452", lw=1, alpha=0.6)
    ax2.set_ylabel("learning rate", color="#dd8452")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
