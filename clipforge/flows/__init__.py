"""Prefect flows: curate, train, evaluate, register, and retrain chaining them."""

import os

# Before Prefect is imported: its ephemeral server needs longer than the default 20 s on a cold
# start, and its analytics ping only adds a noisy traceback where there is no network.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# MLflow draws a "Downloading artifacts" bar each time it fetches a model (a warm start, the model
# being checked as it is logged): inside a run, the run's own progress is what the terminal shows.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from clipforge.core.stages import STAGES
from clipforge.flows.curate import curate_flow
from clipforge.flows.evaluate import evaluate_flow
from clipforge.flows.register import register_flow
from clipforge.flows.retrain import retrain_flow
from clipforge.flows.train import train_flow

__all__ = ["STAGES", "curate_flow", "evaluate_flow", "register_flow", "retrain_flow", "train_flow"]
