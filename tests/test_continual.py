"""Retraining without regressions, through the flows: named evaluation sets, guards, the champion
measured again on changed evaluation data, and replay of what the champion was trained on."""

from __future__ import annotations

import copy

import mlflow
import pytest
from mlflow import MlflowClient

from clipforge.core.storage import Store
from clipforge.engine.replay import replay_count
from clipforge.engine.shards import iter_shard
from clipforge.flows import register as register_module

pytestmark = pytest.mark.slow

NEW = "new/retrieval/mean_recall@1"
OLD = "old/retrieval/mean_recall@1"


def with_sets(recipe: dict, old_seed: int) -> dict:
    r = copy.deepcopy(recipe)
    r["data"]["eval"] = {
        "new": {"type": "synthetic-shapes", "size": 40, "seed": 1, "image_size": 32},
        "old": {"type": "synthetic-shapes", "size": 40, "seed": old_seed, "image_size": 32},
    }
    r["evaluation"] = [{"type": "retrieval", "ks": [1]}, {"type": "zero-shot-classification", "sets": ["new"]}]
    r["registry"]["promote"] = {"metric": NEW, "guards": [{"metric": OLD, "max_drop": 0.5}]}
    return r


@pytest.fixture
def evaluations(monkeypatch) -> list[str]:
    """The models the register flow evaluated again."""
    seen: list[str] = []
    evaluate = register_module.evaluate

    def counted(recipe, catalog, model, **kw):
        seen.append(model)
        return evaluate(recipe, catalog, model, **kw)

    monkeypatch.setattr(register_module, "evaluate", counted)
    return seen


def test_the_champion_is_measured_again_when_the_evaluation_data_changes(tiny_recipe, tracking, prefect_server, evaluations):
    from clipforge.flows import retrain_flow

    first = retrain_flow(with_sets(tiny_recipe, old_seed=2), tracking_uri=tracking)
    metrics = first.evaluate.metrics
    assert {
        "eval/new/retrieval/mean_recall@1",
        "eval/old/retrieval/mean_recall@1",
        "eval/new/zero-shot-classification/acc1",
    } <= set(metrics)
    assert not any(k.startswith("eval/old/zero-shot") for k in metrics)
    client = MlflowClient()
    v1 = client.get_model_version("tiny-clip", "1")
    # a version carries what its promotion was decided on; everything else stays on its run
    assert {k for k in v1.tags if k.startswith("metric.")} == {
        f"metric.eval/{NEW}".replace("@", "_at_"),
        f"metric.eval/{OLD}".replace("@", "_at_"),
    }
    assert v1.tags["clipforge.eval_hash"] == first.evaluate.data_hash
    assert first.register.promoted and evaluations == []

    # the same evaluation data: the champion's numbers are its run's, nothing is evaluated again
    same = retrain_flow(with_sets(tiny_recipe, old_seed=2), tracking_uri=tracking)
    assert same.evaluate.data_hash == first.evaluate.data_hash and evaluations == []
    assert "guard" in same.register.reason or "does not beat" in same.register.reason

    # another "old" set: the champion is evaluated on it once, then read from the store's cache
    changed = retrain_flow(with_sets(tiny_recipe, old_seed=3), tracking_uri=tracking)
    assert changed.evaluate.data_hash != first.evaluate.data_hash
    assert evaluations == ["models:/tiny-clip/1"]
    champion_now = client.get_run(changed.mlflow_run_id).data.metrics
    from clipforge.core.validation import load_recipe
    from clipforge.flows.evaluate import evaluate_uri

    direct = evaluate_uri(load_recipe(with_sets(tiny_recipe, old_seed=3)), "models:/tiny-clip/1", device="cpu").metrics
    assert champion_now["champion/eval/old/retrieval/mean_recall_at_1"] == pytest.approx(direct[f"eval/{OLD}"], abs=1e-6)
    assert champion_now["champion/eval/old/retrieval/mean_recall_at_1"] != pytest.approx(metrics[f"eval/{OLD}"], abs=1e-9)
    report = mlflow.artifacts.load_dict(f"runs:/{changed.mlflow_run_id}/evaluation/champion_report.json")
    (rule,) = [r for r in report["rows"] if r["promotion_metric"]]
    assert rule["champion"] == pytest.approx(direct[f"eval/{NEW}"], abs=1e-6)
    store = Store(tiny_recipe["storage"]["root"])
    assert store.exists(f"cache/evaluations/tiny-clip/v1-{changed.evaluate.data_hash[:16]}.json")
    retrain_flow(with_sets(tiny_recipe, old_seed=3), tracking_uri=tracking)
    champion = client.get_model_version_by_alias("tiny-clip", "champion").version
    assert str(champion) == "1" and evaluations == ["models:/tiny-clip/1"]  # identical weights: a tie


def test_replay_mixes_the_champions_data_into_the_next_retrain(tiny_recipe, tracking, prefect_server):
    from clipforge.flows import retrain_flow
    from clipforge.registry import set_champion

    first = retrain_flow(tiny_recipe, tracking_uri=tracking)
    week2 = copy.deepcopy(tiny_recipe)
    week2["data"]["train"] = {"type": "synthetic-shapes", "size": 96, "seed": 7, "image_size": 32}
    week2["data"]["replay"] = {"from": "champion", "fraction": 0.25, "seed": 0}
    second = retrain_flow(week2, tracking_uri=tracking)
    replayed = second.curate.replay
    assert replayed is not None and replayed.source == "tiny-clip v1" and replayed.pool == first.curate.kept
    assert replayed.pairs == replay_count(0.25, second.curate.kept) == 32
    assert second.train.pairs == second.curate.kept + replayed.pairs
    store = Store(tiny_recipe["storage"]["root"])
    old_keys = {raw["key"] for s in first.curate.shards for raw in iter_shard(store, s.path)}
    got = [raw["key"] for s in replayed.shards for raw in iter_shard(store, s.path)]
    assert len(set(got)) == len(got) == 32 and set(got) <= old_keys
    version = MlflowClient().get_model_version("tiny-clip", second.register.version)
    assert version.tags["clipforge.replay_uri"] == replayed.uri
    run = MlflowClient().get_run(second.mlflow_run_id).data
    assert run.metrics["train/data/replay/pairs"] == 32 and run.tags["clipforge.replay_source"] == "tiny-clip v1"

    # with week 2's model champion, week 3 replays its data: its own curated pairs and what it replayed
    set_champion("tiny-clip", second.register.version, reason="test")
    week3 = copy.deepcopy(week2)
    week3["data"]["train"]["seed"] = 8
    third = retrain_flow(week3, tracking_uri=tracking)
    assert third.curate.replay is not None and third.curate.replay.pool == second.curate.kept + 32
    assert third.curate.replay.source == f"tiny-clip v{second.register.version}"


A = {"type": "synthetic-shapes", "colors": ["red", "green", "blue"], "shapes": ["circle", "square"], "image_size": 32}
B = {
    "type": "synthetic-shapes", "colors": ["yellow", "purple", "orange"], "shapes": ["triangle", "star", "cross"],
    "fill": "outline", "background": "textured", "image_size": 32,
}  # fmt: skip


def domain_step(recipe: dict, train: dict, **train_settings) -> dict:
    """A retrain on ``train`` evaluated on both domains, promoted on B unless it forgets A."""
    r = copy.deepcopy(recipe)
    r["data"] = {
        "train": train | {"size": 1000, "seed": 0},
        "eval": {"A": A | {"size": 150, "seed": 1}, "B": B | {"size": 150, "seed": 1}},
    }
    r["curation"] = []
    r["model"]["aug_cfg"] = {"scale": [1.0, 1.0]}
    r["train"] |= {"checkpoint_every": 1000, "warmup_steps": 10} | train_settings
    r["evaluation"] = [{"type": "zero-shot-classification"}]
    r["registry"]["promote"] = {
        "metric": "B/zero-shot-classification/acc1",
        "guards": [{"metric": "A/zero-shot-classification/acc1", "max_drop": 0.25}],
    }
    return r


def test_a_guard_refuses_a_fine_tune_that_forgets_and_accepts_a_replayed_one(tiny_recipe, tracking, prefect_server):
    """Naive fine-tuning on a new domain forgets the old one and is refused by the guard on it; the
    same retrain with replay and a gentler rate keeps it and takes champion."""
    from clipforge.flows import retrain_flow

    first = retrain_flow(domain_step(tiny_recipe, A, epochs=6, lr=2e-3), tracking_uri=tracking)
    before = first.evaluate.metrics
    assert first.register.promoted and before["eval/A/zero-shot-classification/acc1"] > 0.5

    warm = {"init_from": "models:/tiny-clip@champion", "epochs": 4}
    naive = retrain_flow(domain_step(tiny_recipe, B, lr=2e-3, **warm), tracking_uri=tracking)
    after = naive.evaluate.metrics
    drop = before["eval/A/zero-shot-classification/acc1"] - after["eval/A/zero-shot-classification/acc1"]
    assert after["eval/B/zero-shot-classification/acc1"] > before["eval/B/zero-shot-classification/acc1"]  # it learned B
    assert drop > 0.25 and not naive.register.promoted
    tags = MlflowClient().get_model_version("tiny-clip", naive.register.version).tags
    assert tags["promotion_guard"].startswith(f"eval/A/zero-shot-classification/acc1 dropped by {drop:.4g}")
    assert naive.register.reason.startswith("not promoted: guard")

    gentle = domain_step(tiny_recipe, B, lr=5e-4, **warm)
    gentle["data"]["replay"] = {"from": "champion", "fraction": 0.5}
    kept = retrain_flow(gentle, tracking_uri=tracking)
    assert kept.curate.replay is not None and kept.curate.replay.pairs == 1000
    assert kept.register.promoted, kept.register.reason
    assert "every guard within its budget (1)" in kept.register.reason
