"""The errors clipforge raises on bad input; the command line turns each into one message and exit 2."""

from __future__ import annotations

from clipforge.core.kinds import noun


class ClipforgeError(Exception):
    """Base of every error clipforge raises on purpose."""


class ConfigError(ClipforgeError):
    """Bad input: a recipe, an argument, a component reference. Exit code 2."""


class RecipeError(ConfigError):
    """A recipe failed validation; ``errors`` holds ``(field path, message)`` pairs, all of them."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "recipe"):
        self.errors = errors
        self.source = source
        lines = "\n".join(f"  {path}: {msg}" if path else f"  {msg}" for path, msg in errors)
        count = "1 error" if len(errors) == 1 else f"{len(errors)} errors"
        super().__init__(f"{source}: {count}\n{lines}")


class UnknownComponentError(ConfigError):
    """A recipe names a component no plugin registered."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"unknown {noun(kind)} {name!r}; available: {names}")


class DuplicateComponentError(ClipforgeError):
    """Two plugins registered one name for one kind."""

    def __init__(self, kind: str, name: str, first: str, second: str):
        super().__init__(
            f"{noun(kind)} {name!r} is registered twice: "
            f"by {first!r} and by {second!r}; disable one (CLIPFORGE_DISABLE_PLUGINS) or rename it"
        )


class StageError(ClipforgeError):
    """A stage could not run (missing input, a dataset smaller than a batch, a NaN loss). Exit 1."""
