"""The work each stage does, as plain functions; the flows wrap them in Prefect and MLflow."""
