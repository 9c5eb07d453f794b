"""Catalogs of components by kind: what plugins register, and how a recipe entry becomes an object."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pydantic

from clipforge.core.components import ChecksInputs, DeclaresInputSize, NeedsClasses, ScopedParams, WholeDatasetStep
from clipforge.core.errors import DuplicateComponentError, RecipeError, UnknownComponentError
from clipforge.core.kinds import KINDS, noun


class RegisterFn(Protocol):
    """The callback a registration hook receives."""

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any],
        params: type[pydantic.BaseModel] | None = None,
        description: str = "",
    ) -> None: ...


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[pydantic.BaseModel] | None
    description: str
    plugin: str

    def check(self, fields: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """Validate a recipe entry's fields; return the factory's keyword arguments and the errors.

        Error paths are relative to the entry (``width``, ``vision_cfg.layers``).
        """
        if self.params is not None:
            known = {n for n, f in self.params.model_fields.items()} | {
                f.alias for f in self.params.model_fields.values() if f.alias
            }
            # pydantic's default silently ignores unknown fields; a typo must not pass unnoticed
            checked_by_pydantic = self.params.model_config.get("extra") in ("allow", "forbid")
            errors = [
                (k, "unknown parameter; expected one of: " + ", ".join(sorted(known)))
                for k in fields
                if k not in known and not checked_by_pydantic
            ]
            try:
                model = self.params.model_validate(fields)
            except pydantic.ValidationError as e:
                errors += [
                    (
                        ".".join(str(p) for p in err["loc"]),
                        f"unknown parameter; expected one of: {', '.join(sorted(known))}"
                        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1
                        else err["msg"],
                    )
                    for err in e.errors()
                ]
                return {}, errors
            return ({} if errors else dict(model)), errors
        try:
            inspect.signature(self.factory).bind(**fields)
        except TypeError as e:
            return {}, [("", f"{noun(self.kind)} {self.name!r}: {e}")]
        return dict(fields), []

    def create(self, fields: dict[str, Any], storage_options: dict[str, Any] | None = None) -> Any:
        """Build the component from a recipe entry's fields; ``storage_options`` (the recipe's
        ``storage.options``) go to a factory that :meth:`takes_storage_options`."""
        kwargs, errors = self.check(fields)
        if errors:
            raise RecipeError(errors, source=f"{self.kind} {self.name!r}")
        if storage_options is not None and self.takes_storage_options():
            kwargs["storage_options"] = storage_options
        return self.factory(**kwargs)

    def takes_storage_options(self) -> bool:
        """Whether the host passes the recipe's ``storage.options`` to the factory: it has a ``storage_options``
        parameter that is not a recipe field (not in its params model; a factory without one has only fields)."""
        if self.params is None or "storage_options" in self.params.model_fields:
            return False
        try:
            parameters = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            return False
        return "storage_options" in parameters

    def whole_dataset(self, fields: dict[str, Any]) -> bool | None:
        """Whether this curation step entry builds a whole-dataset step, known without building it.

        A class factory says it by its methods; a function factory by its params model
        (:class:`~clipforge.core.components.ScopedParams`). None when only building would tell.
        """
        if isinstance(self.factory, type):
            return issubclass(self.factory, WholeDatasetStep)
        if self.params is not None:
            try:
                params = self.params.model_validate(fields)
            except pydantic.ValidationError:
                return None  # reported by check()
            if isinstance(params, ScopedParams):
                return params.whole_dataset()
        return None

    def check_inputs(self, fields: dict[str, Any]) -> list[tuple[str, str]]:
        """What is wrong with the inputs this entry names outside the recipe (its params model's
        :class:`~clipforge.core.components.ChecksInputs`), paths relative to the entry; [] when it does not say."""
        if self.params is None:
            return []
        try:
            params = self.params.model_validate(fields)
        except pydantic.ValidationError:
            return []  # reported by check()
        return params.check_inputs() if isinstance(params, ChecksInputs) else []

    def needs_classes(self) -> bool:
        """Whether this evaluator works only on a dataset with classes (:class:`~clipforge.core.components.NeedsClasses`
        on its factory), known without building it."""
        return isinstance(self.factory, NeedsClasses) and bool(self.factory.needs_classes)

    def input_size(self, fields: dict[str, Any]) -> int | None:
        """The side in pixels of the images this encoder entry's model reads, known without building
        it (its params model's :class:`~clipforge.core.components.DeclaresInputSize`); None when it does not say."""
        if self.params is None:
            return None
        try:
            params = self.params.model_validate(fields)
        except pydantic.ValidationError:
            return None  # reported by check()
        return params.input_size() if isinstance(params, DeclaresInputSize) else None


class Catalog:
    """Every registered component, by kind and name."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}

    def add(self, component: Component) -> None:
        existing = self._components[component.kind].get(component.name)
        if existing is not None:
            raise DuplicateComponentError(component.kind, component.name, existing.plugin, component.plugin)
        self._components[component.kind][component.name] = component

    def registrar(self, kind: str, plugin: str) -> RegisterFn:
        """The ``register`` callback handed to ``plugin``'s registration hook for ``kind``."""

        def register(name, factory, params=None, description=""):
            if params is not None and not (isinstance(params, type) and issubclass(params, pydantic.BaseModel)):
                raise TypeError(f"{plugin}: params of {kind} {name!r} must be a pydantic model class")
            description = description or (inspect.getdoc(factory) or "").split("\n")[0]
            self.add(Component(kind, name, factory, params, description, plugin))

        return register

    def get(self, kind: str, name: str) -> Component:
        try:
            return self._components[kind][name]
        except KeyError:
            raise UnknownComponentError(kind, name, self.names(kind)) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def __iter__(self) -> Iterator[Component]:
        for kind in KINDS:
            yield from self._components[kind].values()

    def create(self, kind: str, entry: dict[str, Any], storage_options: dict[str, Any] | None = None) -> Any:
        """Build a component from a recipe entry ``{"type": name, **fields}`` (``storage_options``: see :meth:`Component.create`)."""
        fields = dict(entry)
        return self.get(kind, fields.pop("type")).create(fields, storage_options)
