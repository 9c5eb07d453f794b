"""What each kind of component hands to the host: the data types, the protocols plugins implement,
and the optional capabilities a component may declare on top of its protocol.

The host checks every capability with ``isinstance`` against the protocols below, never by
probing attribute names, so that what a plugin may offer is written down in one place.
"""

from __future__ import annotations

import bisect
import dataclasses
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is heavy: `clipforge validate` and `plugins` never need it
    import torch


@dataclass
class Sample:
    """One image-text pair.

    ``image`` is a PIL image or its encoded bytes (PNG, JPEG, ...); ``caption`` a string or,
    for datasets with several captions per image, a list of strings (a dataset reading raw
    crawls may hand in bytes or None: curation checks them and drops what is not text).
    ``label`` is the class index for classification datasets.
    """

    key: str
    image: Any
    caption: str | list[str] | bytes | None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def captions(self) -> list[str]:
        """The text captions as a list: one for a single caption (what is not text is left out)."""
        raw = self.caption if isinstance(self.caption, list) else [self.caption]
        return [c for c in raw if isinstance(c, str)]


@dataclass
class EncoderBundle:
    """An image-text model with what is needed to feed it.

    ``model`` has ``encode_image(images)``, ``encode_text(tokens)``, ``logit_scale`` and
    optionally ``logit_bias``; ``tokenizer`` maps a list of strings to a LongTensor;
    ``preprocess_train``/``preprocess_val`` map a PIL image to a tensor; ``arch`` is the
    open_clip model config (a name or a dict) that rebuilds ``model``.
    """

    model: Any  # a torch.nn.Module with the methods above: no type says both
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    arch: str | dict[str, Any]
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


@dataclass(frozen=True)
class Pool:
    """The curated data a curation is decided against (the recipe's ``curation_pool``), as one
    whole-dataset step sees it: every sample that step saw when the pool was curated, oldest
    curation first, with the features that step computed then (as ``decide`` gets them: a float32
    array by rows, or a list) and whether the pool kept the sample (it is in the curated data).

    ``statistics`` says whether whole-dataset statistics (an entry's cap, a top fraction) count
    the pool's samples; duplicates of the pool are dropped either way.
    """

    keys: list[str]
    features: Any
    kept: list[bool]
    manifests: list[str] = field(default_factory=list)  # each curation of the pool, oldest first
    ends: list[int] = field(default_factory=list)  # where each curation's samples end in ``keys``
    statistics: bool = True

    def origin(self, i: int) -> str:
        """``"KEY in MANIFEST"`` of pool sample ``i``: what a drop's detail names."""
        return f"{self.keys[i]} in {self.manifests[bisect.bisect_right(self.ends, i)]}"


# -- the protocol of each kind ----------------------------------------------------------------


@runtime_checkable
class Dataset(Protocol):
    """``register_datasets``: an iterable of :class:`Sample`, the same ones each time it is iterated."""

    def __iter__(self) -> Iterator[Sample]: ...


@runtime_checkable
class ContrastiveLoss(Protocol):
    """``register_losses``: ``loss(image_features, text_features, logit_scale, logit_bias=None)``
    returns a scalar tensor or ``{"loss": ...}`` (a ``torch.nn.Module``)."""

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]: ...


@runtime_checkable
class Evaluator(Protocol):
    """``register_evaluators``: computes metrics of a model on a dataset."""

    def evaluate(self, bundle: EncoderBundle, dataset: Dataset, device: str) -> dict[str, float]: ...


@runtime_checkable
class CurationStep(Protocol):
    """``register_curation_steps``, per sample: a batch in, one :class:`Verdict` per sample out, in order."""

    def __call__(self, samples: Sequence[Sample]) -> Sequence[Verdict]: ...


@runtime_checkable
class WholeDatasetStep(Protocol):
    """``register_curation_steps``, over the whole dataset (deduplication, balancing, top fractions).

    ``features(samples)`` runs on each part in parallel and returns one compact, JSON-able value
    (or one row of a float array) per sample; ``decide(keys, features)`` runs once over every
    surviving sample of the dataset and returns one :class:`Verdict` per key, in order. Such
    steps come after every per-sample step of a recipe.
    """

    def features(self, samples: Sequence[Sample]) -> Sequence[Any]: ...

    def decide(self, keys: list[str], features: Any) -> Sequence[Verdict]: ...


@runtime_checkable
class DecidesAgainstPool(Protocol):
    """A whole-dataset step that can decide against a pool of curated data (``curation_pool``):
    drop the duplicates of pool samples, count the pool's samples in its statistics.

    ``features_signature()`` says what its features depend on (the embedding model, the metadata
    entries) as JSON-able data: the pool's stored features are used only when the pool was
    curated by a step of the same type and signature, since they are never recomputed.
    ``decide_against(keys, features, pool)`` is ``decide`` with the :class:`Pool` as this step saw it.
    """

    def features_signature(self) -> dict[str, Any]: ...

    def decide_against(self, keys: list[str], features: Any, pool: Pool) -> Sequence[Verdict]: ...


@dataclass(frozen=True)
class Block:
    """A run of the rows a partitioned decision (:class:`DecidesInPartitions`) is over, in its order:
    a part's survivors, or a pool curation's part. ``first`` is the position of its first row among
    every row of the decision (the pool's rows come first, oldest curation first, then the new data's);
    ``features`` are as ``decide`` gets them. For a pool's rows ``kept`` says which the pool kept,
    ``origin`` names its manifest and ``statistics`` whether they count in whole-dataset statistics;
    for the new data's rows ``kept`` is None."""

    features: Any
    first: int
    keys: list[str]
    kept: list[bool] | None = None
    origin: str = ""
    statistics: bool = True

    @property
    def pool(self) -> bool:
        """Whether these are a pool's rows (decided before, never given verdicts)."""
        return self.kept is not None


@runtime_checkable
class DecidesInPartitions(Protocol):
    """A whole-dataset step whose decision splits into tasks of bounded memory, with the same verdicts as
    ``decide`` (and ``decide_against``) over every row at once: how the reduce phase runs it when the
    recipe's ``parallel.reduce_partitions`` is above 1. The host calls, each per-block or per-partition
    call as a task on the recipe's runner and each other call in its own process:

    1. ``survey(plan, block)`` for every :class:`Block`, then ``plan(plan, surveys, partitions)``, which
       returns ``(plan, done)``; starting from ``plan = None``, again until ``done`` (a count pass, a
       sample to cluster, a histogram refined where needed). Surveys are small.
    2. ``route(plan, block)`` for every block: the share of its rows each partition gets, as a mapping
       ``{partition: {name: numpy array}}`` (stored, never pickled); ``{}`` when nothing moves.
    3. ``link(plan, shares)`` for each partition that got rows, over the shares it got (mappings of
       name to array, in block order; a task reads each array from the store as it is looked up, so
       look each up once), then
       ``settle(plan, links, name)`` once over every partition's links (none when nothing was
       routed; ``name(position)`` names a row as a verdict's detail does: its key, or
       ``"KEY in MANIFEST"`` for a pool's row).
    4. ``decide_block(plan, block)`` for every block of the new data: one :class:`Verdict` per row.
    """

    def survey(self, plan: Any, block: Block) -> Any: ...

    def plan(self, plan: Any, surveys: list[Any], partitions: int) -> tuple[Any, bool]: ...

    def route(self, plan: Any, block: Block) -> dict[int, dict[str, Any]]: ...

    def link(self, plan: Any, shares: Sequence[Mapping[str, Any]]) -> Any: ...

    def settle(self, plan: Any, links: list[Any], name: Callable[[int], str]) -> Any: ...

    def decide_block(self, plan: Any, block: Block) -> Sequence[Verdict]: ...


@runtime_checkable
class ScopedParams(Protocol):
    """The params model of a curation step that is per-sample or whole-dataset depending on its
    parameters (``clip-score``: a threshold or a top fraction) says which, so that a recipe's step
    order is checked without building the step."""

    def whole_dataset(self) -> bool: ...


@runtime_checkable
class Launcher(Protocol):
    """``register_launchers``: how the train stage runs, on one or many processes and machines.

    ``launch(job, device)`` calls ``job()`` once in every process it starts and waits for all of
    them (``device``: the recipe's ``train.device``, to size the processes by);
    a failure is a :class:`~clipforge.StageError` that names the rank and its error. ``job`` is a
    picklable callable that trains and leaves the result on the store; each process learns its
    part as ``torch.distributed`` does: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT`` in its environment, or a process group already initialised.
    """

    def launch(self, job: Callable[[], object], device: str) -> None: ...


@runtime_checkable
class Adapter(Protocol):
    """``register_adapters``: parameter-efficient training of a model's towers.

    ``apply(model)`` wraps the model in place before training, so that only the adapter's own
    parameters require gradients (the host unlocks what the recipe's ``unlock`` names on top);
    the base weights stay as they are. The host checkpoints every parameter that requires
    gradients, so a resumed run rebuilds the base, applies the adapter and loads them back.
    ``merge(model)`` folds the trained update into the base weights in place, after which the
    model is a plain model again (its ``state_dict`` keys those it had before ``apply``);
    ``save(model, folder)`` writes the adapter alone, in its own format, before the merge.
    """

    def apply(self, model: torch.nn.Module) -> None: ...

    def merge(self, model: torch.nn.Module) -> None: ...

    def save(self, model: torch.nn.Module, folder: str) -> None: ...


# -- optional capabilities: what a component may declare beyond its protocol ---------------------


@runtime_checkable
class ClassificationDataset(Protocol):
    """A dataset whose samples carry labels (class indices): usable for zero-shot classification."""

    classes: list[str]

    def __iter__(self) -> Iterator[Sample]: ...


@runtime_checkable
class TemplatedDataset(Protocol):
    """A classification dataset that brings its own zero-shot prompts, each with ``{c}`` for the class name."""

    templates: list[str]


@runtime_checkable
class PartitionedDataset(Protocol):
    """A dataset that splits into parts (shards, slices) that curation processes in parallel.

    ``parts()`` returns dataset entries (``{"type": ..., **fields}``), together the whole dataset.
    """

    def parts(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class DeclaresPixels(Protocol):
    """A per-sample curation step that says whether it looks at pixels.

    With ``reads_pixels = False`` (captions, sizes and modes only) curation hands it images that
    are only opened, and never decodes the samples it drops.
    """

    reads_pixels: bool


@runtime_checkable
class NeedsInputs(Protocol):
    """A loss that reads the batch itself (a distillation teacher embeds it): with
    ``needs_inputs = True`` the trainer also passes ``images=`` and ``texts=`` keyword arguments."""

    needs_inputs: bool


@runtime_checkable
class Preparable(Protocol):
    """A loss with ``prepare(bundle)``: called once with the model being trained, before the first step."""

    def prepare(self, bundle: EncoderBundle) -> None: ...


@runtime_checkable
class ChoosesHyperparameters(Protocol):
    """An evaluator whose result also holds settings it chose rather than scores it measured (a
    linear probe's ``weight_decay``): ``hyperparameters`` names them. The evaluate stage logs them as
    MLflow params ``eval/<evaluator>/<name>``, never as metrics to compare models by."""

    hyperparameters: tuple[str, ...]


@runtime_checkable
class ReportsDetails(Protocol):
    """An evaluator that leaves the data of its figures in ``details`` after ``evaluate``:
    ``similarity`` (a matrix), ``recall_curve`` (``k``, ``image_retrieval``, ``text_retrieval``),
    ``confusion`` with ``classes``. The evaluate stage draws and logs them."""

    details: dict[str, Any]


@runtime_checkable
class MultilabelDataset(Protocol):
    """A classification dataset whose samples may have several classes (CLIP_benchmark's ``multilabel``
    folders): with ``multilabel = True`` each sample's ``meta["targets"]`` is a 0/1 list over ``classes``,
    and zero-shot classification reports mean average precision."""

    multilabel: bool


@runtime_checkable
class SkipsSamples(Protocol):
    """A dataset that leaves out samples it cannot read (an image that does not decode): after a pass,
    ``skipped`` maps each left-out key to its reason. The evaluate stage counts them with the set's metrics."""

    skipped: dict[str, str]


@runtime_checkable
class DigestsContent(Protocol):
    """A dataset that names its content without being iterated: ``content_digest()`` is a hex digest
    of everything its samples are made of (a folder's shards and metadata files, byte for byte). The
    evaluation's data hash uses it instead of reading every sample a second time."""

    def content_digest(self) -> str: ...


@dataclass
class PerSample:
    """One metric's per-sample results, keyed by sample: what a paired bootstrap resamples.

    The metric is the mean of ``values`` (weighted by ``weights`` when given); with ``groups`` (a
    class per sample) it is the mean over the groups present of each group's mean, as mean per-class
    recall is. Resampling the keys and recomputing gives the metric's spread.
    """

    keys: list[str]
    values: list[float]
    weights: list[float] | None = None
    groups: list[int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@runtime_checkable
class ReportsPerSample(Protocol):
    """An evaluator that leaves per-sample results in ``per_sample`` after ``evaluate``: metric name ->
    :class:`PerSample`. Promotion with ``registry.promote.confidence`` needs them for the metrics it gates on."""

    per_sample: dict[str, PerSample]


def reads_pixels(step: Any) -> bool:
    """Whether a per-sample step looks at pixels: True unless it declares otherwise (:class:`DeclaresPixels`)."""
    return step.reads_pixels if isinstance(step, DeclaresPixels) else True


def needs_inputs(loss: Any) -> bool:
    """Whether a loss reads the batch (:class:`NeedsInputs`)."""
    return isinstance(loss, NeedsInputs) and bool(loss.needs_inputs)


def check_template(template: str) -> str:
    """A prompt template has exactly one kind of placeholder, ``{c}``, the class name; else ValueError."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # unbalanced braces
        raise ValueError(f"template {template!r} is not a format string: {e}") from None
    if fields != {"c"}:
        raise ValueError(f"template {template!r} must contain '{{c}}' (the class name) and no other placeholder")
    return template


@runtime_checkable
class DeclaresInputSize(Protocol):
    """The params model of an encoder that tells, from the recipe entry alone, the side in pixels of
    the images its model reads: curation resizes what it keeps down to it without building the model."""

    def input_size(self) -> int | None: ...


@runtime_checkable
class ChecksInputs(Protocol):
    """The params model of a component that reads inputs outside the recipe (a table, a file of
    entries, shards): ``check_inputs()`` checks, without building the component or reading the data
    through, that they exist and hold what it reads (a table's columns). It returns ``(field, message)``
    per problem, ``field`` relative to the entry (``path``, ``caption_column``); ``clipforge validate``
    and the start of a run report them with the entry's path."""

    def check_inputs(self) -> list[tuple[str, str]]: ...


@runtime_checkable
class NeedsClasses(Protocol):
    """An evaluator that only works on a :class:`ClassificationDataset` (zero-shot classification, a
    linear probe): with ``needs_classes = True``, a recipe that gives it a set without classes is
    refused before anything runs. Read from the factory (a class attribute), without building it."""

    needs_classes: bool
