"""How much wall time orchestration adds to a retrain: Prefect flows + MLflow logging and registration
against the same stages called as plain functions (clipforge.engine.curate/train/evaluate).

    PYTHONPATH=$PWD python benchmarks/orchestration_overhead.py [--size 3000] [--epochs 1] [--repeats 2]

Both sides start from an empty store (no reuse). The Prefect server (ephemeral) is started and
warmed before timing, as a deployment's server is already running. The overhead is absolute
seconds, so it is also shown against a 5-minute retrain (the target: <= 5 %).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parents[1]


def recipe_data(root: Path, size: int, epochs: int) -> dict:
    from clipforge.core.recipe import load_recipe

    overrides = [f"storage.root={root}", f"data.train.size={size}", f"train.epochs={epochs}", "train.checkpoint_every=100"]
    return load_recipe(REPO / "deployments/recipes/shapes-weekly.yaml", overrides).as_dict()


def plain(data: dict) -> float:
    """The stages as plain functions: no Prefect, no MLflow."""
    from clipforge.core.plugins import get_plugin_manager
    from clipforge.core.recipe import load_recipe
    from clipforge.core.storage import Store
    from clipforge.engine.curation import curate, curation_key
    from clipforge.engine.evaluation import evaluate
    from clipforge.engine.trainer import train

    start = time.perf_counter()
    catalog = get_plugin_manager().catalog
    recipe = load_recipe(data, catalog=catalog)
    store = Store(recipe.storage.root)
    curated = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False)
    trained = train(recipe, catalog, store, "runs/plain/train", curated["shards"], progress=False)
    evaluate(recipe, catalog, store, trained["model"], device=recipe.train.device)
    return time.perf_counter() - start


def orchestrated(data: dict, workdir: Path) -> float:
    """The retrain flow: four subflows, one MLflow run with metrics and figures, a registered pyfunc."""
    import mlflow

    from clipforge.flows import retrain_flow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    start = time.perf_counter()
    retrain_flow(data, tracking_uri=uri, artifact_root=str(workdir / "mlartifacts"))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3000, help="training pairs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from prefect import flow

    import clipforge.flows  # noqa: F401  (imports torch, open_clip, mlflow, prefect before timing)

    flow(lambda: None, name="warm-up")()  # starts the ephemeral Prefect server outside the timings
    plains, flows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            plains.append(plain(recipe_data(Path(tmp) / f"plain-{i}", args.size, args.epochs)))
            work = Path(tmp) / f"flow-{i}"
            work.mkdir()
            flows.append(orchestrated(recipe_data(work / "store", args.size, args.epochs), work))
            print(f"repeat {i + 1}: plain {plains[-1]:.1f} s, orchestrated {flows[-1]:.1f} s", flush=True)
    base, total = statistics.median(plains), statistics.median(flows)
    overhead = total - base
    print(f"\nretrain of {args.size} pairs x {args.epochs} epoch(s), median of {args.repeats}:")
    print(f"  plain functions:          {base:7.1f} s")
    print(f"  Prefect flows + MLflow:   {total:7.1f} s")
    print(f"  overhead:                 {overhead:7.1f} s  ({overhead / base:.1%} of this retrain)")
    print(f"  against a 5-minute retrain: {overhead / 300:.1%}  (target <= 5 %; assumes the overhead does not grow with training length)")


if __name__ == "__main__":
    main()
