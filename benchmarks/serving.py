"""Latency and throughput of a clipforge model served by ``mlflow models serve``, against the same model
called in process (``mlflow.pyfunc.load_model(...).predict``) in the same run.

    PYTHONPATH=$PWD python benchmarks/serving.py --tracking-uri sqlite:///clipforge-demo/mlflow.db \
        [--model models:/shapes-clip@champion] [--threads 2] [--seconds 20]

For each input (images: base64 PNGs of the demo's synthetic shapes at the model's input size; texts:
the same images' captions) and each batch size (1 and 64 rows per request), one client sends
requests back to back for ``--seconds`` (after ``--warmup`` untimed ones) over one kept-alive HTTP
connection, then the in-process model predicts the same DataFrames as many times. Both sides run on
the CPU with ``--threads`` torch threads (the server gets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``;
one server worker). The ratio says what serving costs: served requests/s over in-process calls/s.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.services: the server helpers the tests use

from tests.services import BIN, free_port, process  # noqa: E402


def frames(image_size: int, batch: int, seed: int = 7) -> dict[str, pd.DataFrame]:
    """A batch of images (base64 PNG) and one of texts (their captions), ``batch`` rows each."""
    from clipforge.plugins.datasets.synthetic_shapes import SyntheticShapes

    images, texts = [], []
    for sample in SyntheticShapes(batch, seed=seed, image_size=image_size):
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
        texts.append(sample.caption if isinstance(sample.caption, str) else sample.caption[0])
    return {"images": pd.DataFrame({"image": images}), "texts": pd.DataFrame({"text": texts})}


def timed(call: Callable[[], object], seconds: float, warmup: int) -> list[float]:
    """Latencies (s) of ``call`` repeated for ``seconds`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(out) < 5:
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def summary(latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"n": len(latencies), "per_s": len(latencies) / sum(latencies), "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98]}


def image_size_of(model, default: int) -> int:
    """The model's input size (open_clip's image towers keep it), so that the images are made at it."""
    size = getattr(model.unwrap_python_model().model.visual, "image_size", default)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}"))
    p.add_argument("--model", default="models:/shapes-clip@champion")
    p.add_argument("--threads", type=int, default=2, help="torch threads, in process and in the server")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per case and side")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = p.parse_args()

    os.environ.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    import mlflow
    import torch

    torch.set_num_threads(args.threads)
    mlflow.set_tracking_uri(args.tracking_uri)
    model = mlflow.pyfunc.load_model(args.model)
    device = model.unwrap_python_model().device
    image_size = image_size_of(model, 64)
    print(
        f"model {args.model} ({args.tracking_uri}); {device}, {torch.get_num_threads()} torch threads on both sides; {image_size} px images"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": args.tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # mlflow execs uvicorn from PATH
    }
    serve = [str(BIN / "mlflow"), "models", "serve", "-m", args.model, "--env-manager", "local", "--workers", "1", "-t", "600"]
    rows: list[tuple[str, int, dict[str, float], dict[str, float]]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        process([*serve, "-h", "127.0.0.1", "-p", str(port)], f"{url}/ping", Path(tmp) / "serve.log", env=env, timeout_s=180),
    ):
        for batch in args.batches:
            for kind, frame in frames(image_size, batch).items():
                body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}).encode()

                # a connection per case, kept alive through it (the server closes idle ones after 5 s)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

                def request(body: bytes = body, conn: http.client.HTTPConnection = conn) -> None:
                    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                    answer = conn.getresponse()
                    data = answer.read()
                    if answer.status != 200:
                        raise RuntimeError(f"{answer.status}: {data[:300]!r}")

                served = summary(timed(request, args.seconds, args.warmup))
                conn.close()
                local = summary(timed(lambda frame=frame: model.predict(frame), args.seconds, args.warmup))
                rows.append((kind, batch, served, local))
                print(
                    f"{kind:6} batch {batch:3}: served {served['per_s']:7.1f} req/s p50 {served['p50_ms']:7.1f} ms "
                    f"p99 {served['p99_ms']:7.1f} ms | in process {local['per_s']:7.1f} calls/s "
                    f"p50 {local['p50_ms']:7.1f} ms p99 {local['p99_ms']:7.1f} ms | ratio {served['per_s'] / local['per_s']:.2f}x",
                    flush=True,
                )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| input | rows/request | served req/s | rows/s | p50 ms | p99 ms | in process calls/s | p50 ms | p99 ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, batch, s, loc in rows:
        print(
            f"| {kind} | {batch} | {s['per_s']:.1f} | {s['per_s'] * batch:,.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} "
            f"| {loc['per_s']:.1f} | {loc['p50_ms']:.1f} | {loc['p99_ms']:.1f} | {s['per_s'] / loc['per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
