"""Metric names: the evaluate stage's namespace, and the keys MLflow stores them under.

An evaluator reports ``mean_recall@1``; the evaluate stage names it ``eval/<evaluator>/<metric>``
(``eval/retrieval/mean_recall@1``); MLflow refuses ``@`` in a key, so it is logged and tagged as
``eval/retrieval/mean_recall_at_1``. A recipe's promotion rule may name any of these forms.
"""

from __future__ import annotations

#: The namespace of every metric the evaluate stage produces.
EVAL_PREFIX = "eval/"


def eval_name(name: str) -> str:
    """``name`` in the evaluate stage's namespace: ``retrieval/mean_recall@1`` -> ``eval/retrieval/mean_recall@1``."""
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def metric_key(name: str) -> str:
    """``name`` as MLflow accepts it: ``'@'`` becomes ``'_at_'`` (``recall@5`` -> ``recall_at_5``)."""
    return name.replace("@", "_at_")
