"""MLflow for clipforge: tracking runs, the pyfunc model, registered versions, aliases and promotion.

- :mod:`~clipforge.registry.tracking`: everything the flows and the command line say to MLflow:
  tracking URI, experiments, a retrain's run and what it logs, versions, the ``mlflow ui`` command.
- :mod:`~clipforge.registry.client`: the one MLflow client, every call retried alike; metric names.
- :mod:`~clipforge.registry.pyfunc`: log an open_clip ``local-dir:`` folder as a pyfunc mapping
  images or texts to normalized embeddings (:class:`ClipEmbeddingModel`).
- :mod:`~clipforge.registry.promotion`: register versions (alias ``challenger``) and move alias
  ``champion`` only to a better version, safely when several retrains finish at once.
- :mod:`~clipforge.registry.model_card`: the Markdown model card.
- :mod:`~clipforge.registry.report`: the champion-vs-challenger report on every metric.

Importing this package imports mlflow; only the flows and the command line do.
"""

from clipforge.registry.client import MAX_METRICS_PER_BATCH
from clipforge.registry.model_card import render_model_card
from clipforge.registry.model_card import summary as model_summary
from clipforge.registry.promotion import (
    PromotionError,
    champion_metrics,
    champion_version,
    promote_first_version,
    promote_if_better,
    register_version,
    rollback,
    set_champion,
)
from clipforge.registry.pyfunc import ClipEmbeddingModel, log_pyfunc_model
from clipforge.registry.report import build_report, render_markdown
from clipforge.registry.tracking import (
    default_tracking_uri,
    ensure_experiment,
    experiment_of,
    mlflow_ui_command,
    run_url,
    use_tracking_uri,
)

__all__ = [
    "MAX_METRICS_PER_BATCH",
    "ClipEmbeddingModel",
    "PromotionError",
    "build_report",
    "champion_metrics",
    "champion_version",
    "default_tracking_uri",
    "ensure_experiment",
    "experiment_of",
    "log_pyfunc_model",
    "mlflow_ui_command",
    "model_summary",
    "promote_first_version",
    "promote_if_better",
    "register_version",
    "render_markdown",
    "render_model_card",
    "rollback",
    "run_url",
    "set_champion",
    "use_tracking_uri",
]
