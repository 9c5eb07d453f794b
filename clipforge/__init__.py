"""clipforge: curate, train, evaluate and register CLIP-style models, one plugin-driven loop.

The public surface is what this module exports; everything else may move.
"""

from importlib.metadata import PackageNotFoundError, version

from clipforge.core.catalog import Catalog, Component, RegisterFn
from clipforge.core.components import (
    ClassificationDataset,
    ContrastiveLoss,
    CurationStep,
    EncoderBundle,
    Evaluator,
    Sample,
    Verdict,
)
from clipforge.core.context import RunContext
from clipforge.core.errors import (
    ClipforgeError,
    ConfigError,
    DuplicateComponentError,
    RecipeError,
    StageError,
    UnknownComponentError,
)
from clipforge.core.hookspecs import hookimpl
from clipforge.core.plugins import PluginManager, get_plugin_manager
from clipforge.core.recipe import Recipe, load_recipe
from clipforge.core.storage import Store

try:
    __version__ = version("clipforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Catalog",
    "ClassificationDataset",
    "ClipforgeError",
    "Component",
    "ConfigError",
    "ContrastiveLoss",
    "CurationStep",
    "DuplicateComponentError",
    "EncoderBundle",
    "Evaluator",
    "PluginManager",
    "Recipe",
    "RecipeError",
    "RegisterFn",
    "RunContext",
    "Sample",
    "StageError",
    "Store",
    "UnknownComponentError",
    "Verdict",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
    "load_recipe",
]
