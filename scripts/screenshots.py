"""Screenshots of what a user sees in the MLflow UI after a retrain: the run's page, the logged model's
page and the registered version's page, as a headless Chromium renders them.

    clipforge demo --workdir /tmp/demo
    PYTHONPATH=$PWD python scripts/screenshots.py --workdir /tmp/demo --out docs/images

It serves the demo's store with `mlflow server` on a free local port (or uses ``--ui`` when one is
already running), opens each page, waits until it has rendered its data, and writes
``mlflow-run.png``, ``mlflow-logged-model.png`` and ``mlflow-model-version.png`` (``--width`` x
``--height`` CSS pixels, the first screen as a user sees it, nothing scrolled).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the browser driver and the page knowledge the UI test uses

from tests.browser import Browser, find_chromium  # noqa: E402
from tests.mlflow_ui import RetrainPages, open_page  # noqa: E402
from tests.services import mlflow_ui_server  # noqa: E402

#: Each page, and the file it is written to.
FILES = {"run": "mlflow-run.png", "logged_model": "mlflow-logged-model.png", "model_version": "mlflow-model-version.png"}


def small(path: Path, colors: int) -> Path:
    """The screenshot in a palette of ``colors`` colours, without dithering: the UI's flat colours and
    its text stay sharp, and the file is a third of the size."""
    if colors:
        from PIL import Image

        with Image.open(path) as image:
            palette = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(path, optimize=True)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", type=Path, help="a `clipforge demo`/`clipforge run` --workdir (its mlflow.db)")
    where.add_argument("--tracking-uri", help="the tracking store to serve (sqlite:///..., a folder)")
    p.add_argument("--ui", help="an MLflow UI already serving that store (http://host:port); else one is started")
    p.add_argument("--model", default="shapes-clip", help="the registered model")
    p.add_argument("--version", default="champion", help="its version number or alias")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("screenshots"),
        help="where the PNGs go (default: %(default)s); docs/images to update the docs",
    )
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--colors", type=int, default=128, help="a palette of this many colours (a third of the bytes); 0: as taken")
    args = p.parse_args()

    chromium = find_chromium()
    if chromium is None:
        print("no Chromium binary found: apt-get install -y chromium", file=sys.stderr)
        return 2
    uri = args.tracking_uri or f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
    version = args.version
    if not version.isdigit():
        from mlflow import MlflowClient

        version = str(MlflowClient(uri).get_model_version_by_alias(args.model, version).version)
    with contextlib.ExitStack() as stack:
        ui = args.ui
        if ui is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "mlflow-server.log"
            ui = stack.enter_context(mlflow_ui_server(uri, log))
        pages = RetrainPages.of_version(ui, uri, args.model, version)
        with Browser(chromium, width=args.width, height=args.height) as page:
            for which, name in FILES.items():
                open_page(page, pages, which)
                print(small(page.screenshot(args.out / name), args.colors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
