"""clipforge: curate, train, evaluate and register CLIP-style models, one plugin-driven loop.

The public surface is what this module exports; everything else may move.
"""

from importlib import metadata as _metadata

from clipforge.core.catalog import Catalog, Component, RegisterFn
from clipforge.core.checkpoint import model_cfg_of
from clipforge.core.components import (
    Adapter,
    Block,
    ChecksInputs,
    ChoosesHyperparameters,
    ClassificationDataset,
    ContrastiveLoss,
    CurationStep,
    Dataset,
    DecidesAgainstPool,
    DecidesInPartitions,
    DeclaresInputSize,
    DeclaresPixels,
    DigestsContent,
    EncoderBundle,
    Evaluator,
    Launcher,
    MultilabelDataset,
    NeedsClasses,
    NeedsInputs,
    PartitionedDataset,
    PerSample,
    Pool,
    Preparable,
    ReportsDetails,
    ReportsPerSample,
    Sample,
    ScopedParams,
    SkipsSamples,
    TemplatedDataset,
    Verdict,
    WholeDatasetStep,
    check_template,
)
from clipforge.core.context import RunContext
from clipforge.core.embeddings import embed_images, embed_texts
from clipforge.core.errors import (
    ClipforgeError,
    ConfigError,
    DuplicateComponentError,
    RecipeError,
    StageError,
    UnknownComponentError,
)
from clipforge.core.hashing import content_hash
from clipforge.core.hookspecs import hookimpl
from clipforge.core.plugins import PluginManager, get_plugin_manager
from clipforge.core.recipe import Recipe
from clipforge.core.resolver import ResolvedModel, resolve_model
from clipforge.core.results import CurateResult, EvaluateResult, RegisterResult, TrainResult
from clipforge.core.stages import STAGES, RetrainResult, Stage, StageResults
from clipforge.core.storage import Store, open_input, read_all
from clipforge.core.tarstream import TarDamage, TarMember, read_tar
from clipforge.core.validation import load_recipe

try:
    __version__ = _metadata.version("clipforge")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "STAGES",
    "Adapter",
    "Block",
    "Catalog",
    "ChecksInputs",
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
    "DecidesInPartitions",
    "DeclaresInputSize",
    "DeclaresPixels",
    "DigestsContent",
    "DuplicateComponentError",
    "EncoderBundle",
    "EvaluateResult",
    "Evaluator",
    "Launcher",
    "MultilabelDataset",
    "NeedsClasses",
    "NeedsInputs",
    "PartitionedDataset",
    "PerSample",
    "PluginManager",
    "Pool",
    "Preparable",
    "Recipe",
    "RecipeError",
    "RegisterFn",
    "RegisterResult",
    "ReportsDetails",
    "ReportsPerSample",
    "ResolvedModel",
    "RetrainResult",
    "RunContext",
    "Sample",
    "ScopedParams",
    "SkipsSamples",
    "Stage",
    "StageError",
    "StageResults",
    "Store",
    "TarDamage",
    "TarMember",
    "TemplatedDataset",
    "TrainResult",
    "UnknownComponentError",
    "Verdict",
    "WholeDatasetStep",
    "__version__",
    "check_template",
    "content_hash",
    "embed_images",
    "embed_texts",
    "get_plugin_manager",
    "hookimpl",
    "load_recipe",
    "model_cfg_of",
    "open_input",
    "read_all",
    "read_tar",
    "resolve_model",
]
