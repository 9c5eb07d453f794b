"""The model card: a Markdown page logged beside each model (data, recipe, metrics, lineage, usage)."""

from __future__ import annotations

import math
from typing import Any

import yaml

SUMMARY = (
    "A CLIP-style image-text model trained with a contrastive loss by clipforge. It maps images "
    "and texts into one embedding space: compare them by cosine similarity."
)


def render_model_card(
    *,
    model_name: str,
    recipe_yaml: str,
    metrics: dict,
    lineage: dict,
    version: str | None,
    embed_dim: int | None = None,
    replay: dict | None = None,
    seen: dict[str, int] | None = None,
) -> str:
    """Markdown describing the model ``model_name`` (version ``version`` once registered); ``replay``:
    the :class:`~clipforge.core.results.ReplayResult` of its training data, as a dict; ``seen``: the
    samples each source gave a training drawn by weight."""
    recipe = _parse(recipe_yaml)
    title = f"# {model_name}" + (f" — version {version}" if version else "")
    uri = f"models:/{model_name}/{version}" if version else f"models:/{model_name}@champion"
    sections = [
        title,
        SUMMARY,
        "## Data\n\n" + _data_section(recipe) + _replay_line(replay) + _seen_line(seen),
        "## Metrics\n\n" + _table(("metric", "value"), [(k, _number(v)) for k, v in sorted(metrics.items())]),
        "## Lineage\n\n" + _table(("key", "value"), [(k, str(v)) for k, v in sorted(lineage.items())]),
        "## Recipe\n\n```yaml\n" + recipe_yaml.strip() + "\n```",
        _usage(model_name, uri),
        _serving(embed_dim),
    ]
    return "\n\n".join(sections) + "\n"


def summary(recipe_yaml: str) -> str:
    """Two sentences on what a run of this recipe makes and from what: the description of runs and models."""
    recipe = _parse(recipe_yaml)
    data = recipe.get("data") or {}
    train = _training_data(data.get("train")) if isinstance(data, dict) and data.get("train") else "its training data"
    steps = [_component(step) for step in recipe.get("curation") or []]
    curated = f", curated with {', '.join(steps)}" if steps else ""
    return f"{SUMMARY} Trained by recipe `{recipe.get('name', '?')}` on {train}{curated}."


def _parse(recipe_yaml: str) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _data_section(recipe: dict[str, Any]) -> str:
    data = recipe.get("data") or {}
    rows = []
    for split, ref in data.items() if isinstance(data, dict) else []:
        if split == "eval" and isinstance(ref, dict) and "type" not in ref:  # named evaluation sets
            rows += [(f"eval: {name}", _component(entry)) for name, entry in ref.items()]
        elif split == "train" and isinstance(ref, list):  # a weighted mixture
            rows += [(f"train: {_label(s)} (weight {s.get('weight', 1.0)})", _component(s.get("source"))) for s in ref]
        elif split != "replay":
            rows.append((split, _component(ref)))
    text = _table(("split", "dataset"), rows) if rows else "Not recorded in the recipe."
    steps = recipe.get("curation") or []
    if steps:
        text += "\n\nCurated with, in order: " + ", ".join(_component(step) for step in steps) + "."
    return text


def _replay_line(replay: dict | None) -> str:
    if not replay:
        return ""
    return (
        f"\n\nReplayed: {replay['pairs']:,} pairs ({replay['fraction']:.1%} of the training data), a seeded "
        f"sample of the {replay['pool']:,} that {replay['source']} was trained on (`{replay['uri']}`)."
    )


def _seen_line(seen: dict[str, int] | None) -> str:
    if not seen:
        return ""
    total = sum(seen.values())
    return "\n\nSamples seen per source: " + ", ".join(f"{name} {n:,} ({n / total:.1%})" for name, n in seen.items()) + "."


def _label(source: Any) -> str:
    return str(source.get("name") or _component(source.get("source"))) if isinstance(source, dict) else "?"


def _training_data(train: Any) -> str:
    if isinstance(train, list):
        return "a mixture of " + ", ".join(f"{_label(s)} (weight {s.get('weight', 1.0)})" for s in train if isinstance(s, dict))
    return _component(train)


def _component(ref: Any) -> str:
    """``type`` followed by its parameters, e.g. ``synthetic-shapes (size=4000, seed=0)``."""
    if not isinstance(ref, dict):
        return f"`{ref}`"
    params = ", ".join(f"{k}={v}" for k, v in ref.items() if k != "type")
    return f"`{ref.get('type', '?')}`" + (f" ({params})" if params else "")


def _usage(model_name: str, uri: str) -> str:
    return f"""## How to use it

With open_clip alone, from the model's `local-dir:` folder (`open_clip_config.json` and
`open_clip_model.safetensors`; the MLflow model carries it under `artifacts/`):

```python
import open_clip, torch

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH")
tokenizer = open_clip.get_tokenizer("local-dir:PATH")
with torch.no_grad():
    image_features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
    text_features = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)
```

With MLflow, as a pyfunc that maps a DataFrame with an `image` column (base64 or raw bytes of
an encoded image) or a `text` column (one of the two per row) to L2-normalized float32
embeddings:

```python
import mlflow, pandas as pd

model = mlflow.pyfunc.load_model("models:/{model_name}@champion")  # or "{uri}"
embeddings = model.predict(pd.DataFrame({{"text": ["a photo of a cat"]}}))
```

As a REST endpoint (images as base64 strings; the answer holds one embedding per row):

```bash
mlflow models serve -m "models:/{model_name}@champion" --env-manager local -p 5001
curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
  -d '{{"dataframe_split": {{"columns": ["image", "text"], "data": [[null, "a photo of a cat"]]}}}}'
```"""


def _serving(embed_dim: int | None) -> str:
    dim = f"{embed_dim}" if embed_dim else "D"
    return f"""## Serving: request and response

`POST /invocations` with `Content-Type: application/json` takes a table of rows, each holding
**exactly one** of:

| column | type | holds |
|---|---|---|
| `image` | string | an encoded image (PNG, JPEG, WebP, ...) as base64, optionally as a `data:` URL |
| `text` | string | a caption or query |

in any of MLflow's layouts: `{{"dataframe_split": {{"columns": ["image", "text"], "data": [[null, "a cat"]]}}}}`,
`{{"dataframe_records": [{{"text": "a cat"}}]}}`, `{{"inputs": {{"text": ["a cat"]}}}}` or
`{{"instances": [{{"text": "a cat"}}]}}`. A table may have only one of the two columns.

The answer is `{{"predictions": [[...], ...]}}`: one L2-normalized float32 embedding of {dim} numbers per
row, in the order of the rows; images and texts share the space (cosine similarity = dot product).

A request the model cannot embed is answered with HTTP 400 and
`{{"error_code": "INVALID_PARAMETER_VALUE", "message": "..."}}`, the message naming what is wrong and
where:

| request | message |
|---|---|
| no `image` or `text` column | `input needs a column 'image' and/or 'text'; got columns ['caption']` |
| a row with both, or neither | `row 3 has both an image and a text; give one per row` / `row 3 has neither an image nor a text` |
| an image that is not base64 | `row 0: cannot decode the image: it is not base64 text (...)` |
| base64 of bytes that are not an image | `row 0: cannot decode the image: its 12 bytes are not an image file of a known format` |"""


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    if not rows:
        return "None recorded."
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return str(value)
