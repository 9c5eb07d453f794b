"""A headless Chromium driven through its DevTools protocol: open a page, wait for what it shows, read it,
take a screenshot. What the MLflow UI tests and ``scripts/screenshots.py`` look at pages with.

Single-page applications render after the load event (MLflow's charts need real seconds), so every
read waits for a JavaScript predicate instead of a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary on this machine, if there is one."""
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page of ``width`` x ``height`` CSS pixels.

    >>> with Browser("/usr/bin/chromium") as page:
    ...     page.goto("http://127.0.0.1:5000/#/models")
    ...     page.wait_for("document.body.innerText.includes('shapes-clip')")
    ...     page.screenshot(Path("models.png"))
    """

    def __init__(self, binary: str, width: int = 1280, height: int = 800, start_timeout_s: float = 60) -> None:
        self.binary, self.width, self.height, self.start_timeout_s = binary, width, height, start_timeout_s
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        self._profile = tempfile.TemporaryDirectory(prefix="clipforge-chromium-", ignore_cleanup_errors=True)
        profile = Path(self._profile.name)
        args = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--window-size={self.width},{self.height}", "about:blank",
        ]  # fmt: skip
        self._log = open(profile / "chromium.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            port = self._port(profile / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                pages = [t for t in json.loads(answer.read()) if t["type"] == "page"]
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride",
                width=self.width, height=self.height, deviceScaleFactor=1, mobile=False,
            )  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        # Chromium's helpers (zygote, renderers, crashpad) are in its process group: stop them all
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        self._profile.cleanup()

    def _port(self, active: Path) -> int:
        """The DevTools port Chromium chose (``--remote-debugging-port=0``), from the file it writes."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.flush()
                tail = Path(self._log.name).read_text(errors="replace")[-2000:]
                raise BrowserError(f"{self.binary} exited with {self.proc.returncode} at start:\n{tail}")
            if active.exists() and (first := active.read_text().split("\n", 1)[0]).isdigit():
                return int(first)
            time.sleep(0.1)
        raise BrowserError(f"{self.binary} opened no DevTools port within {self.start_timeout_s:.0f} s")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events that arrive meanwhile are skipped)."""
        call = next(self._ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") != call:
                continue
            if "error" in message:
                raise BrowserError(f"{method}: {message['error'].get('message')}")
            return message.get("result", {})

    def goto(self, url: str) -> None:
        """Open ``url`` as a new document (a hash route of an app as well: it starts from a clean page)."""
        self.send("Page.navigate", url="about:blank")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r}: {details.get('exception', {}).get('description') or details['text']}")
        return result["result"].get("value")

    def wait_for(self, predicate: str, timeout_s: float = 60, every_s: float = 0.25) -> Any:
        """Wait until the JavaScript expression ``predicate`` is truthy in the page; its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = self.evaluate(predicate)
            except BrowserError:  # the page is between documents
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                raise TimeoutError(f"not within {timeout_s:.0f} s: {predicate}\nthe page reads:\n{text[:2000]}")
            time.sleep(every_s)

    def wait_stable(self, expression: str, quiet_s: float = 1.0, timeout_s: float = 60) -> Any:
        """Wait until the value of ``expression`` has not changed for ``quiet_s`` (an app that renders its
        sections one by one as their data arrives); that value."""
        deadline = time.monotonic() + timeout_s
        value, since = self.evaluate(expression), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.evaluate(expression)
            if now != value:
                value, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return value
        raise TimeoutError(f"{expression} kept changing for {timeout_s:.0f} s")

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def screenshot(self, path: Path) -> Path:
        """A PNG of what the viewport shows."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
