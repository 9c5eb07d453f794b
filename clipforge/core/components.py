"""What each kind of component hands to the host: the data types and protocols plugins implement."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

if TYPE_CHECKING:  # torch is heavy: `clipforge validate` and `plugins` never need it
    import torch

#: The kinds of component a plugin can register, in the order `clipforge plugins` lists them.
KINDS = ("encoders", "losses", "datasets", "evaluators", "curation_steps")


@dataclass
class Sample:
    """One image-text pair.

    ``image`` is a PIL image or its encoded bytes (PNG, JPEG, ...); ``caption`` a string or,
    for datasets with several captions per image, a list of strings. ``label`` is the class
    index for classification datasets.
    """

    key: str
    image: Any
    caption: Union[str, list[str]]
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncoderBundle:
    """An image-text model with what is needed to feed it.

    ``model`` has ``encode_image(images)``, ``encode_text(tokens)``, ``logit_scale`` and
    optionally ``logit_bias``; ``tokenizer`` maps a list of strings to a LongTensor;
    ``preprocess_train``/``preprocess_val`` map a PIL image to a tensor; ``arch`` is the
    open_clip model config (a name or a dict) that rebuilds ``model``.
    """

    model: torch.nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    arch: Union[str, dict[str, Any]]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A curation step's decision on one sample: keep it, or drop it with a reason.

    ``reason`` is a category that counts group by ("near duplicate"); ``detail`` says what is
    particular to this sample ("of key-123") and goes to the manifest only.
    """

    keep: bool
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    @classmethod
    def kept(cls, **scores: float) -> Verdict:
        return cls(True, "", dict(scores))

    @classmethod
    def dropped(cls, reason: str, detail: str = "", **scores: float) -> Verdict:
        return cls(False, reason, dict(scores), detail)


@runtime_checkable
class ClassificationDataset(Protocol):
    """A dataset whose samples carry labels, usable for zero-shot classification."""

    classes: list[str]

    def __iter__(self): ...


@runtime_checkable
class Evaluator(Protocol):
    """Computes metrics of a model on a dataset."""

    def evaluate(self, bundle: EncoderBundle, dataset: Iterable[Sample], device: str) -> dict[str, float]: ...


@runtime_checkable
class CurationStep(Protocol):
    """Decides, for each sample of a batch, keep or drop (with a reason), with optional scores."""

    def __call__(self, samples: Sequence[Sample]) -> Sequence[Verdict]: ...


@runtime_checkable
class ContrastiveLoss(Protocol):
    """``loss(image_features, text_features, logit_scale, logit_bias=None)`` -> tensor or ``{"loss": ...}``."""

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]: ...
