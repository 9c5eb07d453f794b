"""The continual benchmark: a sequence of domains, each step a retrain warm-started from the champion.

    python benchmarks/continual.py [--domains 3] [--size 3000] [--budget 16384] [--policies scratch,finetune,...]

Each policy retrains through the flows (curate, train, evaluate, register) once per domain, in its
own registered model; after each step its new version is made champion by hand, so every step
continues from the last whatever the gate would say. Every step evaluates zero-shot top-1 on a
held-out set of every domain (named evaluation sets, 1,000 images each by default), which gives the
accuracy matrix ``A[i][j]``: domain ``j`` after step ``i``. Every warm start trains the same budget
(``train.budget.samples``), so the policies differ in what they do with it, not in what they spend;
the reference retrains on everything for its epochs, at a cost that grows with the sequence.

Policies (``docs/continual.md``):

- ``scratch``: the reference, from scratch on every domain so far (the earlier domains through a
  replay of all the champion's training data);
- ``finetune``: warm start from the champion, the new domain only;
- ``distill``: warm start, plus distillation from the champion (frozen teacher);
- ``wise-ft``: warm start, then the weights averaged with the champion's (WiSE-FT);
- ``replay``: warm start, the new domain plus a seeded replay of what the champion trained on,
  drawn as half of the budget (TiC-CLIP's replay at ``--replay-fraction``);
- ``mixture``: warm start, the new domain and the replayed pool mixed by weight so that every
  domain so far has the same share of the budget (after ``k`` domains the replay is ``k / (k + 1)``
  of the samples): the expected mix of retraining on everything, at a fixed cost;
- ``replay+distill``, ``mixture+distill``: the replay or the mixture, and distillation;
- ``lora``: warm start, the new domain only, through a LoRA adapter (``--lora-r``; the logit scale
  unlocked) merged into the champion's weights; the ResNet image tower of this benchmark's model has
  no attention or MLP layer LoRA adapts, so only the text tower (and the logit scale) moves;
- ``lora+replay``: LoRA and the replay.

Printed and logged to MLflow (experiment ``continual-benchmark``, a run per policy): the matrix
and its figure, the forgetting of each earlier domain (its best accuracy minus its final one), their
mean (Chaudhry et al.) and largest, accuracy on the newest domain and its ratio to the reference,
each with a bootstrap interval over the held-out images (:func:`clipforge.core.bootstrap.resampled`:
a domain's images are resampled once for all the steps that measured them, so a drop is measured on
the same draws before and after), samples seen (optimizer steps x batch; a distilling policy also
runs the teacher's forward pass on each) and its ratio to the reference, the training's wall time,
at how many steps a guarded gate (``max_drop`` on each earlier domain) would have promoted, and
whether the target holds: every earlier domain's forgetting within ``--target-drop`` at the upper
bound of its interval, the newest domain at 95 % of the reference or more, at most 40 % of its
compute.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

#: Domains whose colours, shapes and styles differ (docs/curation.md#domains-of-the-built-in-data); D: real handwriting.
DOMAINS: dict[str, dict[str, Any]] = {
    "A": {"type": "synthetic-shapes", "colors": ["red", "green", "blue"], "shapes": ["circle", "square"]},
    "B": {
        "type": "synthetic-shapes", "colors": ["yellow", "purple", "orange"], "shapes": ["triangle", "star", "cross"],
        "fill": "outline", "background": "textured",
    },
    "C": {
        "type": "synthetic-shapes", "colors": ["pink", "cyan", "brown"], "shapes": ["hexagon", "heart"],
        "background": "dark", "rotation": 180, "scale": [0.6, 1.0],
    },
    "D": {"type": "digits"},
}  # fmt: skip
POLICIES = [
    "scratch", "finetune", "distill", "wise-ft", "replay", "mixture", "replay+distill", "mixture+distill", "lora", "lora+replay",
]  # fmt: skip
MODEL: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 32, "width": 64, "heads": 2, "layers": 2},
}


def train_entry(domain: str, args: argparse.Namespace) -> dict[str, Any]:
    if domain == "D":
        return {"type": "digits", "split": "train", "image_size": args.image_size}
    return DOMAINS[domain] | {"size": args.size, "seed": 0, "image_size": args.image_size}


def eval_entry(domain: str, args: argparse.Namespace) -> dict[str, Any]:
    if domain == "D":
        return {"type": "digits", "split": "test", "image_size": args.image_size}
    return DOMAINS[domain] | {"size": args.eval_size, "seed": 1, "image_size": args.image_size}


def model_name(policy: str) -> str:
    return "continual-" + policy.replace("+", "-and-")


def recipe(policy: str, step: int, domains: list[str], root: Path, args: argparse.Namespace, seen: int) -> dict[str, Any]:
    """The retrain of ``policy`` at ``step``; ``seen``: the pairs its champion was trained on (scratch replays them all)."""
    name = model_name(policy)
    warm = step > 0 and policy != "scratch"
    r: dict[str, Any] = {
        "name": name,
        "storage": {"root": str(root / "store")},
        "data": {
            "train": train_entry(domains[step], args),
            "eval": {d: eval_entry(d, args) for d in domains},
        },
        "curation": [],
        "model": {"type": "open-clip", "config": MODEL | {"vision_cfg": MODEL["vision_cfg"] | {"image_size": args.image_size}},
                  "aug_cfg": {"scale": [1.0, 1.0]}},
        "loss": {"type": "clip"},
        "train": {
            "batch_size": args.batch_size, "lr": args.finetune_lr if warm else args.lr, "warmup_steps": 20 if warm else 50,
            "seed": 0, "workers": 0, "checkpoint_every": 10_000, "device": "cpu",
        } | ({"budget": {"samples": args.budget}} if warm else {"epochs": args.epochs}),
        "evaluation": [{"type": "zero-shot-classification"}],
        "registry": {"model_name": name},
    }  # fmt: skip
    champion = f"models:/{name}@champion"
    if warm:
        r["train"]["init_from"] = champion
    if warm and "distill" in policy:
        r["loss"] = {"type": "distill", "teacher": champion, "weight": args.distill_weight}
    if warm and policy == "wise-ft":
        r["train"]["weight_average"] = {"alpha": args.wise_alpha}
    if warm and "lora" in policy:
        r["train"]["adapter"] = {"type": "lora", "r": args.lora_r, "alpha": 2 * args.lora_r, "unlock": ["logit_scale"]}
    if warm and "replay" in policy:
        r["data"]["replay"] = {"from": "champion", "fraction": args.replay_fraction, "seed": 0}
    if warm and "mixture" in policy:  # every domain so far weighs the same: the replayed pool holds `step` of them
        r["data"]["replay"] = {"from": "champion", "fraction": step / (step + 1), "seed": 0}
    if policy == "scratch" and step > 0:  # everything so far: all the champion's pairs beside the new ones
        new = args.size if domains[step] != "D" else 1437
        r["data"]["replay"] = {"from": "champion", "fraction": seen / (seen + new), "seed": 0}
    return r


def run_policy(policy: str, domains: list[str], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import fsspec

    from clipforge.flows import retrain_flow
    from clipforge.registry import set_champion

    matrix: list[list[float]] = []
    hits: list[dict[str, Any]] = []  # per step: each domain's per-image results (PerSample as JSON)
    steps: list[int] = []  # samples seen at each step
    seconds, replayed = 0.0, []
    seen = 0
    for step, domain in enumerate(domains):
        print(f"\n== {policy}: step {step + 1}/{len(domains)}, domain {domain}", flush=True)
        result = retrain_flow(recipe(policy, step, domains, root, args, seen), tracking_uri=args.tracking_uri)
        assert result.curate and result.train and result.evaluate and result.register
        set_champion(model_name(policy), result.register.version, reason="continual benchmark: each step continues from the last")
        row = [result.evaluate.metrics[metric(d)] for d in domains]
        matrix.append(row)
        with fsspec.open(result.evaluate.per_sample_uri, "r") as f:
            per_sample = json.load(f)
        hits.append({d: per_sample[metric(d)] for d in domains})
        steps.append(result.train.steps * args.batch_size)
        seconds += result.train.seconds
        seen = result.train.pairs
        replay = result.curate.replay
        replayed.append(replay.pairs if replay else 0)
        if policy == "scratch" and replay:
            assert replay.pairs == replay.pool, f"scratch replays every earlier pair ({replay.pairs} of {replay.pool})"
        print(f"   accuracy per domain {dict(zip(domains, (round(a, 3) for a in row), strict=True))}", flush=True)
    return {
        "matrix": matrix, "per_sample": hits, "samples": sum(steps), "step_samples": steps, "train_seconds": seconds,
        "replayed": replayed,
    }  # fmt: skip


def metric(domain: str) -> str:
    return f"eval/{domain}/zero-shot-classification/acc1"


def summarize(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Forgetting (each earlier domain's, their mean and largest) and the newest domain's accuracy,
    each with its bootstrap interval over the held-out images, and the guarded gate's verdict at each step."""
    from clipforge.core.bootstrap import per_sample_from, resampled

    matrix, domains = res["matrix"], list(res["per_sample"][0])
    last = len(matrix) - 1
    drops, spreads = [], []
    for j, domain in enumerate(domains[:last]):
        # the domain's images, resampled once for every step since it was learnt (seeded per domain: independent sets)
        _, spread = resampled(
            [per_sample_from(res["per_sample"][i][domain]) for i in range(j, last + 1)],
            resamples=args.resamples, seed=j,
        )  # fmt: skip
        drops.append(max(matrix[i][j] for i in range(j, last + 1)) - matrix[last][j])
        spreads.append(spread.max(axis=1) - spread[:, -1])
    _, newest = resampled([per_sample_from(res["per_sample"][last][domains[last]])], resamples=args.resamples, seed=last)
    promoted = []
    for i in range(1, last + 1):
        better = matrix[i][i] > matrix[i - 1][i]
        kept = all(matrix[i - 1][j] - matrix[i][j] <= args.max_drop for j in range(i))
        promoted.append(better and kept)
    return {
        "forgetting": {d: interval(v, s, args.confidence) for d, v, s in zip(domains[:last], drops, spreads, strict=True)},
        "avg_forgetting": interval(sum(drops) / len(drops), np.mean(spreads, axis=0), args.confidence) if drops else None,
        "max_forgetting": interval(max(drops), np.max(spreads, axis=0), args.confidence) if drops else None,
        "newest": interval(matrix[last][last], newest[:, 0], args.confidence),
        "mean_final": sum(matrix[last]) / len(matrix[last]),
        "gate_promotions": sum(promoted),
    }


def interval(value: float, spread: np.ndarray, confidence: float) -> dict[str, float]:
    from clipforge.core.bootstrap import quantile_bounds

    low, high = quantile_bounds(spread, confidence)
    return {"value": float(value), "low": low, "high": high}


def shown(iv: dict[str, float] | None, digits: int = 3) -> str:
    return "-" if iv is None else f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def matrix_figure(policy: str, matrix: list[list[float]], domains: list[str]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * len(domains) + 2, 1.0 * len(domains) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(domains)), [f"on {d}" for d in domains])
    ax.set_yticks(range(len(domains)), [f"after {d}" for d in domains])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_title(f"{policy}: zero-shot top-1")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def log_to_mlflow(results: dict[str, Any], domains: list[str], args: argparse.Namespace) -> None:
    import mlflow

    mlflow.set_experiment("continual-benchmark")
    for policy, res in results.items():
        with mlflow.start_run(run_name=policy):
            mlflow.log_params(
                {"policy": policy, "domains": ",".join(domains), **{k: v for k, v in vars(args).items() if k != "tracking_uri"}}
            )
            mlflow.log_metrics(flat_metrics(res["summary"]))
            mlflow.log_metrics({"samples_seen": float(res["samples"]), "train_seconds": res["train_seconds"]})
            for i, row in enumerate(res["matrix"]):
                for j, value in enumerate(row):
                    mlflow.log_metric(f"acc1/{domains[j]}", value, step=i)
            mlflow.log_dict(res, "continual.json")
            mlflow.log_figure(matrix_figure(policy, res["matrix"], domains), "figures/accuracy_matrix.png")


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary as MLflow metrics: an interval is NAME, NAME_low and NAME_high; a domain's forgetting forgetting/D."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, dict) and "value" in value:
            out.update({name: value["value"], f"{name}_low": value["low"], f"{name}_high": value["high"]})
        elif isinstance(value, dict):
            for key, inner in value.items():
                put(f"{name}/{key}", inner)
        elif isinstance(value, int | float | bool):
            out[name] = float(value)

    for name, value in summary.items():
        put(name, value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=3, choices=[3, 4], help="A, B, C (and D: real digits)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--size", type=int, default=3000, help="training pairs per synthetic domain")
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out images per synthetic domain (digits: 360)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10, help="a retrain from scratch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget", type=int, default=16384, help="samples seen by every warm-started retrain")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--replay-fraction", type=float, default=0.5)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--wise-alpha", type=float, default=0.5)
    parser.add_argument("--lora-r", type=int, default=8, help="the rank of the lora policies' adapters")
    parser.add_argument("--max-drop", type=float, default=0.01, help="the guarded gate's budget per earlier domain")
    parser.add_argument("--target-drop", type=float, default=0.01, help="the target: no earlier domain's forgetting above it")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the bootstrap intervals")
    parser.add_argument("--resamples", type=int, default=2000, help="of the bootstrap over the held-out images")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tracking-uri", default=None, help="default: SQLite in the workdir")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="continual-"))
    root.mkdir(parents=True, exist_ok=True)
    args.tracking_uri = args.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    domains = list(DOMAINS)[: args.domains]
    policies = args.policies.split(",")
    if unknown := set(policies) - set(POLICIES):
        parser.error(f"unknown policies {sorted(unknown)}; available: {', '.join(POLICIES)}")
    print(
        f"settings: domains {domains}, {args.size} pairs each (digits: 1437), eval {args.eval_size} per domain, "
        f"{args.image_size}px, batch {args.batch_size}, fp32 on CPU with {torch.get_num_threads()} threads; "
        f"scratch {args.epochs} epochs at lr {args.lr} on everything so far, warm starts a budget of {args.budget:,} samples "
        f"at lr {args.finetune_lr}; "
        f"replay {args.replay_fraction}, distill weight {args.distill_weight}, WiSE alpha {args.wise_alpha}; "
        f"intervals at {args.confidence:g} over {args.resamples} resamples; "
        f"load average {os.getloadavg()[0]:.2f}; workdir {root}",
        flush=True,
    )
    results: dict[str, Any] = {}
    for policy in policies:
        start = time.perf_counter()
        res = run_policy(policy, domains, root, args)
        res["wall_seconds"] = time.perf_counter() - start
        res["summary"] = summarize(res, args)
        results[policy] = res
    if reference := results.get("scratch"):
        for res in results.values():
            compare(res, reference, domains, args)
    print_table(results, domains, args)
    log_to_mlflow(results, domains, args)
    if args.out:
        args.out.write_text(
            json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "domains": domains, "results": results}, indent=2)
        )


def compare(res: dict[str, Any], reference: dict[str, Any], domains: list[str], args: argparse.Namespace) -> None:
    """The policy against the reference: the newest domain's ratio (paired on the same images), compute, the target."""
    from clipforge.core.bootstrap import per_sample_from, resampled

    s, newest = res["summary"], domains[-1]
    full, spread = resampled(
        [per_sample_from(r["per_sample"][-1][newest]) for r in (reference, res)], resamples=args.resamples, seed=len(domains)
    )
    s["newest_vs_scratch"] = interval(
        full[1] / max(full[0], 1e-9), spread[:, 1] / np.maximum(spread[:, 0], 1e-9), args.confidence
    )
    s["compute_vs_scratch"] = res["samples"] / reference["samples"]
    s["last_step_compute_vs_scratch"] = res["step_samples"][-1] / reference["step_samples"][-1]
    s["target"] = {
        # accuracies are counts over the held-out images: a bound equal to the target meets it
        "forgetting": all(f["high"] <= args.target_drop + 1e-9 for f in s["forgetting"].values()),
        "newest": s["newest_vs_scratch"]["value"] >= 0.95,
        "compute": s["compute_vs_scratch"] <= 0.40,
    }


def print_table(results: dict[str, Any], domains: list[str], args: argparse.Namespace) -> None:
    print("\naccuracy matrices (row: after training on domain; column: zero-shot top-1 on domain)")
    for policy, res in results.items():
        print(f"\n{policy}")
        print("        " + "".join(f"{d:>8}" for d in domains))
        for d, row in zip(domains, res["matrix"], strict=True):
            print(f"after {d} " + "".join(f"{v:8.3f}" for v in row))
    confidence = f"{args.confidence:.0%} interval"
    print(
        f"\n| policy | avg forgetting [{confidence}] | max forgetting | newest domain | vs scratch | mean final "
        f"| samples seen | vs scratch | last step vs scratch | train s | gate promotions (max_drop {args.max_drop}) "
        f"| target: forgetting <= {args.target_drop} / newest >= 0.95 / compute <= 0.40 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for policy, res in results.items():
        s = res["summary"]
        target = " / ".join("met" if ok else "not met" for ok in s["target"].values()) if "target" in s else "-"
        print(
            f"| {policy} | {shown(s['avg_forgetting'])} | {shown(s['max_forgetting'])} | {shown(s['newest'])} "
            f"| {shown(s.get('newest_vs_scratch'), 2)} | {s['mean_final']:.3f} | {res['samples']:,} "
            f"| {s.get('compute_vs_scratch', float('nan')):.2f} | {s.get('last_step_compute_vs_scratch', float('nan')):.2f} "
            f"| {res['train_seconds']:.0f} | {s['gate_promotions']}/{len(domains) - 1} | {target} |"
        )
    print(f"\nforgetting of each earlier domain [{confidence}]")
    print(f"| policy | {' | '.join(domains[:-1])} |")
    print("|---|" + "---:|" * (len(domains) - 1))
    for policy, res in results.items():
        print(f"| {policy} | {' | '.join(shown(iv) for iv in res['summary']['forgetting'].values())} |")


if __name__ == "__main__":
    main()
