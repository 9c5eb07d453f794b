"""clipforge: curate, train, evaluate and register CLIP-style models, one plugin-driven loop.

The public surface is what this module exports; everything else may move.
"""

from importlib.metadata import PackageNotFoundError, version

from clipforge.core.catalog import Catalog, Component, RegisterFn
from clipforge.core.components import (
    ChoosesHyperparameters,
    ClassificationDataset,
    ContrastiveLoss,
    CurationStep,
    Dataset,
    DecidesAgainstPool,
    DeclaresInputSize,
    DeclaresPixels,
    EncoderBundle,
    Evaluator,
    NeedsInputs,
    PartitionedDataset,
    Pool,
    Preparable,
    ReportsDetails,
    Sample,
    ScopedParams,
    TemplatedDataset,
    Verdict,
    WholeDatasetStep,
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
from clipforge.core.recipe import Recipe
from clipforge.core.resolver import ResolvedModel, resolve_model
from clipforge.core.results import CurateResult, EvaluateResult, RegisterResult, TrainResult
from clipforge.core.stages import STAGES, RetrainResult, Stage, StageResults
from clipforge.core.storage import Store
from clipforge.core.validation import load_recipe

try:
    __version__ = version("clipforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "STAGES",
    "Catalog",
    "ChoosesHyperparameters",
    "ClassificationDataset",
    "ClipforgeError",
    "Component",
    "ConfigError",
    "ContrastiveLoss",
    "CurateResult",
    "CurationStep",
    "Dataset",
    "DecidesAgainstPool",
    "DeclaresInputSize",
    "DeclaresPixels",
    "DuplicateComponentError",
    "EncoderBundle",
    "EvaluateResult",
    "Evaluator",
    "NeedsInputs",
    "PartitionedDataset",
    "PluginManager",
    "Pool",
    "Preparable",
    "Recipe",
    "RecipeError",
    "RegisterFn",
    "RegisterResult",
    "ReportsDetails",
    "ResolvedModel",
    "RetrainResult",
    "RunContext",
    "Sample",
    "ScopedParams",
    "Stage",
    "StageError",
    "StageResults",
    "Store",
    "TemplatedDataset",
    "TrainResult",
    "UnknownComponentError",
    "Verdict",
    "WholeDatasetStep",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
    "load_recipe",
    "resolve_model",
]
