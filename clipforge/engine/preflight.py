"""Pre-flight: what a valid recipe names outside itself, checked before a run spends minutes on it.

:func:`~clipforge.core.validation.load_recipe` checks the recipe alone; this reads what it points
at, quickly and without running anything heavy: the storage root can be written, the inputs that
components name exist and have what they read (:class:`~clipforge.core.components.ChecksInputs`:
a table's columns, an entries file, shards), and every evaluator that needs classes
(:class:`~clipforge.core.components.NeedsClasses`) gets evaluation sets that have them (the sets
are built, not iterated). Model references in the registry are checked by
:func:`clipforge.registry.references.check_model_references`. ``clipforge validate`` runs both, and
``clipforge run`` / ``demo`` before the first stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from clipforge.core.catalog import Catalog
from clipforge.core.components import ClassificationDataset
from clipforge.core.errors import ClipforgeError, UnknownComponentError
from clipforge.core.recipe import Recipe


def preflight(recipe: Recipe, catalog: Catalog) -> list[tuple[str, str]]:
    """Every problem found, as ``(field path, message)``; [] when a run can start."""
    inputs = check_component_inputs(recipe, catalog)
    return check_storage_root(recipe.storage.root) + inputs + check_evaluator_sets(recipe, catalog, {p for p, _ in inputs})


def check_storage_root(root: str) -> list[tuple[str, str]]:
    """A local root must be a folder that exists or whose parent does, writable; a remote one is the
    store's to refuse (its credentials come at run time)."""
    scheme = urlparse(root).scheme
    if len(scheme) > 1 and scheme != "file":  # one letter: a Windows drive
        return []
    path = Path(root.removeprefix("file://")).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [("storage.root", f"{root}: {existing} is a file, not a folder")]
    if existing != path and existing != path.parent:
        return [("storage.root", f"{root}: its parent folder {path.parent} does not exist; create it or choose another root")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [("storage.root", f"{root}: {existing} is not writable")]
    return []


def check_component_inputs(recipe: Recipe, catalog: Catalog) -> list[tuple[str, str]]:
    errors = []
    for kind, path, entry in recipe.component_entries():
        fields = dict(entry)
        try:
            component = catalog.get(kind, fields.pop("type"))
        except UnknownComponentError:
            continue  # reported by validation
        errors += [(f"{path}.{field}" if field else path, msg) for field, msg in component.check_inputs(fields)]
    return errors


def check_evaluator_sets(
    recipe: Recipe, catalog: Catalog, failed: set[str] | frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Each evaluator that needs classes, against each set it will run on; a set with an input
    reported in ``failed`` (field paths) is not built again."""
    sets = recipe.data.eval_sets()
    built: dict[str, object] = {}
    errors = []
    for i, ev in enumerate(recipe.evaluation):
        try:
            if not catalog.get("evaluators", ev.type).needs_classes():
                continue
        except UnknownComponentError:
            continue
        if ev.dataset is not None:
            targets = [(f"evaluation.{i}.dataset", ev.dataset.entry())]
        else:
            targets = [
                ("data.eval" if name is None else f"data.eval.{name}", ref.entry())
                for name, ref in sets.items()
                if ev.sets is None or name in ev.sets
            ]
        if not targets:
            errors.append((f"evaluation.{i}", f"{ev.label} needs an evaluation set with classes: set data.eval or its dataset"))
        for path, entry in targets:
            if any(f.startswith(path + ".") for f in failed):
                continue
            if path not in built:
                try:
                    built[path] = catalog.create("datasets", entry, recipe.storage.options)
                except (ClipforgeError, OSError, ValueError) as e:
                    built[path] = e
                    errors.append((path, str(e)))
                    continue
            dataset = built[path]
            if not isinstance(dataset, Exception) and not isinstance(dataset, ClassificationDataset):
                errors.append(
                    (
                        f"evaluation.{i}",
                        f"{ev.label} needs classes, and {path} ({entry['type']}) has none: "
                        f"give it a classification dataset, or drop {ev.label}",
                    )
                )
    return errors
