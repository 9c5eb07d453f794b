"""Every hook clipforge calls, in one module (the pytest ``hookspec.py`` style).

Registration hooks run once, when the plugin manager first builds its catalogs; each receives a
``register(name, factory, params=None, description="")`` callback and calls it once per
component. Lifecycle hooks observe a run; their return values are ignored, and an exception in
one fails the stage that called it (a notification that must never fail a run should catch
its own errors).

``context`` is a :class:`~clipforge.RunContext`: the recipe, the store, the run id
and folder, the MLflow run id, and ``state``, the typed result of each stage run so far.

What each kind's factories return, and the optional capabilities a component may declare, are
the protocols :mod:`clipforge` exports; :data:`clipforge.core.kinds.KINDS` ties each
kind to its registration hook below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from clipforge.core.catalog import RegisterFn
    from clipforge.core.context import RunContext

PROJECT = "clipforge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration ---------------------------------------------------------------------------


@hookspec
def register_encoders(register: RegisterFn) -> None:
    """Register image-text models.

    Runs once, when the catalogs are first built. Each factory returns an
    :class:`~clipforge.EncoderBundle` (model, tokenizer, train/val transforms, arch).
    """


@hookspec
def register_losses(register: RegisterFn) -> None:
    """Register training objectives.

    Runs once, when the catalogs are first built. Each factory returns a
    :class:`~clipforge.ContrastiveLoss` (a ``torch.nn.Module``) called as ``loss(image_features,
    text_features, logit_scale, logit_bias=None)`` that returns a scalar tensor or a dict with a
    ``"loss"`` key; optionally :class:`~clipforge.NeedsInputs` and :class:`~clipforge.Preparable`.
    """


@hookspec
def register_datasets(register: RegisterFn) -> None:
    """Register sources of image-text pairs.

    Runs once, when the catalogs are first built. Each factory returns a
    :class:`~clipforge.Dataset`, an iterable of :class:`~clipforge.Sample`; optionally a
    :class:`~clipforge.ClassificationDataset` (``classes``), a :class:`~clipforge.TemplatedDataset`
    (``templates``, prompts with ``{c}``) and a :class:`~clipforge.PartitionedDataset` (``parts()``).
    """


@hookspec
def register_evaluators(register: RegisterFn) -> None:
    """Register benchmarks.

    Runs once, when the catalogs are first built. Each factory returns an
    :class:`~clipforge.Evaluator`, ``evaluate(bundle, dataset, device) -> dict[str, float]``;
    optionally :class:`~clipforge.ReportsDetails`: after ``evaluate``, ``details`` holds the data
    of its figures (``similarity``, ``recall_curve``, ``confusion`` with ``classes``), which the
    evaluate stage draws and logs; :class:`~clipforge.ChoosesHyperparameters`: ``hyperparameters``
    names the results that are settings it chose, logged as params rather than metrics.
    """


@hookspec
def register_curation_steps(register: RegisterFn) -> None:
    """Register filters, scorers, deduplication and balancing steps.

    Runs once, when the catalogs are first built. Each factory returns a per-sample
    :class:`~clipforge.CurationStep` (a batch of samples in, one :class:`~clipforge.Verdict` per
    sample out, in order), optionally :class:`~clipforge.DeclaresPixels`, or a
    :class:`~clipforge.WholeDatasetStep` (``features`` per part, then one ``decide`` over all).
    """


@hookspec
def register_launchers(register: RegisterFn) -> None:
    """Register ways to run the train stage: in this process, on several processes, on a cluster.

    Runs once, when the catalogs are first built. Each factory returns a
    :class:`~clipforge.Launcher`: ``launch(job, device)`` runs the picklable ``job`` on every process
    it starts, each told its rank as ``torch.distributed`` expects, and waits for all of them;
    ``device`` is the recipe's ``train.device``, to size the processes by.
    """


@hookspec
def register_adapters(register: RegisterFn) -> None:
    """Register parameter-efficient ways to train a model (LoRA, prompt tuning, ...).

    Runs once, when the catalogs are first built. Each factory returns an
    :class:`~clipforge.Adapter`: ``apply(model)`` before training (only its parameters train),
    ``save(model, folder)`` writes it in its own format, ``merge(model)`` folds it into the base
    weights for the exported model.
    """


# -- lifecycle ------------------------------------------------------------------------------


@hookspec
def before_stage(stage: str, context: RunContext) -> None:
    """Called before a stage (a row of :data:`~clipforge.STAGES`: its name) starts."""


@hookspec
def after_stage(stage: str, context: RunContext, result: Any) -> None:
    """Called after a stage finished without error and its result was saved, with that typed result
    (its row's result type: :class:`~clipforge.CurateResult` for ``curate``, ...)."""


@hookspec
def on_stage_error(stage: str, context: RunContext, error: BaseException) -> None:
    """Called when a stage raised; the error is re-raised after every implementation ran."""


@hookspec
def after_train_step(context: RunContext, step: int, metrics: dict[str, float]) -> None:
    """Called after each optimizer step with that step's metrics (``loss``, ``lr``, ...)."""


@hookspec
def after_evaluation(context: RunContext, metrics: dict[str, float]) -> None:
    """Called once the evaluate stage has every metric, namespaced ``eval/<evaluator>/<metric>``."""


@hookspec
def after_model_registered(context: RunContext, model_version: Any) -> None:
    """Called after the register stage created a model version (an MLflow ``ModelVersion``).

    ``context.state.register`` (a :class:`~clipforge.RegisterResult`) says whether it took the
    ``champion`` alias and why. The place for notifications.
    """
