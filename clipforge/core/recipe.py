"""Recipes: one YAML file describes a whole retrain; pydantic validates it, field paths and all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from clipforge.core.catalog import Catalog
from clipforge.core.errors import ConfigError, RecipeError, UnknownComponentError
from clipforge.core.hashing import content_hash
from clipforge.core.kinds import KINDS
from clipforge.core.metrics import EVAL_PREFIX


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


class DataConfig(_Strict):
    train: ComponentRef
    eval: EvalData | None = Field(
        None, description="the evaluation data: one dataset entry, or named sets {NAME: entry, ...} (metrics eval/NAME/...)"
    )
    replay: ReplayConfig | None = None

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


class TrainConfig(_Strict):
    epochs: Annotated[int, Field(gt=0)] = 1
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
    init_from: str | None = Field(
        None, description="warm start: models:/NAME@champion, models:/NAME/VERSION, an open_clip folder or a checkpoint"
    )
    weight_average: WeightAverage | None = Field(None, description="WiSE-FT with the init_from weights after training")
    launcher: ComponentRef = Field(
        default_factory=lambda: ComponentRef(type="local"),
        description="how training runs: {type: local} in this process, {type: torchrun, nproc_per_node: N}, {type: ray, num_workers: N}",
    )

    @pydantic.model_validator(mode="after")
    def _averaging_needs_a_start(self) -> TrainConfig:
        if self.weight_average is not None and self.init_from is None:
            raise ValueError("weight_average averages with the initial weights: set train.init_from")
        return self


class ParallelConfig(_Strict):
    """How curation maps over the dataset's parts: Prefect task runners on one machine, a Dask or a Ray cluster."""

    runner: Literal["threads", "processes", "dask", "ray"] = "threads"
    workers: Annotated[int, Field(gt=0)] | None = Field(None, description="default: one per CPU core")
    address: str | None = Field(
        None, description="dask: a scheduler address; ray: a cluster address (else RAY_ADDRESS); none starts a local one"
    )
    shard_size: Annotated[int, Field(gt=0)] = Field(1000, description="pairs per curated shard")

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


class PromoteConfig(_Strict):
    metric: str = Field(
        description="evaluation metric, as '<evaluator>/<metric>' or '<set>/<evaluator>/<metric>' (the 'eval/' prefix is optional)"
    )
    mode: Literal["max", "min"] = "max"
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    guards: list[Guard] = Field(default_factory=list, description="metrics the challenger may not lose more than their budget of")


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
    data = {**data, "loss": data.get("loss", {"type": "clip"})}  # the default loss is checked too
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


def builtin_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the package (``shapes`` is the embedded default)."""
    path = Path(str(resources.files("clipforge") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no built-in recipe {name!r}")
    return path


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: key {key!r} is given twice (first on line {first})")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader (no tag builds an object), refusing a key given twice in one mapping:
    PyYAML would keep the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys given after it override the merged ones on purpose
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: the base class refuses it with its own message
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text as plain data (:class:`_Loader`); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a recipe file")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = "not text" if b"\0" in raw else "not UTF-8"
        raise ConfigError(f"{path}: {kind} (byte {e.start}: {raw[e.start : e.start + 1]!r}); a recipe is UTF-8 YAML") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError([("", f"the recipe must be a mapping, got {type(data).__name__}")], source=str(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a recipe's raw data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=1")
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]), item)
        leaf = parts[-1]
        if isinstance(node, list):
            _child(node, leaf, key, item)
            node[int(leaf)] = _override_value(raw, item)
        elif isinstance(node, dict):
            if leaf not in node and not _is_known_field(data, parts):
                raise ConfigError(f"--set {item!r}: {key!r} is not a field of the recipe")
            node[leaf] = _override_value(raw, item)
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])!r} is not a section")
    return data


def _override_value(raw: str, item: str) -> Any:
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None


def _child(node: Any, part: str, path: str, item: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, dict) and part in _SECTIONS and path == part:
        return node.setdefault(part, {})
    if isinstance(node, dict) and (default := _component_default(path)) is not None:
        return node.setdefault(part, default)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    raise ConfigError(f"--set {item!r}: {path!r} is not in the recipe")


# Sections whose fields --set may add although the file leaves them at their defaults.
_SECTIONS: dict[str, type[BaseModel]] = {
    "storage": StorageConfig,
    "train": TrainConfig,
    "registry": RegistryConfig,
    "parallel": ParallelConfig,
    "curation_pool": CurationPool,
}


def _component_default(path: str) -> dict[str, Any] | None:
    """The default entry of a component field of a section (``train.launcher``), for --set to fill in."""
    section, _, name = path.partition(".")
    field = _SECTIONS[section].model_fields.get(name) if section in _SECTIONS else None
    if field is None or field.annotation is not ComponentRef:
        return None
    return field.get_default(call_default_factory=True).entry()


def _is_known_field(data: dict[str, Any], parts: list[str]) -> bool:
    if len(parts) >= 3 and _component_default(".".join(parts[:2])) is not None:
        return True  # a component's parameter: its params model checks it
    if len(parts) == 2 and parts[0] in _SECTIONS:
        return parts[1] in {f.alias or name for name, f in _SECTIONS[parts[0]].model_fields.items()}
    if parts[0] == "registry" and len(parts) == 3 and parts[1] == "promote":
        return parts[2] in PromoteConfig.model_fields
    # component parameters are checked by the component's params model after the override
    return parts[0] in {"model", "loss", "data", "curation", "evaluation"}


def load_recipe(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    catalog: Catalog | None = None,
    check_components: bool = True,
) -> Recipe:
    """Read, override and validate a recipe; raise :class:`RecipeError` with every error and its path.

    ``source`` is a YAML path or an already-parsed mapping. Components are checked against the
    catalog of the process-wide plugin manager unless ``catalog`` is given.
    """
    label = "recipe" if isinstance(source, dict) else str(source)
    data = json.loads(json.dumps(source)) if isinstance(source, dict) else read_yaml(source)
    data = apply_overrides(data, overrides)
    errors: list[tuple[str, str]] = []
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as e:
        errors += [(_loc(err["loc"]), err["msg"]) for err in e.errors()]
    if check_components:
        if catalog is None:
            from clipforge.core.plugins import get_plugin_manager

            catalog = get_plugin_manager().catalog
        errors += check_components_of(data, catalog)
        errors += _check_curation_order(data, catalog)
    if recipe is not None:
        errors += _check_promotion(recipe)
    if errors or recipe is None:
        raise RecipeError(errors, source=label)
    return recipe


def _check_promotion(recipe: Recipe) -> list[tuple[str, str]]:
    """The promotion metric and the guarded ones must come from the recipe's evaluators (and sets)."""
    rule = recipe.registry.promote
    if rule is None:
        return []
    labels = [ev.label for ev in recipe.evaluation]
    sets = [name for name in recipe.data.eval_sets() if name is not None]
    errors = []
    named = [("registry.promote.metric", rule.metric)] + [
        (f"registry.promote.guards.{i}.metric", g.metric) for i, g in enumerate(rule.guards)
    ]
    for path, metric in named:
        parts = metric.removeprefix(EVAL_PREFIX).split("/")
        if sets and not (len(parts) >= 3 and parts[0] in sets and parts[1] in labels):
            errors.append(
                (
                    path,
                    f"{metric!r} is not '<set>/<evaluator>/<metric>' of this recipe's sets ({', '.join(sets)}) and evaluators ({', '.join(labels) or 'none'})",
                )
            )
        elif not sets and not (len(parts) >= 2 and parts[0] in labels):
            errors.append(
                (path, f"{metric!r} is not '<evaluator>/<metric>' of an evaluator of this recipe ({', '.join(labels) or 'none'})")
            )
    for i, ev in enumerate(recipe.evaluation):
        unknown = sorted(set(ev.sets or []) - set(sets))
        if unknown:
            errors.append(
                (
                    f"evaluation.{i}.sets",
                    f"no evaluation set {', '.join(map(repr, unknown))}; data.eval names: {', '.join(sets) or 'none'}",
                )
            )
    return errors


def check_components_of(data: dict[str, Any], catalog: Catalog) -> list[tuple[str, str]]:
    """Validate every component entry of a recipe's raw data against its registered params, with full paths."""
    errors: list[tuple[str, str]] = []
    for kind, path, entry in component_entries(data):
        fields = dict(entry)
        name = fields.pop("type")
        try:
            component = catalog.get(kind, name)
        except UnknownComponentError as e:
            errors.append((f"{path}.type", str(e)))
            continue
        _, errs = component.check(fields)
        errors += [(f"{path}.{p}" if p else path, msg) for p, msg in errs]
    return errors


def _check_curation_order(data: dict[str, Any], catalog: Catalog) -> list[tuple[str, str]]:
    """Per-sample steps run in parallel before the whole-dataset steps decide: a recipe listing one
    after the other is refused, naming both (told without building the steps, see
    :meth:`~clipforge.core.catalog.Component.whole_dataset`)."""
    steps = data.get("curation")
    first_whole: tuple[int, str] | None = None
    errors = []
    for i, entry in enumerate(steps if isinstance(steps, list) else []):
        if not (
            isinstance(entry, dict) and isinstance(entry.get("type"), str) and entry["type"] in catalog.names("curation_steps")
        ):
            continue  # malformed or unknown: reported by the other checks
        whole = catalog.get("curation_steps", entry["type"]).whole_dataset({k: v for k, v in entry.items() if k != "type"})
        if whole and first_whole is None:
            first_whole = (i, entry["type"])
        elif whole is False and first_whole is not None:
            errors.append(
                (
                    "curation",
                    f"curation.{i} ({entry['type']}) decides sample by sample and must come before "
                    f"curation.{first_whole[0]} ({first_whole[1]}), which decides over the whole dataset",
                )
            )
    return errors


def _loc(loc: tuple[Any, ...]) -> str:
    # a form of a union chosen by its shape (data.eval) is no part of the recipe's paths
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("__")))
