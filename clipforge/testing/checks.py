"""One conformance check per component kind, each a plain function that raises :class:`ConformanceError`.

The checks hold a component to what the host relies on (clipforge/core/hookspecs.py), at
the point where the host would otherwise fail late or silently: in the middle of a training
run, in a model that cannot be loaded back, in metrics MLflow refuses.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.core.components import (
    ChoosesHyperparameters,
    CurationStep,
    DecidesAgainstPool,
    DecidesInPartitions,
    DigestsContent,
    EncoderBundle,
    MultilabelDataset,
    PartitionedDataset,
    PerSample,
    Pool,
    Preparable,
    ReportsDetails,
    ReportsPerSample,
    Sample,
    Verdict,
    WholeDatasetStep,
    check_template,
    needs_inputs,
    reads_pixels,
)
from clipforge.core.kinds import KINDS
from clipforge.core.storage import Store
from clipforge.testing.inputs import Features, tiny_dataset, tiny_encoder_bundle, tiny_features, tiny_samples


class ConformanceError(AssertionError):
    """A component does not do what the host relies on; the message says what and where."""


def _fail(what: str, message: str) -> ConformanceError:
    return ConformanceError(f"{what}: {message}")


# -- losses ---------------------------------------------------------------------------------


def check_loss(loss: Any, features: Features | None = None, *, temperature_grad: bool = True, name: str = "loss"):
    """A loss is a ``torch.nn.Module`` that returns a finite scalar (or ``{"loss": scalar, ...}``)
    whose gradient reaches both feature tensors, the temperature and every parameter of the loss.

    ``temperature_grad=False`` accepts a loss that ignores ``logit_scale`` (a fixed temperature).
    Returns the loss tensor.
    """
    import torch

    if not isinstance(loss, torch.nn.Module):
        raise _fail(name, f"must be a torch.nn.Module (the trainer moves it with .to(device)), got {type(loss).__name__}")
    f = features or tiny_features()
    loss.zero_grad(set_to_none=True)
    for t in (f.image_features, f.text_features, f.logit_scale, f.logit_bias):
        if t is not None:
            t.grad = None
    out = loss(f.image_features, f.text_features, f.logit_scale, f.logit_bias, **_batch_inputs(loss, len(f.image_features)))
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise _fail(name, f"returned a dict without a 'loss' key (keys: {', '.join(map(str, out)) or 'none'})")
        for key, value in out.items():
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise _fail(name, f"returned dict entry {key!r} is not a one-element tensor: {value!r}")
        value = out["loss"]
    else:
        value = out
    if not isinstance(value, torch.Tensor):
        raise _fail(name, f"must return a tensor or a dict with 'loss', got {type(value).__name__}")
    if value.dim() != 0:
        raise _fail(name, f"must return a scalar (0-d tensor), got shape {tuple(value.shape)}")
    if not value.is_floating_point() or not torch.isfinite(value):
        raise _fail(name, f"returned {value.item()!r}, not a finite float")
    if not value.requires_grad:
        raise _fail(name, "the returned loss does not require grad: it is detached from its inputs")
    value.backward()
    inputs = {"image_features": f.image_features, "text_features": f.text_features}
    if temperature_grad:
        inputs["logit_scale"] = f.logit_scale
    for what, tensor in [*inputs.items(), *((f"parameter {n}", p) for n, p in loss.named_parameters() if p.requires_grad)]:
        grad = tensor.grad
        if grad is None:
            raise _fail(name, f"no gradient reaches {what}")
        if not torch.isfinite(grad).all():
            raise _fail(name, f"the gradient of {what} is not finite")
        if not grad.any():
            raise _fail(name, f"the gradient of {what} is all zeros")
    return value.detach()


# -- encoders -------------------------------------------------------------------------------


def check_encoder(bundle: Any, store: Store | None = None, *, name: str = "encoder") -> dict[str, Any]:
    """An encoder's embeddings have the declared size (``embed_dim`` of its arch) and are finite,
    and the bundle survives the save/load round trip every trained model goes through: saved as
    an open_clip ``local-dir:`` folder, copied to the store and back, loaded by open_clip itself,
    it embeds the same images and texts to the same vectors, with the same preprocessing.

    Returns ``{"image": image embeddings, "text": text embeddings, "embed_dim": int}``.
    """
    import torch
    from PIL import Image

    from clipforge.core.checkpoint import load_open_clip_dir, model_cfg_of, save_open_clip_dir

    if not isinstance(bundle, EncoderBundle):
        raise _fail(name, f"the factory must return a clipforge.EncoderBundle, got {type(bundle).__name__}")
    try:
        declared = int(model_cfg_of(bundle.arch)["embed_dim"])
    except Exception as e:
        raise _fail(name, f"arch {bundle.arch!r} is not an open_clip model config with embed_dim: {e}") from e
    images = [Image.new("RGB", (48, 40), color) for color in ("red", "navy")]
    texts = ["a red square", "a dark blue rectangle on a plain background"]
    model = bundle.model
    if not isinstance(getattr(model, "logit_scale", None), torch.Tensor):
        raise _fail(name, "the model has no logit_scale tensor (the learned temperature)")

    def embed(b: EncoderBundle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.stack([b.preprocess_val(im) for im in images])
        tokens = b.tokenizer(texts)
        if not (isinstance(tokens, torch.Tensor) and tokens.dtype == torch.long and len(tokens) == len(texts)):
            raise _fail(name, f"the tokenizer must map {len(texts)} texts to a LongTensor of {len(texts)} rows")
        was_training = b.model.training
        b.model.eval()
        try:
            with torch.no_grad():
                return pixels, b.model.encode_image(pixels), b.model.encode_text(tokens)
        finally:
            b.model.train(was_training)

    pixels, image_emb, text_emb = embed(bundle)
    for what, emb in (("image", image_emb), ("text", text_emb)):
        if tuple(emb.shape) != (len(images), declared):
            raise _fail(name, f"{what} embeddings have shape {tuple(emb.shape)}; the arch declares embed_dim={declared}")
        if not torch.isfinite(emb).all():
            raise _fail(name, f"{what} embeddings are not finite")
    train_pixels = bundle.preprocess_train(images[0])
    if tuple(train_pixels.shape) != tuple(pixels.shape[1:]):
        raise _fail(name, f"preprocess_train gives {tuple(train_pixels.shape)}, preprocess_val {tuple(pixels.shape[1:])}")

    with tempfile.TemporaryDirectory() as tmp:
        try:
            saved = save_open_clip_dir(bundle, Path(tmp) / "saved")
            if store is not None:
                store.put_dir(saved, "conformance/encoder")
                saved = store.get_dir("conformance/encoder", Path(tmp) / "fetched")
            loaded = load_open_clip_dir(saved)
        except ConformanceError:
            raise
        except Exception as e:
            raise _fail(name, f"does not survive a save/load round trip: {type(e).__name__}: {e}") from e
        pixels2, image_emb2, text_emb2 = embed(loaded)
    if tuple(pixels2.shape) != tuple(pixels.shape) or not torch.allclose(pixels, pixels2, atol=1e-5):
        raise _fail(
            name,
            "after a save/load round trip the images are preprocessed differently: "
            "preprocess_cfg (image_size, mean, std, interpolation, resize_mode) must describe preprocess_val",
        )
    for what, a, b in (("image", image_emb, image_emb2), ("text", text_emb, text_emb2)):
        if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
            diff = (a - b).abs().max().item()
            raise _fail(name, f"{what} embeddings change after a save/load round trip (max difference {diff:.3g})")
    return {"image": image_emb, "text": text_emb, "embed_dim": declared}


# -- datasets -------------------------------------------------------------------------------


def check_dataset(dataset: Any, *, limit: int = 64, name: str = "dataset") -> list[Sample]:
    """A dataset yields :class:`~clipforge.Sample` s that curation accepts (a valid key, a text
    caption, a decodable image), with unique keys, and yields the same ones again when iterated
    twice (evaluators share one dataset object). ``len()`` if defined is the number of samples;
    a classification dataset has unique class names, labels within them, and ``{c}`` templates.

    Checks the first ``limit`` samples; returns them.
    """
    from itertools import islice

    from clipforge.engine.shards import BadSample, decode

    if not isinstance(dataset, Iterable):
        raise _fail(name, f"must be iterable, got {type(dataset).__name__}")
    samples = list(islice(iter(dataset), limit + 1))
    exhausted = len(samples) <= limit
    samples = samples[:limit]
    if not samples:
        raise _fail(name, "yielded no samples")
    keys: set[str] = set()
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise _fail(name, f"item {i} is a {type(s).__name__}, not a clipforge.Sample")
        try:
            decode(s)
        except BadSample as e:
            raise _fail(name, f"sample {s.key!r} (item {i}) would be dropped by curation: {e}") from None
        if s.key in keys:
            raise _fail(name, f"key {s.key!r} occurs twice (item {i}); keys name shard members and must be unique")
        keys.add(s.key)
        if s.label is not None and (not isinstance(s.label, numbers.Integral) or isinstance(s.label, bool)):
            raise _fail(name, f"sample {s.key!r} has label {s.label!r}; a label is a class index (int) or None")
        if not isinstance(s.meta, dict):
            raise _fail(name, f"sample {s.key!r} has meta of type {type(s.meta).__name__}, not a dict")
    again = [getattr(s, "key", None) for s in islice(iter(dataset), len(samples))]
    if again != [s.key for s in samples]:
        raise _fail(
            name,
            "a second iteration yields other samples: a dataset must be re-iterable and deterministic "
            "(a generator is one-pass; return a fresh iterator from __iter__)",
        )
    if isinstance(dataset, Sized):
        n = len(dataset)
        if (exhausted and n != len(samples)) or (not exhausted and n <= limit):
            seen = f"{len(samples)}" if exhausted else f"more than {limit}"
            raise _fail(name, f"len() is {n} but iterating yields {seen} samples")
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        classes = list(classes)
        if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
            raise _fail(name, f"classes must be a non-empty list of class names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise _fail(name, "classes has duplicate names")
        multilabel = isinstance(dataset, MultilabelDataset) and bool(dataset.multilabel)
        for s in samples:
            targets = s.meta.get("targets")
            if multilabel and not (isinstance(targets, list) and len(targets) == len(classes) and set(targets) <= {0, 1}):
                raise _fail(name, f"sample {s.key!r} of a multilabel dataset needs meta['targets']: 0/1 over its classes")
            if not multilabel and (s.label is None or not 0 <= s.label < len(classes)):
                raise _fail(name, f"sample {s.key!r} has label {s.label!r}, not an index into its {len(classes)} classes")
        for t in getattr(dataset, "templates", None) or []:
            try:
                check_template(t)
            except ValueError as e:
                raise _fail(name, str(e)) from None
    if isinstance(dataset, DigestsContent):
        first = dataset.content_digest()
        if not (isinstance(first, str) and first) or dataset.content_digest() != first:
            raise _fail(name, f"content_digest() must return the same non-empty string each time, got {first!r}")
    if isinstance(dataset, PartitionedDataset):
        _check_parts(dataset, [s.key for s in samples], name)
    return samples


def _check_parts(dataset: PartitionedDataset, keys: list[str], name: str) -> None:
    """A partitioned dataset's parts are dataset entries that, in order, yield the dataset's own samples."""
    from itertools import chain, islice

    from clipforge.core.plugins import get_plugin_manager

    catalog = get_plugin_manager().catalog
    parts = dataset.parts()
    if not parts or not all(isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in parts):
        raise _fail(name, f"parts() must return dataset entries ({{'type': name, ...}}), got {parts!r:.200}")
    try:
        built = [catalog.create("datasets", dict(p)) for p in parts]
    except Exception as e:
        raise _fail(name, f"a part of parts() cannot be built: {type(e).__name__}: {e}") from e
    again = [getattr(s, "key", None) for s in islice(chain.from_iterable(built), len(keys))]
    if again != keys:
        raise _fail(name, "its parts() together yield other samples than the dataset itself, or in another order")


# -- evaluators -----------------------------------------------------------------------------


def check_evaluator(
    evaluator: Any, bundle: EncoderBundle | None = None, dataset: Any = None, device: str = "cpu", *, name: str = "evaluator"
) -> dict[str, float]:
    """An evaluator's ``evaluate(bundle, dataset, device)`` returns a non-empty dict of metric
    names to finite floats, and leaves the model's weights as they were.

    Defaults: :func:`tiny_encoder_bundle` and :func:`tiny_dataset` (a classification dataset
    with captions). Returns the metrics.
    """
    import torch

    if not callable(getattr(evaluator, "evaluate", None)):
        raise _fail(name, f"has no evaluate(bundle, dataset, device) method ({type(evaluator).__name__})")
    bundle = bundle or tiny_encoder_bundle()
    dataset = dataset if dataset is not None else tiny_dataset()
    before = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    metrics = evaluator.evaluate(bundle, dataset, device)
    if not isinstance(metrics, Mapping):
        raise _fail(name, f"evaluate() must return a dict of metric name -> float, got {type(metrics).__name__}")
    if not metrics:
        raise _fail(name, "evaluate() returned no metrics")
    for key, value in metrics.items():
        if not isinstance(key, str) or not key.strip():
            raise _fail(name, f"metric name {key!r} is not a non-empty string")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(name, f"metric {key!r} is {value!r} ({type(value).__name__}), not a float")
        if not math.isfinite(value):
            raise _fail(name, f"metric {key!r} is {value}, not finite")
    after = bundle.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if changed:
        raise _fail(name, f"evaluate() changed the model's weights ({', '.join(changed[:3])}...)")
    if isinstance(evaluator, ChoosesHyperparameters):
        chosen = evaluator.hyperparameters
        if isinstance(chosen, str) or not all(isinstance(h, str) for h in chosen):
            raise _fail(name, f"hyperparameters must be a tuple of names, got {chosen!r}")
        if missing := [h for h in chosen if h not in metrics]:
            raise _fail(name, f"hyperparameters {missing} are not among evaluate()'s results {sorted(metrics)}")
        if len(chosen) == len(metrics):
            raise _fail(name, "evaluate() returned only hyperparameters, no metric")
    if isinstance(evaluator, ReportsDetails) and not isinstance(evaluator.details, Mapping):
        raise _fail(name, f"details must be a dict after evaluate(), got {type(evaluator.details).__name__}")
    if isinstance(evaluator, ReportsPerSample):
        _check_per_sample(evaluator.per_sample, metrics, name)
    return {k: float(v) for k, v in metrics.items()}


def _check_per_sample(per_sample: Any, metrics: Mapping[str, float], name: str) -> None:
    """Per-sample results name metrics of the result, have one value per key, and recompute the metric."""
    from clipforge.core.bootstrap import metric_value

    if not isinstance(per_sample, Mapping):
        raise _fail(name, f"per_sample must be a dict after evaluate(), got {type(per_sample).__name__}")
    for metric, record in per_sample.items():
        if metric not in metrics:
            raise _fail(name, f"per_sample has {metric!r}, which is not among evaluate()'s results {sorted(metrics)}")
        if not isinstance(record, PerSample):
            raise _fail(name, f"per_sample[{metric!r}] is a {type(record).__name__}, not a clipforge.PerSample")
        n = len(record.keys)
        if (
            len(set(record.keys)) != n
            or len(record.values) != n
            or any(x is not None and len(x) != n for x in (record.weights, record.groups))
        ):
            raise _fail(name, f"per_sample[{metric!r}] needs unique keys and one value (weight, group) per key")
        if not math.isclose(metric_value(record), float(metrics[metric]), rel_tol=1e-6, abs_tol=1e-9):
            raise _fail(name, f"per_sample[{metric!r}] gives {metric_value(record)!r}, but the metric is {metrics[metric]!r}")


# -- curation steps -------------------------------------------------------------------------


def check_curation_step(step: Any, samples: Sequence[Sample] | None = None, *, name: str = "curation step") -> list[Verdict]:
    """A curation step called on a batch returns one :class:`~clipforge.Verdict` per sample, in
    order: a dropped one has a reason, scores are finite floats; it leaves the samples as they
    were, and answers an empty batch with no verdicts.

    Default samples: :func:`tiny_samples`. Returns the verdicts.
    """
    if not isinstance(step, (CurationStep, WholeDatasetStep)):
        raise _fail(name, f"must be callable on a list of samples (or have features and decide), got {type(step).__name__}")
    samples = list(samples) if samples is not None else tiny_samples()
    snapshot = [(s.key, copy.deepcopy(s.caption), s.label, copy.deepcopy(s.meta)) for s in samples]
    verdicts = _judge(step, samples, name)
    if len(verdicts) != len(samples):
        raise _fail(name, f"returned {len(verdicts)} verdicts for {len(samples)} samples; one per sample, in order")
    for s, v in zip(samples, verdicts):
        if not isinstance(v, Verdict):
            raise _fail(name, f"the verdict on {s.key!r} is a {type(v).__name__}, not a clipforge.Verdict")
        if not v.keep and not (isinstance(v.reason, str) and v.reason.strip()):
            raise _fail(name, f"dropped {s.key!r} without a reason (Verdict.dropped(reason))")
        for key, score in v.scores.items():
            if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
                raise _fail(name, f"score {key!r} on {s.key!r} is {score!r}, not a finite float")
    if [(s.key, s.caption, s.label, s.meta) for s in samples] != snapshot:
        raise _fail(name, "changed the samples it judged; a step decides keep or drop, it does not edit")
    empty = _judge(step, [], name)
    if empty:
        raise _fail(name, f"returned {len(empty)} verdicts for an empty batch")
    if not reads_pixels(step):
        _check_without_pixels(step, samples, verdicts, name)
    if isinstance(step, DecidesAgainstPool):
        _check_against_pool(step, samples, verdicts, name)
    if isinstance(step, DecidesInPartitions):
        _check_in_partitions(step, samples, verdicts, name)
    return verdicts


def _check_in_partitions(step: Any, samples: list[Sample], verdicts: list[Verdict], name: str) -> None:
    """A step that decides in partitions gives the verdicts of its one decision, for any number of
    partitions and blocks (an empty block among them)."""
    from clipforge.engine.curation.partitioned import decide_in_partitions

    features = step.features(samples)
    if hasattr(features, "astype"):
        features = features.astype("float32")
    keys = [s.key for s in samples]
    expected = [(v.keep, v.reason, v.detail) for v in verdicts]
    half = len(samples) // 2
    for partitions, sizes in ((1, [len(samples)]), (2, [half, 0, len(samples) - half]), (3, None)):
        got = [(v.keep, v.reason, v.detail) for v in decide_in_partitions(step, keys, features, partitions, sizes=sizes)]
        if got != expected:
            raise _fail(name, f"decided in {partitions} partitions, it gave other verdicts than decide() over every sample")


def _check_against_pool(step: Any, samples: list[Sample], verdicts: list[Verdict], name: str) -> None:
    """A step that decides against a pool has a JSON-able features signature, and an empty pool changes nothing."""
    import json

    signature = step.features_signature()
    if not isinstance(signature, Mapping):
        raise _fail(name, f"features_signature() must return a dict, got {type(signature).__name__}")
    try:
        json.dumps(signature)
    except (TypeError, ValueError) as e:
        raise _fail(name, f"features_signature() is stored beside the manifest and must be JSON-able: {e}") from None
    features = step.features(samples)
    if hasattr(features, "astype"):
        features = features.astype("float32")
    empty = Pool(keys=[], features=features[:0], kept=[])
    against = list(step.decide_against([s.key for s in samples], features, empty))
    if [(v.keep, v.reason) for v in against] != [(v.keep, v.reason) for v in verdicts]:
        raise _fail(name, "decide_against() with an empty pool must decide as decide() does")


def _check_without_pixels(step: Any, samples: list[Sample], verdicts: list[Verdict], name: str) -> None:
    """A step that says ``reads_pixels = False`` judges images only opened (as curation gives them) alike, leaving them undecoded."""
    import io

    from clipforge.engine.shards import decode

    opened = []
    for s in samples:
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        opened.append(decode(Sample(s.key, buf.getvalue(), s.caption, s.label, dict(s.meta)), pixels=False).sample)
    again = _judge(step, opened, name)
    if [(v.keep, v.reason) for v in again] != [(v.keep, v.reason) for v in verdicts]:
        raise _fail(
            name, "says reads_pixels = False but judges images only opened (size and mode known, pixels not decoded) differently"
        )
    if any(not s.image.tile for s in opened):  # PIL empties `tile` once it decoded the pixels
        raise _fail(name, "says reads_pixels = False but decoded the pixels of the images it judged")


def _batch_inputs(loss: Any, batch_size: int) -> dict[str, Any]:
    """For a loss that ``needs_inputs`` (a distillation teacher reads the batch): tiny images and tokens,
    after ``prepare(bundle)`` as the trainer calls it."""
    if not needs_inputs(loss):
        return {}
    import torch

    bundle = tiny_encoder_bundle()
    if isinstance(loss, Preparable):
        loss.prepare(bundle)
    samples = list(tiny_dataset(batch_size))
    images = torch.stack([bundle.preprocess_val(s.image) for s in samples])
    return {"images": images, "texts": bundle.tokenizer([s.caption for s in samples])}


def _judge(step: Any, samples: list[Sample], name: str) -> list[Any]:
    """Verdicts as the curate stage gets them: a call, or, for a whole-dataset step, features then a decision."""
    if not isinstance(step, WholeDatasetStep):
        return list(step(samples))
    features = step.features(samples)
    if len(features) != len(samples):
        raise _fail(name, f"features() returned {len(features)} values for {len(samples)} samples; one per sample")
    if hasattr(features, "astype"):  # arrays reach decide() as float32, as the reduce phase hands them
        features = features.astype("float32")
    return list(step.decide([s.key for s in samples], features))


# -- launchers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankProbe:
    """A job for launchers: each process records the rank and world size it was told, in ``folder``;
    with ``fail``, the process of rank ``fail`` raises instead."""

    folder: str
    fail: int | None = None

    def __call__(self) -> None:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank == self.fail:
            raise RuntimeError(f"probe failure on rank {rank}")
        Path(self.folder, f"{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "pid": os.getpid()}))


def check_launcher(launcher: Any, *, device: str = "cpu", name: str = "launcher") -> int:
    """A launcher runs a job once in every process it starts, each told its rank and the world size
    (``RANK``, ``WORLD_SIZE``) as ``torch.distributed`` expects; it returns once all finished; the
    error of a failing process reaches the caller, naming the rank or the error. Returns the world size."""
    from clipforge.core.components import Launcher

    if not isinstance(launcher, Launcher):
        raise _fail(name, f"must have launch(job, device), got {type(launcher).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        launcher.launch(RankProbe(tmp), device)
        seen = [json.loads(p.read_text()) for p in Path(tmp).glob("*.json")]
        if not seen:
            raise _fail(name, "returned without running the job")
        world = seen[0]["world"]
        if sorted(s["rank"] for s in seen) != list(range(world)) or any(s["world"] != world for s in seen):
            raise _fail(name, f"ran the job as ranks {sorted(s['rank'] for s in seen)} of {[s['world'] for s in seen]}")
        try:
            launcher.launch(RankProbe(tmp, fail=world - 1), device)
        except Exception as e:
            if f"rank {world - 1}" not in str(e) and "probe failure" not in str(e):
                raise _fail(name, f"reported a failed process without its rank or error: {e}") from e
        else:
            raise _fail(name, f"returned although rank {world - 1} failed")
    return int(world)


# -- adapters ---------------------------------------------------------------------------------


def check_adapter(adapter: Any, bundle: EncoderBundle | None = None, *, name: str = "adapter") -> dict[str, Any]:
    """An adapter wraps the model so that only its own parameters require gradients; an optimizer step
    leaves every base weight bit-identical; ``save`` writes files; ``merge`` gives back a plain model
    (the keys it had before ``apply``) whose embeddings equal the adapted model's to 1e-5.
    Returns the merged model's state dict."""
    import torch

    from clipforge.core.components import Adapter

    if not isinstance(adapter, Adapter):
        raise _fail(name, f"must have apply(model), merge(model) and save(model, folder), got {type(adapter).__name__}")
    bundle = bundle or tiny_encoder_bundle()
    model = bundle.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter.apply(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise _fail(name, "apply() left no parameter that requires gradients")
    images, texts = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), bundle.tokenizer(["a", "b", "c", "d"])
    model.train()
    out = model(images, texts)
    loss = out["image_features"].sum() + out["text_features"].sum()
    loss.backward()
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()):
        raise _fail(name, "no gradient reaches the adapter's parameters")
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.01 * torch.randn_like(p))  # a nonzero update, as training makes
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(model, tmp)
        if not any(Path(tmp).iterdir()):
            raise _fail(name, "save(model, folder) wrote nothing")
    model.eval()
    with torch.no_grad():
        adapted = model(images, texts)
    adapter.merge(model)
    merged = model.state_dict()
    if set(merged) != set(before):
        extra, missing = sorted(set(merged) - set(before)), sorted(set(before) - set(merged))
        raise _fail(name, f"merge() left a model with other keys: extra {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        plain = model(images, texts)
    for key in ("image_features", "text_features"):
        gap = float((plain[key] - adapted[key]).abs().max())
        if gap > 1e-5:
            raise _fail(name, f"the merged model's {key} differ from the adapted model's by {gap:.2e} (> 1e-5)")
    if not frozen:
        raise _fail(name, "apply() froze no base weight: that is full fine-tuning, not an adapter")
    return dict(merged)


# -- by name, through the catalog ----------------------------------------------------------

#: The check of each kind, by kind name (the table of kinds names them).
CHECKS: dict[str, Callable[..., Any]] = {kind.name: globals()[kind.check] for kind in KINDS.values()}


def components(kind: str, *, plugin: str | None = None, distribution: str | None = None) -> list[str]:
    """Names of the registered components of ``kind``, optionally only those of one plugin
    (entry-point name) or one distribution: what a parametrized conformance test iterates over."""
    from clipforge.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    catalog = pm.catalog
    names = []
    for n in catalog.names(kind):
        owner = catalog.get(kind, n).plugin
        info = pm.infos.get(owner)
        if plugin is not None and owner != plugin:
            continue
        if distribution is not None and (info is None or info.distribution != distribution):
            continue
        names.append(n)
    return names


def check_component(kind: str, name: str, fields: dict[str, Any] | None = None, **inputs: Any) -> Any:
    """Build component ``name`` of ``kind`` from the catalog, as a recipe entry ``{type: name, **fields}``
    would, and run the check of its kind on it; ``inputs`` go to the check (``features=``,
    ``store=``, ``bundle=``, ``dataset=``, ``samples=``, ``limit=``)."""
    from clipforge.core.plugins import get_plugin_manager

    if kind not in CHECKS:
        raise ValueError(f"unknown component kind {kind!r}; one of: {', '.join(CHECKS)}")
    component = get_plugin_manager().catalog.create(kind, {"type": name, **(fields or {})})
    return CHECKS[kind](component, name=f"{KINDS[kind].noun} {name!r}", **inputs)
