"""Full fine-tuning against LoRA adapters (r 4, 8, 16) on the same data, model and settings.

    python benchmarks/adapters.py [--size 1500] [--ranks 4,8,16] [--model tiny-vit|ViT-B-32] [--device cpu]

A model is first trained from scratch on domain A of the continual benchmark (``benchmarks/continual.py``);
each variant then starts from it and trains on domain B, in a fresh process of its own (so that the
peak memory is its own): full fine-tuning of every weight, or a LoRA adapter of rank r on both
towers' attention and MLP layers (the logit scale unlocked), merged into the exported model.
Reported per variant: trainable parameters, training samples/s (steady, after the first steps),
peak memory (the process's max RSS on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU), the
size of the final checkpoint, zero-shot top-1 on B (the new domain) and on A, and the forgetting of
A (its accuracy before the fine-tune minus after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import DOMAINS

TINY_VIT: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "width": 64, "heads": 2, "layers": 2},
}


def recipe(args: argparse.Namespace, root: Path, domain: str, **train: Any) -> dict[str, Any]:
    model = {"type": "open-clip", "config": TINY_VIT} if args.model == "tiny-vit" else {"type": "open-clip", "arch": args.model}
    return {
        "name": "adapters-benchmark",
        "storage": {"root": str(root / "store")},
        "data": {"train": DOMAINS[domain] | {"size": args.size, "seed": 0, "image_size": args.image_size}},
        "model": model,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 10, "seed": 0,
                  "device": args.device, "checkpoint_every": 100_000, **train},
    }  # fmt: skip


def accuracy(recipe_data: dict[str, Any], model: str, domain: str, args: argparse.Namespace) -> float:
    import clipforge
    from clipforge.core.validation import load_recipe
    from clipforge.engine.evaluation import evaluate

    data = {**recipe_data, "evaluation": [{"type": "zero-shot-classification"}]}
    data["data"] = {**data["data"], "eval": DOMAINS[domain] | {"size": args.eval_size, "seed": 1, "image_size": args.image_size}}
    metrics = evaluate(load_recipe(data), clipforge.get_plugin_manager().catalog, model, device=args.device).metrics
    return metrics["eval/zero-shot-classification/acc1"]


def train_one(recipe_path: Path, out: str) -> None:
    """In its own process: curate and train one variant; print its figures as JSON."""
    import resource

    import torch

    import clipforge
    from clipforge.core.storage import Store
    from clipforge.core.validation import load_recipe
    from clipforge.engine.curation import curate, curation_key
    from clipforge.engine.training import train

    r = load_recipe(json.loads(recipe_path.read_text()))
    store, catalog = Store(r.storage.root), clipforge.get_plugin_manager().catalog
    shards = curate(r, catalog, store, f"curated/{curation_key(r)}", progress=False).shards
    result = train(r, catalog, store, out, shards, progress=False)
    history = json.loads(store.read_bytes(f"{out}/history.json"))
    steady = [h["samples_per_s"] for h in history[3:]] or [h["samples_per_s"] for h in history]
    ckpt = Path(store.path(result.checkpoint))
    trained = "trainable.safetensors" if (ckpt / "trainable.safetensors").exists() else "model.safetensors"
    from safetensors.torch import load_file

    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available() and "cuda" in str(result.device)
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({
        "trainable_parameters": sum(t.numel() for t in load_file(ckpt / trained).values()),
        "samples_per_s": round(len(steady) / sum(1 / s for s in steady), 1),
        "peak_memory_mib": round(peak, 1),
        "checkpoint_mib": round(sum(f.stat().st_size for f in ckpt.iterdir()) / 2**20, 3),
        "model": str(store.path(result.model)),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-vit", help="tiny-vit, or an open_clip config name (ViT-B-32)")
    parser.add_argument("--size", type=int, default=1500)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--train-one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one:
        return train_one(Path(args.train_one[0]), args.train_one[1])

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        variants: dict[str, dict[str, Any]] = {"base (A, from scratch)": {"epochs": args.epochs * 2}}
        variants["full fine-tune"] = {}
        variants.update({f"lora r={r}": {"adapter": {"type": "lora", "r": r, "alpha": 2 * r, "unlock": ["logit_scale"]}}
                         for r in map(int, args.ranks.split(","))})  # fmt: skip
        results: dict[str, dict[str, Any]] = {}
        base_model = None
        for name, train in variants.items():
            domain = "A" if base_model is None else "B"
            if base_model is not None:
                train = {"init_from": base_model, **train}
            data = recipe(args, root, domain, **train)
            path = root / f"{len(results)}.json"
            path.write_text(json.dumps(data))
            done = subprocess.run(
                [sys.executable, __file__, "--train-one", str(path), f"runs/{len(results)}/train"],
                capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            res["acc_new_B"] = accuracy(data, res["model"], "B", args)
            res["acc_old_A"] = accuracy(data, res["model"], "A", args)
            if base_model is None:
                base_model = res["model"]
            else:
                res["forgetting_A"] = round(results["base (A, from scratch)"]["acc_old_A"] - res["acc_old_A"], 4)
            results[name] = res
            print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'model'})}", flush=True)
    print(
        "\n| variant | trainable params | samples/s | peak memory (MiB) | checkpoint (MiB) | top-1 B (new) | top-1 A (old) | forgetting A |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['trainable_parameters']:,} | {r['samples_per_s']} | {r['peak_memory_mib']} | {r['checkpoint_mib']} "
              f"| {r['acc_new_B']:.3f} | {r['acc_old_A']:.3f} | {r.get('forgetting_A', '—')} |")  # fmt: skip


if __name__ == "__main__":
    main()
