"""``zero-shot-classification``: CLIP_benchmark's zero-shot classifier and its metrics.

Each class is embedded as the normalised mean of the normalised embeddings of its prompts
(one per template); an image's logits are its cosine similarities to the classes. Metrics
(CLIP_benchmark ``metrics/zeroshot_classification.py``): ``acc1``, ``acc5`` (only with at
least 5 classes) and ``mean_per_class_recall`` (balanced accuracy over the classes present); on a
multilabel dataset (:class:`~clipforge.MultilabelDataset`), ``mean_average_precision`` over the
classes, as CLIP_benchmark's ``average_precision_per_class`` computes it. Per-sample results
(:class:`~clipforge.ReportsPerSample`) are kept for acc1, acc5 and mean_per_class_recall.
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

import clipforge
from clipforge import (
    ClassificationDataset,
    EncoderBundle,
    MultilabelDataset,
    PerSample,
    Sample,
    TemplatedDataset,
    check_template,
    embed_images,
    embed_texts,
)

if TYPE_CHECKING:
    import torch

NAME = "zero-shot-classification"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


Template = Annotated[str, AfterValidator(check_template)]


class ZeroShotParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    templates: list[Template] | None = Field(
        None, min_length=1, description="prompts with '{c}'; default: the dataset's templates, else 'a photo of a {c}.'"
    )
    batch_size: int = Field(256, gt=0, description="images or prompts per forward pass")


@dataclass
class ZeroShotClassification:
    """Zero-shot classification accuracy (acc1, acc5, mean per-class recall), as CLIP_benchmark computes it."""

    templates: list[str] | None = None
    batch_size: int = 256
    #: After ``evaluate``: the data of its figures (the confusion matrix and the class names).
    details: dict = field(default_factory=dict, init=False, repr=False)
    #: After ``evaluate``: per-sample results by metric (what a paired bootstrap resamples).
    per_sample: dict[str, PerSample] = field(default_factory=dict, init=False, repr=False)
    #: The evaluator's name in error messages.
    name: ClassVar[str] = NAME
    #: Classes are what it classifies into: a set without them is refused before a run starts.
    needs_classes: ClassVar[bool] = True

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        classes = classes_of(dataset, self.name)
        templates = self._templates(dataset)
        multilabel = isinstance(dataset, MultilabelDataset) and bool(dataset.multilabel)
        check = targets_check(len(classes), self.name) if multilabel else label_check(len(classes), self.name)
        images, samples = embed_images(bundle, dataset, device, self.batch_size, desc=f"{self.name}: images", check=check)
        if not samples:
            raise clipforge.ConfigError(f"{self.name}: the dataset is empty")

        prompts = [t.format(c=c) for c in classes for t in templates]
        texts = embed_texts(bundle, prompts, device, self.batch_size, desc=f"{self.name}: prompts")
        weights = F.normalize(texts.view(len(classes), len(templates), -1).mean(dim=1), dim=-1)
        logits = images @ weights.T
        self.per_sample = {}
        if multilabel:
            targets = torch.tensor([s.meta["targets"] for s in samples])
            self.details = {}
            return {"mean_average_precision": average_precision(logits, targets).mean().item()}
        labels = torch.tensor([s.label for s in samples])

        ranked = logits.topk(min(5, len(classes)), dim=1).indices
        hits = ranked == labels[:, None]
        metrics = {"acc1": hits[:, 0].float().mean().item()}
        if len(classes) >= 5:
            metrics["acc5"] = hits.any(dim=1).float().mean().item()
        # sklearn's balanced_accuracy_score: recall averaged over the classes that have samples
        per_class = torch.bincount(labels, weights=hits[:, 0].double(), minlength=len(classes))
        counts = torch.bincount(labels, minlength=len(classes))
        metrics["mean_per_class_recall"] = (per_class[counts > 0] / counts[counts > 0]).mean().item()
        # confusion[true, predicted]
        confusion = torch.bincount(labels * len(classes) + ranked[:, 0], minlength=len(classes) ** 2)
        self.details = {"confusion": confusion.view(len(classes), len(classes)).tolist(), "classes": classes}
        keys = [s.key for s in samples]
        top1 = hits[:, 0].double().tolist()
        self.per_sample = {
            "acc1": PerSample(keys, top1),
            "mean_per_class_recall": PerSample(keys, top1, groups=labels.tolist()),
        }
        if "acc5" in metrics:
            self.per_sample["acc5"] = PerSample(keys, hits.any(dim=1).double().tolist())
        return metrics

    def _templates(self, dataset: object) -> list[str]:
        own = dataset.templates if isinstance(dataset, TemplatedDataset) else None
        templates = self.templates or own or DEFAULT_TEMPLATES
        try:
            return [check_template(t) for t in templates]
        except ValueError as e:
            source = "templates" if self.templates else "the dataset's templates"
            raise clipforge.ConfigError(f"{self.name}: {source}: {e}") from None


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each class (column) of ``scores`` against 0/1 ``targets``, as CLIP_benchmark's
    ``average_precision_per_class``: precision at each true sample in score order, averaged."""
    import torch

    ap = torch.zeros(scores.shape[1], dtype=torch.float64)
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64)
    for k in range(scores.shape[1]):
        truth = targets[scores[:, k].sort(descending=True).indices, k]
        precision = truth.double().cumsum(0) / ranks
        ap[k] = precision[truth.bool()].sum() / max(float(truth.sum()), 1.0)
    return ap


def targets_check(n_classes: int, evaluator: str) -> Callable[[Sample], None]:
    """A check that each sample of a multilabel dataset has ``meta["targets"]``: 0/1 over the classes."""

    def check(s: Sample) -> None:
        targets = s.meta.get("targets")
        if not isinstance(targets, list) or len(targets) != n_classes or any(t not in (0, 1) for t in targets):
            raise clipforge.ConfigError(
                f"{evaluator}: sample {s.key!r} of a multilabel dataset needs meta['targets']: {n_classes} values of 0 or 1"
            )

    return check


def classes_of(dataset: object, evaluator: str) -> list[str]:
    """The dataset's class names, checked: present, not empty, no duplicates (errors name ``evaluator``)."""
    if not isinstance(dataset, ClassificationDataset) or dataset.classes is None:
        raise clipforge.ConfigError(f"{evaluator}: the dataset has no `classes`; {evaluator} needs a classification dataset")
    classes = list(dataset.classes)
    if not classes:
        raise clipforge.ConfigError(f"{evaluator}: the dataset's `classes` is empty")
    duplicates = sorted(c for c, n in Counter(classes).items() if n > 1)
    if duplicates:
        raise clipforge.ConfigError(f"{evaluator}: the dataset's `classes` has duplicate names: {', '.join(duplicates)}")
    return classes


def label_check(n_classes: int, evaluator: str) -> Callable[[Sample], None]:
    """A check that each sample's ``label`` is a class index (errors name ``evaluator``)."""

    def check(s: Sample) -> None:
        if not isinstance(s.label, numbers.Integral):
            raise clipforge.ConfigError(
                f"{evaluator}: sample {s.key!r} has label {s.label!r}; every sample needs its class index (an int)"
            )
        if not 0 <= s.label < n_classes:
            raise clipforge.ConfigError(f"{evaluator}: sample {s.key!r} has label {s.label}, outside the {n_classes} classes")

    return check


@clipforge.hookimpl
def register_evaluators(register):
    register(NAME, ZeroShotClassification, params=ZeroShotParams)
