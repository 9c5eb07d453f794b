"""Recipes: one YAML file describes a whole retrain; these pydantic models are its fields, and
:func:`component_entries` finds the components it references.

Reading the file is :mod:`clipforge.core.recipe_yaml`'s, ``--set`` overrides :mod:`clipforge.core.overrides`'s,
validating a recipe with its components (:func:`~clipforge.core.validation.load_recipe`)
:mod:`clipforge.core.validation`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from clipforge.core.hashing import content_hash
from clipforge.core.kinds import KINDS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentRef(BaseModel):
    """A component by ``type`` with its parameters inline; the component's own params model checks them."""

    model_config = ConfigDict(extra="allow")
    type: str

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def entry(self) -> dict[str, Any]:
        return {"type": self.type, **self.fields}


class EvaluatorRef(ComponentRef):
    """An evaluator; ``dataset`` (a dataset entry) overrides the recipe's ``data.eval`` for it, and
    ``sets`` restricts it to some of the named evaluation sets."""

    dataset: ComponentRef | None = None
    name: str | None = Field(None, description="metric namespace; defaults to the type")
    sets: list[str] | None = Field(
        None, min_length=1, description="with named evaluation sets: the ones it runs on (default: all)"
    )

    @property
    def label(self) -> str:
        return self.name or self.type


class StorageConfig(_Strict):
    root: str = Field("./clipforge-store", description="local folder or s3://bucket/prefix")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (endpoint_url, ...); credentials only as ${ENV_VAR} references, resolved at run time",
    )

    @pydantic.field_validator("options")
    @classmethod
    def _no_clear_text_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        from clipforge.core.secrets import clear_text_credentials

        if found := clear_text_credentials(options):
            # the message names the fields, never their values
            raise ValueError(f"credentials must be ${{ENV_VAR}} references, not clear text: {', '.join(found)}")
        return options


#: A set name: it becomes a path part of metric names (``eval/<set>/<evaluator>/<metric>``).
SetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


def _eval_form(value: Any) -> str:
    """One dataset entry (it has a ``type``) or named evaluation sets."""
    if isinstance(value, ComponentRef) or (isinstance(value, dict) and "type" in value):
        return "__entry__"
    return "__sets__"


EvalData = Annotated[
    Annotated[ComponentRef, Tag("__entry__")] | Annotated[dict[SetName, ComponentRef], Tag("__sets__")],
    Discriminator(_eval_form),
]


class _EarlierData(_Strict):
    """Data an earlier curation made: the champion's (through the lineage tags of its registered
    version) or the one a manifest URI names."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    from_: Literal["champion"] | None = Field(
        None, alias="from", description="champion: what the registry's champion was trained on (none yet: none is used)"
    )
    manifest: str | None = Field(None, min_length=1, description="a curated manifest's URI (.../manifest.parquet)")
    model_name: str | None = Field(None, description="with from: champion, the registered model; defaults to the recipe's")

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> _EarlierData:
        if (self.from_ is None) == (self.manifest is None):
            raise ValueError("give exactly one of 'from: champion' and 'manifest: URI'")
        if self.model_name is not None and self.from_ is None:
            raise ValueError("model_name names the registered model of 'from: champion'")
        return self


class ReplayConfig(_EarlierData):
    """A seeded sample of the data an earlier model was trained on, mixed into this run's training
    data (TiC-CLIP's replay): the champion's (its curated data and what it replayed itself) or a
    curated manifest's."""

    fraction: float = Field(gt=0, lt=1, description="the share of the training pairs that are replayed")
    seed: int = Field(0, description="picks the replayed pairs")


class EvalSuiteConfig(_Strict):
    """CLIP_benchmark webdataset folders under ``root``, one per task: each becomes the named evaluation
    set ``<task>`` with the evaluator its ``dataset_type`` needs, and DataComp's aggregates ``suite/...``
    are logged (:mod:`clipforge.core.suites`)."""

    root: str = Field(min_length=1, description="a local folder or s3://bucket/prefix holding one folder per task")
    tasks: Literal["all"] | Annotated[list[SetName], Field(min_length=1)] = Field(
        "all", description="the task folders to evaluate on, or all those under root"
    )
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="the split folder of every task")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for root (endpoint_url, ...)")
    batch_size: Annotated[int, Field(gt=0)] = Field(256, description="images or texts per forward pass")
    ks: list[Annotated[int, Field(gt=0)]] = Field([1, 5, 10], min_length=1, description="recall@k of retrieval tasks")

    @pydantic.field_validator("tasks")
    @classmethod
    def _no_reserved_task(cls, tasks: Any) -> Any:
        if isinstance(tasks, list):
            if "suite" in tasks:
                raise ValueError("'suite' names the suite's aggregates (eval/suite/...), not a task")
            if len(set(tasks)) != len(tasks):
                raise ValueError("a task is listed twice")
        return tasks

    @pydantic.field_validator("storage_options")
    @classmethod
    def _no_clear_text_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        return StorageConfig._no_clear_text_credentials(options)


class MixtureSource(_Strict):
    """One source of a weighted training mixture: curated on its own, drawn in proportion to ``weight``."""

    source: ComponentRef = Field(description="a dataset entry: what this source is")
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = Field(
        1.0, description="its share of the samples drawn is weight / the sum of the weights (0: curated, never drawn)"
    )
    name: SetName | None = Field(None, description="names its counts (train/data/seen/NAME); defaults to the dataset's type")

    @property
    def label(self) -> str:
        return self.name or self.source.type


#: The name of the replayed data among a mixture's sources.
REPLAY_SOURCE = "replay"


def _train_form(value: Any) -> str:
    return "__mixture__" if isinstance(value, list) else "__entry__"


TrainData = Annotated[
    Annotated[ComponentRef, Tag("__entry__")]
    | Annotated[Annotated[list[MixtureSource], Field(min_length=1)], Tag("__mixture__")],
    Discriminator(_train_form),
]


class DataConfig(_Strict):
    train: TrainData = Field(description="one dataset entry, or a weighted mixture [{source: ENTRY, weight: W, name: NAME}, ...]")
    eval: EvalData | None = Field(
        None, description="the evaluation data: one dataset entry, or named sets {NAME: entry, ...} (metrics eval/NAME/...)"
    )
    eval_suite: EvalSuiteConfig | None = Field(
        None, description="CLIP_benchmark task folders under a root: one named evaluation set per task, and suite/ aggregates"
    )
    replay: ReplayConfig | None = None

    @pydantic.field_validator("train")
    @classmethod
    def _weights_draw_something(cls, train: Any) -> Any:
        if isinstance(train, list):
            labels = [s.label for s in train]
            if twice := sorted({label for label in labels if labels.count(label) > 1}):
                raise ValueError(f"sources named twice: {', '.join(twice)} (give each a name)")
            if REPLAY_SOURCE in labels:
                raise ValueError(f"{REPLAY_SOURCE!r} names the replayed data (data.replay); name the source otherwise")
            if not any(s.weight > 0 for s in train):
                raise ValueError("every source has weight 0: nothing would be drawn")
        return train

    @property
    def mixture(self) -> list[MixtureSource] | None:
        """The sources of a weighted mixture; None for a single dataset entry."""
        return self.train if isinstance(self.train, list) else None

    @property
    def dataset(self) -> ComponentRef:
        """The one training dataset entry (a mixture's sources are curated one at a time, each as a recipe of its own)."""
        if isinstance(self.train, list):
            raise ValueError("data.train is a mixture: each source is curated as a recipe of its own (source_recipes)")
        return self.train

    def eval_sets(self) -> dict[str | None, ComponentRef]:
        """The evaluation sets by name; the one set of the single-entry form is named None."""
        sets: dict[str | None, ComponentRef] = {}
        if isinstance(self.eval, ComponentRef):
            sets[None] = self.eval
        elif self.eval is not None:
            sets.update(self.eval)
        return sets


class WeightAverage(_Strict):
    alpha: Annotated[float, Field(ge=0, le=1)] = Field(
        description="theta = (1 - alpha) * initial + alpha * trained (WiSE-FT); 1 is plain fine-tuning"
    )


class AdapterRef(ComponentRef):
    """A parameter-efficient adapter (``register_adapters``); ``unlock`` names parameters of the model
    that train besides the adapter's own (``logit_scale``, ``logit_bias``: by name or dotted prefix)."""

    unlock: list[str] = Field(default_factory=list, description="more parameters to train: names or dotted prefixes")


class EmaConfig(_Strict):
    """An exponential moving average of the trained weights (timm's ModelEmaV3), exported instead of them."""

    decay: Annotated[float, Field(gt=0, lt=1)] = Field(0.999, description="theta_ema <- decay * theta_ema + (1 - decay) * theta")
    every: Annotated[int, Field(gt=0)] = Field(1, description="optimizer steps between updates")
    warmup: bool = Field(False, description="timm's warmup: decay = min(decay, (1 + n) / (10 + n)) at the n-th update")


class InitFrom(_Strict):
    """A warm start that may find nothing yet (a scheduled recipe's first run before any champion)."""

    model: str = Field(min_length=1, description="the model to start from (every scheme resolve_model knows)")
    if_missing: Literal["scratch", "pretrained", "fail"] = Field(
        "fail",
        description="when the model does not exist: scratch (fresh random weights), pretrained (the weights model: "
        "brings, hub or pretrained tag), fail",
    )


class Budget(_Strict):
    """What a retrain costs, fixed: samples seen (or optimizer steps), whatever the data's size."""

    samples: Annotated[int, Field(gt=0)] | None = Field(None, description="samples seen in all (steps x global batch)")
    steps: Annotated[int, Field(gt=0)] | None = Field(None, description="optimizer steps")

    @pydantic.model_validator(mode="after")
    def _one_measure(self) -> Budget:
        if (self.samples is None) == (self.steps is None):
            raise ValueError("give exactly one of samples: N and steps: N")
        return self


class TrainConfig(_Strict):
    epochs: Annotated[int, Field(gt=0)] | None = Field(None, description="passes over the training data (default 1); or a budget")
    budget: Budget | None = Field(
        None,
        description="train on a fixed number of samples or steps instead of epochs: the sources are resampled as needed "
        "and the learning-rate schedule runs over the budget",
    )
    batch_size: Annotated[int, Field(gt=1)] = 64
    lr: Annotated[float, Field(gt=0)] = 5.0e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.98
    eps: Annotated[float, Field(gt=0)] = 1.0e-6
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    seed: int = 0
    workers: Annotated[int, Field(ge=0)] = 0
    log_every: Annotated[int, Field(gt=0)] = 10
    checkpoint_every: Annotated[int, Field(gt=0)] | None = Field(
        None, description="steps between checkpoints; one is always written at the end"
    )
    accum_steps: Annotated[int, Field(gt=0)] = Field(
        1,
        description="micro-batches per optimizer step; the loss sees the whole accumulated batch (open_clip_train's accum_freq)",
    )
    grad_checkpointing: bool = False
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (slower on GPU)")
    init_from: str | InitFrom | None = Field(
        None,
        description="warm start: models:/NAME@champion, models:/NAME/VERSION, hf-hub:ORG/NAME[@REVISION], an open_clip "
        "folder or a checkpoint; {model, if_missing} to say what a missing one means",
    )
    weight_average: WeightAverage | None = Field(
        None, description="WiSE-FT with the starting weights after training (with an adapter: scales its merged update)"
    )
    adapter: AdapterRef | None = Field(None, description="parameter-efficient training: {type: lora, r: 8, ...}")
    ema: EmaConfig | None = Field(None, description="keep an EMA of the trained weights and export it")
    launcher: ComponentRef = Field(
        default_factory=lambda: ComponentRef(type="local"),
        description="how training runs: {type: local} in this process, {type: torchrun, nproc_per_node: N}, {type: ray, num_workers: N}",
    )

    @pydantic.model_validator(mode="after")
    def _budget_or_epochs(self) -> TrainConfig:
        if self.budget is not None and self.epochs is not None:
            raise ValueError("train.epochs and train.budget both set: a budget replaces the epochs, give one")
        if self.budget is None and self.epochs is None:
            self.epochs = 1
        if self.budget is not None and self.budget.samples is not None:
            launcher = self.launcher.fields
            world = launcher.get("nproc_per_node", launcher.get("num_workers", 1))
            world = (world if isinstance(world, int) else 1) * (n if isinstance(n := launcher.get("nnodes", 1), int) else 1)
            if self.budget.samples < self.batch_size * world * self.accum_steps:
                raise ValueError(
                    f"train.budget.samples={self.budget.samples} is less than one global batch (train.batch_size="
                    f"{self.batch_size} x {world} process(es) x train.accum_steps={self.accum_steps})"
                )
        return self

    @pydantic.model_validator(mode="after")
    def _averaging_needs_a_start(self) -> TrainConfig:
        if self.weight_average is not None and self.init_from is None and self.adapter is None:
            raise ValueError("weight_average averages with the initial weights: set train.init_from (or train.adapter)")
        return self

    @property
    def init_model(self) -> str | None:
        """The model ``init_from`` names, in either form."""
        return self.init_from.model if isinstance(self.init_from, InitFrom) else self.init_from

    @property
    def if_missing(self) -> Literal["scratch", "pretrained", "fail"]:
        """What a missing ``init_from`` model means; the plain string form fails."""
        return self.init_from.if_missing if isinstance(self.init_from, InitFrom) else "fail"


class ParallelConfig(_Strict):
    """How curation maps over the dataset's parts: Prefect task runners on one machine, a Dask or a Ray cluster."""

    runner: Literal["threads", "processes", "dask", "ray"] = "threads"
    workers: Annotated[int, Field(gt=0)] | None = Field(None, description="default: one per CPU core")
    address: str | None = Field(
        None, description="dask: a scheduler address; ray: a cluster address (else RAY_ADDRESS); none starts a local one"
    )
    shard_size: Annotated[int, Field(gt=0)] = Field(1000, description="pairs per curated shard")
    reduce_partitions: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1,
        description="tasks each whole-dataset step decides in (the same verdicts for any number); 1: in one process; "
        "auto: one per ~500,000 survivors",
    )

    @pydantic.field_validator("runner")
    @classmethod
    def _runner_installed(cls, runner: str) -> str:
        import importlib.util

        if runner == "ray" and not all(importlib.util.find_spec(m) for m in ("ray", "prefect_ray")):
            raise ValueError("runner 'ray' needs Ray and prefect-ray, which are not installed: pip install 'clipforge[ray]'")
        return runner


class CurationPool(_EarlierData):
    """The curated data a new curation is decided against (none yet: it curates alone)."""

    statistics: bool = Field(
        True, description="whole-dataset statistics (balance caps, a clip-score top fraction) count the pool's samples"
    )


class Guard(_Strict):
    """A metric the challenger may not lose more than ``max_drop`` of against the champion."""

    metric: str = Field(description="an evaluation metric, as the primary one is named")
    max_drop: Annotated[float, Field(ge=0)] = Field(
        description="how much worse it may get (lower, or higher where lower is better)"
    )
    confidence: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="refuse when the upper bound of the drop's paired-bootstrap interval at this confidence passes max_drop"
    )


class PromoteConfig(_Strict):
    metric: str = Field(
        description="evaluation metric, as '<evaluator>/<metric>' or '<set>/<evaluator>/<metric>' (the 'eval/' prefix is optional)"
    )
    mode: Literal["max", "min"] = "max"
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    guards: list[Guard] = Field(default_factory=list, description="metrics the challenger may not lose more than their budget of")
    confidence: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="promote only when the lower bound of a paired bootstrap of (challenger - champion) on the metric, "
        "at this confidence, is above min_delta",
    )
    resamples: Annotated[int, Field(ge=100)] = Field(2000, description="bootstrap resamples")
    seed: int = Field(0, description="seeds the bootstrap's resamples")
    approval: bool = Field(
        False, description="a person approves before champion moves (Prefect UI, or clipforge approve MODEL VERSION)"
    )
    approval_timeout_s: Annotated[int, Field(gt=0)] = Field(
        86400, description="how long the register flow waits for the approval before it fails"
    )

    def gates_on_samples(self) -> bool:
        """Whether the decision needs per-sample results (a confidence on the metric or on a guard)."""
        return self.confidence is not None or any(g.confidence is not None for g in self.guards)


class RegistryConfig(_Strict):
    model_name: str | None = Field(None, description="registered model name; defaults to the recipe's name")
    promote: PromoteConfig | None = None


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow experiment and default model name")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig
    curation: list[ComponentRef] = Field(default_factory=list)
    curation_pool: CurationPool | None = Field(
        None, description="curate against earlier curated data: drop duplicates of it, count it in whole-dataset statistics"
    )
    model: ComponentRef
    loss: ComponentRef = Field(default_factory=lambda: ComponentRef(type="clip"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: list[EvaluatorRef] = Field(default_factory=list)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name

    def source_recipes(self) -> list[tuple[MixtureSource, Recipe]]:
        """Each source of the training data with the recipe that curates it alone: a mixture's sources
        (without the replay, which is drawn from curated data), or the one entry at weight 1."""
        mixture = self.data.mixture
        if mixture is None:
            return [(MixtureSource(source=self.data.dataset), self)]
        return [(s, self.model_copy(update={"data": self.data.model_copy(update={"train": s.source})})) for s in mixture]

    def draws_by_weight(self) -> bool:
        """Whether training draws its batches from weighted sources over a sample count (a mixture or a
        budget) rather than passing over one stream of shards epoch by epoch."""
        return self.data.mixture is not None or self.train.budget is not None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def digest(self, *sections: str) -> str:
        """sha256 of the canonical JSON of the whole recipe, or of the named sections only."""
        data = self.as_dict()
        if sections:
            data = {k: data.get(k) for k in sections}
        return content_hash(data)

    def component_entries(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every component the recipe references, as ``(kind, field path, entry)``."""
        return component_entries(self.model_dump(mode="json", exclude_none=True))


def component_entries(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The component entries of a recipe's raw data as ``(kind, field path, entry)``, in the order the
    recipe lists them, the host's own fields left out; what is malformed is skipped (validation reports it)."""
    # a component the recipe leaves at its default (the loss) is checked too
    data = {**data, **{name: entry for name in _TOP_LEVEL_COMPONENTS if name not in data and (entry := default_entry(name))}}
    found: list[tuple[tuple[int, ...], str, str, dict[str, Any]]] = []
    for kind in KINDS.values():
        for pattern in kind.recipe_fields:
            for position, path, entry in _walk(data, pattern.split("."), (), ""):
                if isinstance(entry, dict) and isinstance(entry.get("type"), str):
                    fields = {k: v for k, v in entry.items() if k not in kind.host_fields}
                    found.append((position, kind.name, path, fields))
    return [(kind, path, entry) for _, kind, path, entry in sorted(found, key=lambda f: f[0])]


def _walk(node: Any, parts: list[str], position: tuple[int, ...], path: str) -> Iterator[tuple[tuple[int, ...], str, Any]]:
    """What ``parts`` (``*``: every list item or mapping value) names under ``node``, with its
    position in the document (for ordering) and its dotted path."""
    if not parts:
        yield position, path, node
        return
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
        for key in keys:
            yield from _walk(node[key], rest, (*position, list(node).index(key)), f"{path}.{key}" if path else str(key))
    elif isinstance(node, list) and head == "*":
        for i, item in enumerate(node):
            yield from _walk(item, rest, (*position, i), f"{path}.{i}")


def default_entry(path: str) -> dict[str, Any] | None:
    """The entry a component field (``loss``, ``train.launcher``) has when the recipe leaves it out;
    None where the field has no component default."""
    model: type[BaseModel] = Recipe
    parts = path.split(".")
    for depth, name in enumerate(parts):
        field = model.model_fields.get(name)
        if field is None:
            return None
        if depth == len(parts) - 1:
            default = field.get_default(call_default_factory=True)
            return default.entry() if isinstance(default, ComponentRef) else None
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return None


#: The recipe fields that hold components (``*``: every item of a list or value of a mapping), from :data:`KINDS`.
COMPONENT_FIELDS = tuple(pattern for kind in KINDS.values() for pattern in kind.recipe_fields)
_TOP_LEVEL_COMPONENTS = tuple(p for p in COMPONENT_FIELDS if "." not in p)
