"""``zero-shot-classification``: CLIP_benchmark's zero-shot classifier and its metrics.

Each class is embedded as the normalised mean of the normalised embeddings of its prompts
(one per template); an image's logits are its cosine similarities to the classes. Metrics
(CLIP_benchmark ``metrics/zeroshot_classification.py``): ``acc1``, ``acc5`` (only with at
least 5 classes) and ``mean_per_class_recall`` (balanced accuracy over the classes present).
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

import clipforge
from clipforge import ClassificationDataset, EncoderBundle, Sample, TemplatedDataset, check_template, embed_images, embed_texts

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
    #: The evaluator's name in error messages.
    name: ClassVar[str] = NAME
    #: Classes are what it classifies into: a set without them is refused before a run starts.
    needs_classes: ClassVar[bool] = True

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        classes = classes_of(dataset, self.name)
        templates = self._templates(dataset)
        images, samples = embed_images(
            bundle, dataset, device, self.batch_size, desc=f"{self.name}: images", check=label_check(len(classes), self.name)
        )
        if not samples:
            raise clipforge.ConfigError(f"{self.name}: the dataset is empty")
        labels = torch.tensor([s.label for s in samples])

        prompts = [t.format(c=c) for c in classes for t in templates]
        texts = embed_texts(bundle, prompts, device, self.batch_size, desc=f"{self.name}: prompts")
        weights = F.normalize(texts.view(len(classes), len(templates), -1).mean(dim=1), dim=-1)
        logits = images @ weights.T

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
        return metrics

    def _templates(self, dataset: object) -> list[str]:
        own = dataset.templates if isinstance(dataset, TemplatedDataset) else None
        templates = self.templates or own or DEFAULT_TEMPLATES
        try:
            return [check_template(t) for t in templates]
        except ValueError as e:
            source = "templates" if self.templates else "the dataset's templates"
            raise clipforge.ConfigError(f"{self.name}: {source}: {e}") from None


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
