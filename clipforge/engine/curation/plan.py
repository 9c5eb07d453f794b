"""What a curation is made of: its key on the store, its parts, its steps (built once per process)."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from clipforge.core.catalog import Catalog
from clipforge.core.components import CurationStep, PartitionedDataset, WholeDatasetStep
from clipforge.core.errors import ConfigError
from clipforge.core.hashing import content_hash
from clipforge.core.plugins import get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.core.storage import Store
from clipforge.engine.curation.layout import FORMAT_VERSION

if TYPE_CHECKING:
    from clipforge.engine.curation.pool import PoolChain


def curation_key(recipe: Recipe, pool: PoolChain | None = None, catalog: Catalog | None = None) -> str:
    """Curated data depends only on the training data, the steps, the image size and the pool curated
    against (its curations' content hashes): one folder per such set. ``catalog`` tells the image
    size (:func:`input_size`)."""
    spec: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "data": recipe.data.dataset.entry(),
        "steps": [s.entry() for s in recipe.curation],
        "size": input_size(recipe, catalog),
    }
    if pool is not None:
        spec["pool"] = pool.identity()
    return content_hash(spec, 16)


def input_size(recipe: Recipe, catalog: Catalog | None = None) -> int | None:
    """The model's input side in pixels, when its encoder tells it from the recipe entry
    (:meth:`~clipforge.core.catalog.Component.input_size`); ``catalog``: the process-wide one unless given."""
    catalog = catalog if catalog is not None else get_plugin_manager().catalog
    return catalog.get("encoders", recipe.model.type).input_size(recipe.model.fields)


def step_labels(recipe: Recipe) -> list[str]:
    labels = [s.type for s in recipe.curation]
    if len(set(labels)) != len(labels):  # two steps of one type: number them so counts stay apart
        labels = [f"{i}-{name}" for i, name in enumerate(labels)]
    return labels


class Steps:
    """A recipe's curation steps, built: the per-sample ones (``local``) and the whole-dataset ones,
    each with its label; ``types`` gives each label's registered type."""

    def __init__(self, labelled: list[tuple[str, Any]], types: dict[str, str]) -> None:
        self.local = [(label, s) for label, s in labelled if not isinstance(s, WholeDatasetStep)]
        self.whole = [(label, s) for label, s in labelled if isinstance(s, WholeDatasetStep)]
        self.types = types


def build_steps(recipe: Recipe, catalog: Catalog) -> Steps:
    """The recipe's steps, built once per process and catalog (a scoring model is loaded once, not per part)."""
    return _built(
        catalog,
        json.dumps([(label, s.entry()) for label, s in zip(step_labels(recipe), recipe.curation)], default=str),
        json.dumps(recipe.storage.options),
    )


@functools.lru_cache(maxsize=8)
def _built(catalog: Catalog, entries: str, storage_options: str) -> Steps:
    parsed = json.loads(entries)
    options = json.loads(storage_options)
    labelled = [(label, catalog.create("curation_steps", entry, options)) for label, entry in parsed]
    first_whole = None
    for i, (label, step) in enumerate(labelled):
        if not isinstance(step, (CurationStep, WholeDatasetStep)):
            raise ConfigError(
                f"curation.{i} ({label}): the factory returned a {type(step).__name__}, neither a per-sample step "
                "(callable on a batch) nor a whole-dataset step (features and decide)"
            )
        if isinstance(step, WholeDatasetStep):
            first_whole = first_whole or (i, label)
        elif first_whole:  # caught at validation unless the factory's shape depends on what it builds
            raise ConfigError(
                f"curation.{i} ({label}) decides sample by sample and must come before "
                f"curation.{first_whole[0]} ({first_whole[1]}), which decides over the whole dataset"
            )
    return Steps(labelled, {label: entry["type"] for label, entry in parsed})


def parts_of(recipe: Recipe, catalog: Catalog) -> list[dict[str, Any]]:
    """The dataset entries of the parts that run in parallel (the whole dataset where it cannot split)."""
    entry = recipe.data.dataset.entry()
    dataset = catalog.create("datasets", entry)
    return dataset.parts() if isinstance(dataset, PartitionedDataset) else [entry]


class Job(BaseModel):
    """What a curation task needs, picklable: it may run in another process or on another machine.

    The recipe travels validated; a task only rebuilds the catalog and the store.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: Recipe
    store: str  # the store's URL; its options are the recipe's
    out: str
    index: int

    def open(self) -> tuple[Recipe, Catalog, Store]:
        """The recipe, the catalog and the store in this process."""
        return self.recipe, get_plugin_manager().catalog, Store(self.store, self.recipe.storage.options)
