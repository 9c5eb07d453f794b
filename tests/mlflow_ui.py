"""The MLflow UI's pages of a clipforge retrain, as a user opens them: where they are, when they are
ready, what they say. Shared by the browser test (tests/test_mlflow_ui.py) and scripts/screenshots.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tests.browser import Browser


@dataclass(frozen=True)
class RetrainPages:
    """The MLflow UI at ``base`` showing one retrain: its run, the model it logged, the version it registered."""

    base: str
    experiment_id: str
    run_id: str
    model_id: str
    model_name: str
    version: str

    @classmethod
    def of_version(cls, base: str, tracking_uri: str, model_name: str, version: str) -> RetrainPages:
        """The pages of registered ``model_name`` version ``version`` (its run and logged model read from MLflow)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        mv = client.get_model_version(model_name, version)
        run = client.get_run(mv.run_id)
        model_id = mv.model_id or mv.source.removeprefix("models:/")
        return cls(base.rstrip("/"), run.info.experiment_id, mv.run_id, model_id, model_name, str(version))

    @property
    def run(self) -> str:
        return f"{self.base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    @property
    def logged_model(self) -> str:
        return f"{self.base}/#/experiments/{self.experiment_id}/models/{self.model_id}"

    @property
    def model_version(self) -> str:
        return f"{self.base}/#/models/{self.model_name}/versions/{self.version}"


#: What each page shows once its data has arrived (before, it shows spinners and skeletons).
READY = {
    "run": "About this run",
    "logged_model": "About this logged model",
    "model_version": "Registered At",
}


def open_page(page: Browser, pages: RetrainPages, which: str, timeout_s: float = 60) -> str:
    """Open one of the retrain's pages (``run``, ``logged_model``, ``model_version``), wait until it has
    rendered its data, close the assistant panel the UI opens on a first visit; the page's text."""
    page.goto(getattr(pages, which))
    page.wait_for(f"document.body && document.body.innerText.includes({json.dumps(READY[which])})", timeout_s)
    page.evaluate("document.querySelectorAll('button[aria-label=Close]').forEach(b => b.click())")
    return page.wait_stable("document.body.innerText", timeout_s=timeout_s)


def section(text: str, heading: str) -> list[str]:
    """The non-empty lines of a page's ``text`` under the last line that reads ``heading`` (the side
    panel's sections come last; the navigation and tables may use the same words), up to the next
    heading (:data:`HEADINGS`)."""
    lines = [line.strip() for line in text.splitlines()]
    if heading not in lines:
        return []
    start = len(lines) - lines[::-1].index(heading)
    out = []
    for line in lines[start:]:
        if line in HEADINGS:
            break
        if line:
            out.append(line)
    return out


#: The section headings of the run and logged model pages' overview, and what follows the last of them.
HEADINGS = {
    "About this run", "About this logged model", "Datasets", "Datasets used", "Tags", "Registered models",
    "Model versions", "Description", "Registered prompts", "Prompts", "Runs", "Parameters", "Logged models",
    "MLflow Assistant",
}  # fmt: skip


#: The JavaScript that finds every element whose own text holds a string (case aside), and where it is:
#: their boxes, top first, the viewport's height and the page's scroll offset.
LOCATE = """
((needle) => {
  needle = needle.toLowerCase();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const found = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.data.toLowerCase().includes(needle)) continue;
    const box = node.parentElement.getBoundingClientRect();
    if (box.height > 0) found.push({top: box.top, bottom: box.bottom, text: node.parentElement.innerText.slice(0, 300)});
  }
  found.sort((a, b) => a.top - b.top);
  return {found, viewport: window.innerHeight, scrolled: window.scrollY};
})(%s)
"""


def locate(page: Browser, text: str) -> dict:
    """Where the elements holding ``text`` are on the page (see :data:`LOCATE`)."""
    return page.evaluate(LOCATE % json.dumps(text))
