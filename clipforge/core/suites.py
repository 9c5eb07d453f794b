"""Evaluation suites: ``data.eval_suite`` adds one named evaluation set per CLIP_benchmark task folder
under its root, with the evaluator each task needs, and DataComp's aggregates over them.

A task's folder holds what ``clip_benchmark.webdataset_builder`` writes (``dataset_type.txt``,
``SPLIT/nshards.txt``, ...). Its ``dataset_type`` picks the evaluator: ``retrieval`` for retrieval
sets, ``zero-shot-classification`` otherwise. The task list is read from the root when the
evaluation runs (``tasks: all`` lists it then), never at validation, which does not reach the bucket.

DataComp (``datacomp/tasklist.yml``, ``aggregate_scores.py``) scores each task by one main metric
(acc1 for most, mean per-class recall for some, mean recall@1 for retrieval); ``suite/average`` is
the mean over the tasks evaluated, and ``suite/<group>`` the mean over a group's tasks. SugarCrepe's
tasks (``sugar_crepe_*`` folders of captions, the true one first) run ``image-caption-selection``;
they make ``suite/compositionality``, outside DataComp's average. A task asked
for but missing under the root is listed in ``Suite.missing`` and never averaged in silently.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from clipforge.core.errors import ConfigError
from clipforge.core.hashing import canonical_json
from clipforge.core.recipe import ComponentRef, EvalSuiteConfig, EvaluatorRef
from clipforge.core.storage import Store

log = logging.getLogger(__name__)

#: The namespace of the aggregates: ``eval/suite/average``, ``eval/suite/imagenet``, ...
SUITE = "suite"
ZERO_SHOT, RETRIEVAL, SELECTION = "zero-shot-classification", "retrieval", "image-caption-selection"
#: DataComp's groups (its paper's table): each aggregate's name and what it averages.
GROUPS = {
    "imagenet": "ImageNet",
    "imagenet_shifts": "ImageNet distribution shifts",
    "vtab": "VTAB",
    "retrieval": "retrieval",
    "compositionality": "SugarCrepe (image-caption selection; not in DataComp's average)",
}
_PER_CLASS = "mean_per_class_recall"
_SHIFTS = ("imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "objectnet")
#: DataComp's tasks whose main metric is not acc1 (retrieval tasks score mean_recall@1 whatever their name).
_MAIN_METRIC = {
    "fgvc_aircraft": _PER_CLASS,
    "vtab-caltech101": _PER_CLASS,
    "vtab-flowers": _PER_CLASS,
    "vtab-pets": _PER_CLASS,
    "voc2007": _PER_CLASS,
    "voc2007_multilabel": "mean_average_precision",
}


def canonical_task(name: str) -> str:
    """A task folder's name as DataComp's table has it: the hub's ``wds_`` prefix and ``_test`` suffix
    dropped, ``vtab/`` written ``vtab-``, ``mscoco_captions`` and ``flickr30k`` as they are."""
    name = name.lower().removeprefix("wds_").removesuffix("_test").replace("/", "-")
    return name


def selects_captions(task: str) -> bool:
    """SugarCrepe's tasks (CLIP_benchmark's ``sugar_crepe/...``): captions, the true one first, the false after."""
    return canonical_task(task).startswith("sugar_crepe")


def group_of(task: str, dataset_type: str) -> str | None:
    """The DataComp group a task counts in (None: only the average)."""
    name = canonical_task(task)
    if selects_captions(task):
        return "compositionality"
    if dataset_type == "retrieval":
        return "retrieval"
    if name == "imagenet1k":
        return "imagenet"
    if name in _SHIFTS:
        return "imagenet_shifts"
    if name.startswith("vtab-"):
        return "vtab"
    return None


def main_metric(task: str, dataset_type: str) -> str:
    """DataComp's main metric of a task, as ``<evaluator>/<metric>``."""
    if selects_captions(task):
        return f"{SELECTION}/acc"
    if dataset_type == "retrieval":
        return f"{RETRIEVAL}/mean_recall@1"
    if dataset_type == "multilabel":
        return f"{ZERO_SHOT}/mean_average_precision"
    return f"{ZERO_SHOT}/{_MAIN_METRIC.get(canonical_task(task), 'acc1')}"


@dataclass(frozen=True)
class Task:
    """One task folder of a suite: its set name, where it is, its ``dataset_type``."""

    name: str
    root: str
    dataset_type: str

    @property
    def evaluator(self) -> str:
        if selects_captions(self.name):
            return SELECTION
        return RETRIEVAL if self.dataset_type == "retrieval" else ZERO_SHOT

    @property
    def main_metric(self) -> str:
        return main_metric(self.name, self.dataset_type)

    @property
    def group(self) -> str | None:
        return group_of(self.name, self.dataset_type)


@dataclass(frozen=True)
class Suite:
    """A suite as found under its root: the tasks there and those asked for but missing."""

    config: EvalSuiteConfig
    tasks: list[Task]
    missing: list[str] = field(default_factory=list)

    def runs(self) -> list[tuple[EvaluatorRef, str, ComponentRef]]:
        """``(evaluator, set name, dataset entry)`` of each task."""
        c = self.config
        found = []
        for task in self.tasks:
            fields: dict[str, Any] = {"batch_size": c.batch_size}
            if task.evaluator == RETRIEVAL:
                fields["ks"] = list(c.ks)
            dataset = {"type": "clip-benchmark", "root": task.root, "split": c.split, "storage_options": c.storage_options}
            found.append((EvaluatorRef(type=task.evaluator, **fields), task.name, ComponentRef(**dataset)))
        return found

    def aggregates(self, metrics: dict[str, float], prefix: str) -> dict[str, float]:
        """DataComp's aggregates from the tasks' metrics (named ``<prefix><task>/<evaluator>/<metric>``):
        ``suite/average``, ``suite/<group>`` for each group with a task, ``suite/tasks`` and ``suite/missing``."""
        scores: dict[str, float] = {}
        for task in self.tasks:
            name = f"{prefix}{task.name}/{task.main_metric}"
            if name in metrics:
                scores[task.name] = metrics[name]
        found = {f"{SUITE}/tasks": float(len(scores)), f"{SUITE}/missing": float(len(self.missing))}
        averaged = [v for t in self.tasks if not selects_captions(t.name) and (v := scores.get(t.name)) is not None]
        if averaged:
            found[f"{SUITE}/average"] = sum(averaged) / len(averaged)
        for group in GROUPS:
            members = [v for t in self.tasks if t.group == group and (v := scores.get(t.name)) is not None]
            if members:
                found[f"{SUITE}/{group}"] = sum(members) / len(members)
        return found


def find_suite(config: EvalSuiteConfig) -> Suite:
    """The suite's tasks under its root (listed for ``tasks: all``), each one's ``dataset_type`` read.

    A root with no task folder is a :class:`ConfigError`; tasks asked for but missing are kept in
    ``missing`` (and logged), never dropped silently. Found once per process and configuration.
    """
    return _find(canonical_json(config.model_dump(mode="json")))


@lru_cache(maxsize=32)
def _find(key: str) -> Suite:
    import json

    config = EvalSuiteConfig.model_validate(json.loads(key))
    store = Store(config.root, config.storage_options)
    names = [n for n in store.ls() if store.exists(posixpath.join(n, config.split, "nshards.txt"))]
    wanted = names if config.tasks == "all" else list(config.tasks)
    if not names:
        raise ConfigError(
            f"data.eval_suite: no task under {store.url}: no folder there has {config.split}/nshards.txt "
            "(mirror CLIP_benchmark webdataset folders, one per task, under the root)"
        )
    missing = [t for t in wanted if t not in names]
    if missing:
        log.warning("data.eval_suite: tasks missing under %s, left out of every aggregate: %s", store.url, ", ".join(missing))
    tasks = [Task(t, store.uri(t), _dataset_type(store, t)) for t in wanted if t in names]
    return Suite(config, tasks, missing)


def _dataset_type(store: Store, task: str) -> str:
    rel = posixpath.join(task, "dataset_type.txt")
    if not store.exists(rel):
        return "classification"
    kind = store.read_bytes(rel).decode("utf-8", "replace").strip().lower() or "classification"
    if kind not in ("classification", "multilabel", "retrieval"):
        raise ConfigError(
            f"data.eval_suite: {store.uri(rel)} says {kind[:40]!r}; expected classification, multilabel or retrieval"
        )
    return kind
