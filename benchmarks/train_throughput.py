"""Training throughput: clipforge against ``open_clip_train.main``, one after the other, same model,
batch size, precision and CSV of PNG images.

    python benchmarks/train_throughput.py                      # CPU, fp32, the tiny model
    python benchmarks/train_throughput.py --nproc 2            # 2 processes each: torchrun against the torchrun launcher
    python benchmarks/train_throughput.py --model ViT-B-32 --precision bf16 --device cuda \
        --image-size 224 --batch-size 256 --samples 5120 --workers 8

Three runs: open_clip_train reading the CSV; clipforge reading the same PNGs (put into shards
unchanged); clipforge reading the shards its curation wrote from the CSV (images resized to the
model's input size). Samples/s are steady-state figures: the time of every
step after the first ``--skip`` (data waits included, as open_clip_train's "Batch (t)").

With ``--nproc N`` both train on N processes: open_clip_train under ``torchrun --standalone``,
clipforge through its ``torchrun`` launcher; ``--batch-size`` is per process on both sides, the
samples/s are of the global batches, and both get the same ``OMP_NUM_THREADS`` (printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

TINY = {  # ENVIRONMENT.md's tiny config: 3.4 M parameters
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_csv(folder: Path, samples: int, image_size: int) -> Path:
    """PNG files of the synthetic-shapes dataset and a CSV (filepath, title) listing them."""
    from clipforge.plugins.datasets.synthetic_shapes import SyntheticShapes

    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for i, sample in enumerate(SyntheticShapes(size=samples, seed=0, image_size=image_size)):
        path = images / f"{i:06d}.png"
        image = sample.image
        if isinstance(image, (bytes, bytearray)):
            path.write_bytes(image)
        else:
            image.save(path, format="PNG")
        rows.append({"filepath": str(path), "title": sample.caption if isinstance(sample.caption, str) else sample.caption[0]})
    table = folder / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def steady_rate(step_seconds: list[float], batch: int, skip: int) -> float:
    times = step_seconds[skip:]
    return batch * len(times) / sum(times)


def _open_clip_train_wrapper(folder: Path) -> Path:
    """A script that runs ``open_clip_train.main.main`` on the arguments in the JSON file it is given, as
    ``python -m open_clip_train.main`` does (its return value ignored: the log tells how it went), with
    DDP on the CPU made possible."""
    script = folder / "open_clip_train_main.py"
    # open_clip_train 3.3 passes device_ids=[device] to DDP, which torch refuses for a CPU module:
    # the wrapper drops them there (what DDP on the CPU takes), nothing else of its training changes
    script.write_text(
        "import json\nimport sys\n\nimport torch\n"
        "from open_clip_train.main import main\n\n"
        "_ddp = torch.nn.parallel.DistributedDataParallel.__init__\n\n\n"
        "def _init(self, module, device_ids=None, *args, **kwargs):\n"
        "    if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):\n"
        "        device_ids = None\n"
        "    _ddp(self, module, device_ids, *args, **kwargs)\n\n\n"
        "torch.nn.parallel.DistributedDataParallel.__init__ = _init\n"
        "main(json.load(open(sys.argv[1])))\n"
    )
    return script


def run_open_clip_train(args, table: Path, model: str, logs: Path) -> float:
    name = f"bench-{uuid.uuid4().hex[:8]}"  # a reused name makes open_clip_train skip training
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        if args.nproc > 1
        else [sys.executable]
    )
    argv = [
        "--train-data", str(table), "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", model, "--precision", precision, "--workers", str(args.workers),
        "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "5e-4", "--wd", "0.1", "--warmup", "0",
        "--log-every-n-steps", "1", "--save-frequency", "0", "--logs", str(logs), "--name", name,
        "--device", args.device, "--seed", "0",
    ]  # fmt: skip
    # torchrun would read open_clip_train's --logs as its own (ambiguous) --logs-specs, wherever it stands:
    # the arguments go to a small wrapper in a file instead
    (logs.parent / f"{name}.json").write_text(json.dumps(argv))
    cmd = [*launch, str(_open_clip_train_wrapper(logs.parent)), str(logs.parent / f"{name}.json")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log = (logs / name / "out.log").read_text() if (logs / name / "out.log").exists() else done.stdout + done.stderr
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    if done.returncode != 0 or len(times) <= args.skip:
        raise SystemExit(f"open_clip_train failed or trained too few steps:\n{log[-3000:]}\n{done.stderr[-3000:]}")
    return steady_rate(times, args.batch_size * args.nproc, args.skip)


class _Training:
    """clipforge's training of one run, as its torchrun launcher runs it in each process (picklable)."""

    def __init__(self, recipe: dict, root: str, out: str, shards: list[dict]):
        self.recipe, self.root, self.out, self.shards = recipe, root, out, shards

    def __call__(self) -> None:
        import clipforge
        from clipforge.core.results import Shard
        from clipforge.core.storage import Store
        from clipforge.core.validation import load_recipe
        from clipforge.engine.training import train

        recipe, shards = load_recipe(self.recipe), [Shard.model_validate(s) for s in self.shards]
        train(recipe, clipforge.get_plugin_manager().catalog, Store(self.root), self.out, shards, progress=False)


def png_shards(store, catalog, table: Path, per_shard: int = 1000) -> list[dict]:
    """The CSV's PNG files as shards, bytes unchanged (curation would resize them to the model's input)."""
    from clipforge.core.results import Shard
    from clipforge.engine.shards import ShardWriter, decode, write_index

    items = [decode(s) for s in catalog.create("datasets", {"type": "csv", "path": str(table), "caption_column": "title"})]
    shards = []
    for i in range(0, len(items), per_shard):
        with ShardWriter(store, f"pngs/shard-{i // per_shard:06d}.tar") as writer:
            for item in items[i : i + per_shard]:
                writer.add(item)
            shards.append(Shard.model_validate(writer.close()))
            write_index(store, shards[-1].path, writer.offsets)
    return shards


def run_clipforge(args, table: Path, root: Path) -> tuple[float, float]:
    import clipforge
    from clipforge.core.storage import Store
    from clipforge.core.validation import load_recipe
    from clipforge.engine.curation import curate

    model = {"type": "open-clip", "config": TINY} if args.model == "tiny" else {"type": "open-clip", "arch": args.model}
    recipe = load_recipe({
        "name": "bench",
        "storage": {"root": str(root)},
        "data": {"train": {"type": "csv", "path": str(table), "caption_column": "title"}},
        "model": model,
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 5e-4, "weight_decay": 0.1, "precision": args.precision,
                  "device": args.device, "workers": args.workers, "seed": 0},
    })  # fmt: skip
    catalog = clipforge.get_plugin_manager().catalog
    store = Store(str(root))
    runs = {
        "same-pngs": png_shards(store, catalog, table),
        "resized": curate(recipe, catalog, store, "curated", progress=False).shards,
    }
    rates, per_step = [], args.batch_size * args.nproc
    for name, shards in runs.items():
        job = _Training(recipe.as_dict(), str(root), f"{name}/train", [s.model_dump() for s in shards])
        if args.nproc > 1:
            from clipforge.plugins.launchers.torchrun import Torchrun

            Torchrun(args.nproc).launch(job, args.device)
        else:
            job()
        history = store.read_json(f"{name}/train/history.json")
        rates.append(steady_rate([per_step / h["samples_per_s"] for h in history], per_step, args.skip))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (ENVIRONMENT.md's 3.4 M config) or an open_clip config name")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=64, help="side of the PNG files")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the rates")
    parser.add_argument("--nproc", type=int, default=1, help="training processes on both sides (torchrun)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each process; default: cores / nproc")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the same for every process of both sides
    print(
        f"settings: {args.model}, {args.precision} on {args.device}, batch {args.batch_size} per process x {args.nproc} "
        f"process(es), {args.workers} loader worker(s) each, OMP_NUM_THREADS={threads}, {args.samples} samples",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        table = write_csv(work / "data", args.samples, args.image_size)
        print(f"{args.samples} PNG files ({args.image_size} px) and {table} in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.model == "tiny":
            folder = work / "tiny-model"
            folder.mkdir()
            (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
            oc_model = f"local-dir:{folder}"
        else:
            oc_model = args.model
        open_clip_rate = run_open_clip_train(args, table, oc_model, work / "open_clip_logs")
        print(f"open_clip_train (csv):               {open_clip_rate:8.1f} samples/s", flush=True)
        same, resized = run_clipforge(args, table, work / "store")
        print(f"clipforge (shards of the same PNGs): {same:8.1f} samples/s  ratio {same / open_clip_rate:.2f}x")
        print(f"clipforge (shards, resized images):  {resized:8.1f} samples/s  ratio {resized / open_clip_rate:.2f}x")
        print(json.dumps({"model": args.model, "precision": args.precision, "device": args.device, "batch_size": args.batch_size,
                          "nproc": args.nproc, "omp_num_threads": threads,
                          "open_clip_train": round(open_clip_rate, 1), "clipforge_same_pngs": round(same, 1),
                          "clipforge_resized": round(resized, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
