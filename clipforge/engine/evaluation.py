"""Evaluation: every evaluator of the recipe on every evaluation set it runs on.

Metrics are ``eval/<evaluator>/<metric>`` with one evaluation dataset, and
``eval/<set>/<evaluator>/<metric>`` with named sets (``data.eval: {NAME: entry, ...}``); an
evaluator with a dataset of its own (``dataset:``) keeps ``eval/<evaluator>/<metric>``. The
evaluation's *data hash* names what the metrics were measured on: the evaluators' settings and
the content of every dataset they read. Two models' metrics compare only under one data hash.

``data.eval_suite`` adds its tasks as named sets and DataComp's aggregates ``eval/suite/...``
(:mod:`clipforge.core.suites`). Evaluators that report per-sample results
(:class:`~clipforge.ReportsPerSample`) leave them in :attr:`Evaluation.per_sample` by metric name,
for a promotion that tells noise from progress. A dataset that left samples out
(:class:`~clipforge.SkipsSamples`) has them counted as ``eval/<set>/skipped`` and named in
:attr:`Evaluation.skipped`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clipforge.core.catalog import Catalog
from clipforge.core.components import (
    ChoosesHyperparameters,
    DigestsContent,
    EncoderBundle,
    PerSample,
    ReportsDetails,
    ReportsPerSample,
    Sample,
    SkipsSamples,
)
from clipforge.core.embeddings import shared_embeddings
from clipforge.core.errors import StageError
from clipforge.core.evaluations import SUITE_INDEX, runs
from clipforge.core.hashing import canonical_json
from clipforge.core.metrics import EVAL_PREFIX
from clipforge.core.recipe import Recipe
from clipforge.core.resolver import resolve_model
from clipforge.engine.training.runtime import resolve_device

log = logging.getLogger(__name__)

#: Called before each evaluation runs with (its position from 1, how many there are, its label, the
#: recipe field of its dataset: ``data.eval``, ``data.eval.<set>`` or ``evaluation.<i>.dataset``).
EvaluatorCallback = Callable[[int, int, str, str], None]


@dataclass
class Evaluation:
    """Metrics by name, the data of each evaluator's figures (by ``[<set>/]<evaluator>``), the data
    hash, and the settings evaluators chose (``eval/[<set>/]<evaluator>/<name>``,
    :class:`~clipforge.ChoosesHyperparameters`)."""

    metrics: dict[str, float]
    details: dict[str, dict[str, Any]]
    data_hash: str = ""
    params: dict[str, float] = field(default_factory=dict)
    #: Per-sample results by metric name (``eval/...``), of the evaluators that report them.
    per_sample: dict[str, PerSample] = field(default_factory=dict)
    #: The samples datasets left out, by set (``[<set>/]<dataset type>``): key -> reason.
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)


def evaluate(
    recipe: Recipe, catalog: Catalog, model: str, *, device: str = "auto", on_evaluator: EvaluatorCallback | None = None
) -> Evaluation:
    """Run the recipe's evaluators on ``model``: any reference :func:`~clipforge.core.resolver.resolve_model`
    takes (a registered model, a run's model folder on the store, a checkpoint, ...)."""
    if not recipe.evaluation and recipe.data.eval_suite is None:
        return Evaluation({}, {}, data_hash(recipe, catalog))
    dev = str(resolve_device(device))
    return evaluate_bundle(recipe, catalog, resolve_model(model, recipe.storage.options).load(dev), dev, on_evaluator)


def evaluate_bundle(
    recipe: Recipe, catalog: Catalog, bundle: EncoderBundle, device: str, on_evaluator: EvaluatorCallback | None = None
) -> Evaluation:
    """Run every evaluation of the recipe on ``bundle``; a dataset's embeddings are computed once for all of them."""
    datasets: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    params: dict[str, float] = {}
    per_sample: dict[str, PerSample] = {}
    skipped: dict[str, dict[str, str]] = {}
    with shared_embeddings():
        planned = list(runs(recipe))
        for n, (i, ev, set_name, entry) in enumerate(planned):
            label = f"{set_name}/{ev.label}" if set_name else ev.label
            if on_evaluator:
                if i == SUITE_INDEX:
                    on = f"data.eval_suite.{set_name}"
                elif ev.dataset is not None:
                    on = f"evaluation.{i}.dataset"
                else:
                    on = "data.eval" + (f".{set_name}" if set_name else "")
                on_evaluator(n + 1, len(planned), label, on)
            key = canonical_json(entry.entry())
            if key not in datasets:  # one dataset object per entry, shared by the evaluators that use it
                datasets[key] = catalog.create("datasets", entry.entry())
            evaluator = catalog.create("evaluators", ev.entry())
            chosen = set(evaluator.hyperparameters) if isinstance(evaluator, ChoosesHyperparameters) else set()
            for name, value in evaluator.evaluate(bundle, datasets[key], device).items():
                value = float(value)
                if not math.isfinite(value):
                    raise StageError(f"evaluation.{i} ({label}): metric {name!r} is {value}")
                (params if name in chosen else metrics)[f"{EVAL_PREFIX}{label}/{name}"] = value
            if isinstance(evaluator, ReportsDetails) and evaluator.details:
                details[label] = evaluator.details
            if isinstance(evaluator, ReportsPerSample):
                per_sample.update({f"{EVAL_PREFIX}{label}/{m}": r for m, r in evaluator.per_sample.items() if m not in chosen})
            if isinstance(datasets[key], SkipsSamples) and datasets[key].skipped:
                where = f"{set_name}/{entry.type}" if set_name else entry.type
                skipped[where] = dict(datasets[key].skipped)
                metrics[f"{EVAL_PREFIX}{where}/skipped"] = float(len(skipped[where]))
                log.warning("%s: %d samples skipped (%s)", where, len(skipped[where]), _first(skipped[where]))
    if recipe.data.eval_suite is not None:
        from clipforge.core.suites import find_suite

        suite = find_suite(recipe.data.eval_suite)
        metrics.update({f"{EVAL_PREFIX}{k}": v for k, v in suite.aggregates(metrics, EVAL_PREFIX).items()})
    return Evaluation(metrics, details, data_hash(recipe, catalog, datasets), params, per_sample, skipped)


def _first(skipped: dict[str, str], n: int = 3) -> str:
    shown = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:n])
    return shown + (f"; and {len(skipped) - n} more" if len(skipped) > n else "")


def data_hash(recipe: Recipe, catalog: Catalog, datasets: dict[str, Any] | None = None) -> str:
    """sha256 of the evaluators' settings and the content of every dataset they read (built from
    the recipe when ``datasets``, by entry, is not given)."""
    digest = hashlib.sha256()
    for _, ev, set_name, entry in runs(recipe):
        digest.update(canonical_json([set_name, ev.entry(), ev.label, entry.entry()]).encode())
    datasets = dict(datasets or {})
    for _, _, _, entry in runs(recipe):
        key = canonical_json(entry.entry())
        if key not in datasets:
            datasets[key] = catalog.create("datasets", entry.entry())
    for key in sorted(datasets):
        digest.update(key.encode())
        if isinstance(datasets[key], DigestsContent):  # its content, named without decoding it again
            digest.update(datasets[key].content_digest().encode())
            continue
        for sample in datasets[key]:
            _update(digest, sample)
    return digest.hexdigest()


def _update(digest: Any, sample: Sample) -> None:
    """A sample's key, captions, label and image (its bytes, or a PIL image's mode, size and pixels)."""
    digest.update(
        json.dumps(
            [sample.key, sample.caption if not isinstance(sample.caption, bytes) else sample.caption.hex(), sample.label],
            default=str,
        ).encode()
    )
    image = sample.image
    if isinstance(image, (bytes, bytearray)):
        digest.update(image)
    elif image is not None:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
