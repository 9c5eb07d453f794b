"""Evaluation throughput on CLIP_benchmark webdataset folders: clipforge against CLIP_benchmark.

Writes task folders with CLIP_benchmark's own converter (scikit-learn's digits, resized), exports a
model as an open_clip ``local-dir:`` folder, then evaluates, one after the other and in the same
process, with the same batch size and torch threads:

- CLIP_benchmark as ``clip_benchmark eval --dataset wds/... --num_workers 0 --no_amp`` runs it: its
  ``build_wds_dataset`` loader and its ``zeroshot_classification`` / ``zeroshot_retrieval`` evaluate;
- clipforge's evaluate stage (``clip-benchmark`` sets; a suite of the three tasks for the last row),
  data hash included.

Images/s is the task's images over the wall time of the evaluation (model loading excluded), the
best of ``--repeats`` runs (the first also pays for first-call warm-up). The metrics are checked
to agree to 1e-6.

    PYTHONPATH=. python benchmarks/eval_throughput.py [--images 1000] [--batch-size 64] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from clipforge.core.plugins import PluginManager
from clipforge.core.resolver import resolve_model
from clipforge.core.validation import load_recipe
from clipforge.engine.evaluation import evaluate_bundle
from tests.clip_benchmark_folders import export_tiny_model, write_task
from tests.conftest import TINY_RECIPE


def theirs(model_dir: Path, folder: Path, task: str, batch_size: int, device: str) -> dict[str, float]:
    """What ``clip_benchmark eval`` does for a wds folder, after loading the model."""
    import open_clip
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}", device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    start = time.perf_counter()
    dataset = build_wds_dataset("wds/x", transform=preprocess, split="test", data_dir=str(folder))
    if task == "retrieval":
        loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
        batches = (image_captions_collate_fn(list(zip(*b, strict=True))) for b in loader)
        metrics = zeroshot_retrieval.evaluate(model, batches, tokenizer, device, amp=False, recall_k_list=[1, 5, 10])
    else:
        loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
        loader.dataset.classes = dataset.classes  # as the cli's loader carries them
        metrics = zeroshot_classification.evaluate(
            model, loader, tokenizer, dataset.classes, dataset.templates, device, amp=False
        )
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def ours(model_dir: Path, data: dict, batch_size: int, device: str) -> dict[str, float]:
    recipe = copy.deepcopy(TINY_RECIPE)
    data = dict(data)
    recipe["evaluation"] = data.pop("evaluation", [])
    recipe["data"] = {"train": recipe["data"]["train"], **data}
    recipe["registry"] = {}
    loaded = load_recipe(recipe)
    catalog = PluginManager(load_entry_points=False).catalog
    bundle = resolve_model(str(model_dir)).load(device)
    start = time.perf_counter()
    metrics = evaluate_bundle(loaded, catalog, bundle, device).metrics
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def best(fn, repeats: int) -> dict[str, float]:
    """The run of ``fn()`` that took the least ``seconds``."""
    runs = [fn() for _ in range(repeats)]
    print("  seconds:", [round(m["seconds"], 2) for m in runs], flush=True)
    return min(runs, key=lambda m: m["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="images per task (at most 1,797)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="clipforge-eval-bench-"))
    model_dir = export_tiny_model(root / "model")
    tasks = {
        "classification": write_task(root / "suite" / "digits", "classification", args.images, seed=1),
        "retrieval": write_task(root / "suite" / "digits-captions", "retrieval", args.images, seed=2),
        "classification-2": write_task(root / "suite" / "digits-b", "classification", args.images, seed=3),
    }
    print(f"{args.images} images per task, batch {args.batch_size}, {args.threads} torch threads, {args.device}, {root}")
    rows = []
    for task in ("classification", "retrieval"):
        kind = "retrieval" if task == "retrieval" else "zero-shot-classification"
        cb = theirs(model_dir, tasks[task], task, args.batch_size, args.device)
        cf = ours(
            model_dir,
            {
                "eval": {"type": "clip-benchmark", "root": str(tasks[task])},
                "evaluation": [{"type": kind, "batch_size": args.batch_size}],
            },
            args.batch_size,
            args.device,
        )
        for name, value in cb.items():
            if name != "seconds" and f"eval/{kind}/{name}" in cf and value == value:
                assert abs(cf[f"eval/{kind}/{name}"] - value) <= 1e-6, (task, name, cf[f"eval/{kind}/{name}"], value)
        rows.append((task, args.images / cb["seconds"], args.images / cf["seconds"]))
    cb_suite = sum(
        theirs(model_dir, tasks[t], "retrieval" if t == "retrieval" else "classification", args.batch_size, args.device)[
            "seconds"
        ]
        for t in tasks
    )
    cf_suite = ours(
        model_dir, {"eval_suite": {"root": str(root / "suite"), "batch_size": args.batch_size}}, args.batch_size, args.device
    )
    rows.append(("suite of 3 tasks", 3 * args.images / cb_suite, 3 * args.images / cf_suite["seconds"]))
    print(f"{'task':<20} {'clip_benchmark img/s':>22} {'clipforge img/s':>16} {'ratio':>7}")
    for task, a, b in rows:
        print(f"{task:<20} {a:>22.1f} {b:>16.1f} {b / a:>6.2f}x")


if __name__ == "__main__":
    main()
