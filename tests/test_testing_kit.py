"""clipforge.testing: every built-in component passes its conformance check; each kind of broken one fails it."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
import torch.nn.functional as F

import clipforge
from clipforge import Sample, Verdict
from clipforge.testing import (
    TINY_ENCODER_CONFIG,
    ConformanceError,
    check_component,
    check_curation_step,
    check_encoder,
    check_loss,
    components,
    tiny_encoder_bundle,
    tiny_features,
)

ROOT = Path(__file__).resolve().parents[1]


def _input_files() -> dict[str, str]:
    """A tar shard, a CSV and a Parquet table of the tiny dataset, and a scoring model folder, for the inputs' fields."""
    import tarfile
    import tempfile

    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    from clipforge.core.checkpoint import save_open_clip_dir
    from clipforge.testing import tiny_dataset

    folder = Path(tempfile.mkdtemp(prefix="clipforge-kit-"))
    paths, captions = [], []
    with tarfile.open(folder / "shard.tar", "w") as tar:
        for s in tiny_dataset(6):
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            (folder / f"{s.key}.png").write_bytes(buf.getvalue())
            paths.append(f"{s.key}.png")
            captions.append(s.caption)
            for name, data in ((f"{s.key}.png", buf.getvalue()), (f"{s.key}.txt", s.caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    # a CLIP_benchmark task folder: classnames, templates, test/nshards.txt and one shard of png + cls
    task = folder / "cb"
    (task / "test").mkdir(parents=True)
    classes = sorted({s.caption for s in tiny_dataset(6)})
    (task / "classnames.txt").write_text("\n".join(classes) + "\n")
    (task / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\n")
    (task / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(task / "test" / "0.tar", "w") as tar:
        for i, s in enumerate(tiny_dataset(6)):
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            for name, data in ((f"s{i:07d}.png", buf.getvalue()), (f"s{i:07d}.cls", str(classes.index(s.caption)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = pa.table({"filepath": paths, "caption": captions})
    pyarrow.csv.write_csv(table, str(folder / "pairs.csv"))
    pyarrow.parquet.write_table(table, str(folder / "pairs.parquet"))
    save_open_clip_dir(tiny_encoder_bundle(), folder / "scorer")
    return {"dir": str(folder)}


_FILES = _input_files()["dir"]

#: The fields a built-in needs to be built tiny; a new built-in with required fields must be added here.
TINY_FIELDS = {
    "open-clip": {"config": TINY_ENCODER_CONFIG},
    "synthetic-shapes": {"size": 24, "image_size": 32},
    "webdataset": {"urls": f"{_FILES}/shard.tar"},
    "csv": {"path": f"{_FILES}/pairs.csv", "caption_column": "caption"},
    "clip-benchmark": {"root": f"{_FILES}/cb"},
    "parquet": {"path": f"{_FILES}/pairs.parquet"},
    "huggingface": {"path": f"{_FILES}/pairs.parquet", "image_column": "filepath", "caption_column": "caption"},
    "caption-length": {"min_words": 2},
    "clip-score": {"model": f"{_FILES}/scorer", "threshold": -1.0},
    "balance": {"entries": ["red", "circle", "blue square"], "t": 2},
    "distill": {"teacher": f"{_FILES}/scorer"},
    "torchrun": {"nproc_per_node": 2},
    "ray": {"num_workers": 2},
}


def _builtins():
    return [(kind, name) for kind in clipforge.testing.CHECKS for name in components(kind, distribution="clipforge")]


#: Built-ins whose check starts processes or a Ray runtime: tens of seconds each.
_SLOW = {"torchrun", "ray"}


@pytest.mark.parametrize(
    ("kind", "name"), [pytest.param(kind, name, marks=[pytest.mark.slow] if name in _SLOW else []) for kind, name in _builtins()]
)
def test_every_builtin_component_conforms(kind, name):
    inputs = {"features": tiny_features(logit_bias=True)} if name == "siglip" else {}  # SigLIP learns a bias
    if name == "image-caption-selection":  # a true caption and a false one per image
        inputs = {
            "dataset": [
                dataclasses.replace(s, caption=[s.caption, f"not {s.caption}"]) for s in clipforge.testing.tiny_dataset(6)
            ]
        }
    check_component(kind, name, TINY_FIELDS.get(name), **inputs)


def test_the_builtins_cover_every_kind():
    assert {kind for kind, _ in _builtins()} == set(clipforge.testing.CHECKS)


# -- deliberately broken components, registered through the hooks as a plugin would -----------


def _contrastive(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _Loss(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return self.fn(image_features, text_features, logit_scale)


class _UnusedParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.margin = torch.nn.Parameter(torch.tensor(0.1))  # never used: AdamW would never update it

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return _contrastive(image_features, text_features, logit_scale)


def _bundle_with(**changes):
    def factory():
        bundle = tiny_encoder_bundle()
        for key, value in changes.items():
            value(bundle) if callable(value) else setattr(bundle, key, value)
        return bundle

    return factory


class _Dataset:
    def __init__(self, samples, classes=None, length=None):
        self.samples, self.length = samples, length
        if classes is not None:
            self.classes = classes

    def __iter__(self):
        return iter(self.samples)

    def __len__(self):
        return len(self.samples) if self.length is None else self.length


def _png(color="red") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n=3, **overrides):
    return [
        Sample(**{"key": f"s{i}", "image": _png(), "caption": f"a red square number {i}", "label": 0, **overrides})
        for i in range(n)
    ]


class _Evaluator:
    def __init__(self, fn):
        self.fn = fn

    def evaluate(self, bundle, dataset, device):
        return self.fn(bundle)


def _train_a_little(bundle):
    with torch.no_grad():
        bundle.model.logit_scale.add_(1.0)
    return {"acc1": 0.5}


def _step(fn):
    return lambda: fn


class _PixelPeeker:
    """Claims to read sizes only, but looks at a pixel."""

    reads_pixels = False

    def __call__(self, samples):
        return [Verdict.kept() if s.image.getpixel((0, 0)) else Verdict.dropped("black corner") for s in samples]


BROKEN = {
    "losses": {
        "nan-loss": (lambda: _Loss(lambda i, t, s: _contrastive(i, t, s) * float("nan")), "not a finite float"),
        "per-sample-loss": (lambda: _Loss(lambda i, t, s: ((i - t) ** 2).sum(dim=1) * s), "must return a scalar"),
        "detached-loss": (lambda: _Loss(lambda i, t, s: _contrastive(i, t, s).detach()), "detached"),
        "image-detached-loss": (
            lambda: _Loss(lambda i, t, s: _contrastive(i.detach(), t, s)),
            "no gradient reaches image_features",
        ),
        "fixed-temperature-loss": (lambda: _Loss(lambda i, t, s: _contrastive(i, t, 14.0)), "no gradient reaches logit_scale"),
        "unused-parameter-loss": (_UnusedParameter, "no gradient reaches parameter margin"),
        "dict-without-loss": (lambda: _Loss(lambda i, t, s: {"total": _contrastive(i, t, s)}), "without a 'loss' key"),
        "function-loss": (lambda: lambda i, t, s, b=None: _contrastive(i, t, s), "must be a torch.nn.Module"),
        "zero-gradient-loss": (lambda: _Loss(lambda i, t, s: (i.sum() + t.sum() + s) * 0.0), "all zeros"),
    },
    "encoders": {
        "wrong-dim-encoder": (_bundle_with(arch={**TINY_ENCODER_CONFIG, "embed_dim": 64}), "declares embed_dim=64"),
        "extra-layer-encoder": (
            _bundle_with(model=lambda b: b.model.add_module("adapter", torch.nn.Linear(32, 32))),
            "does not survive a save/load round trip",
        ),
        "mislabelled-preprocessing-encoder": (
            _bundle_with(preprocess_cfg=lambda b: b.preprocess_cfg.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))),
            "preprocessed differently",
        ),
        "model-only-encoder": (lambda: tiny_encoder_bundle().model, "must return a clipforge.EncoderBundle"),
        "nan-encoder": (
            _bundle_with(model=lambda b: torch.nn.init.constant_(b.model.text_projection, float("nan"))),
            "text embeddings are not finite",
        ),
    },
    "datasets": {
        "dict-dataset": (lambda: [{"key": "a", "image": _png(), "caption": "a red square"}], "not a clipforge.Sample"),
        "duplicate-key-dataset": (lambda: _samples(2, key="same"), "occurs twice"),
        "undecodable-dataset": (
            lambda: _samples(2, image=b"<html>404</html>"),
            "would be dropped by curation: undecodable image",
        ),
        "one-pass-dataset": (lambda: (s for s in _samples(3)), "second iteration"),
        "label-out-of-range-dataset": (
            lambda: _Dataset(_samples(2, label=5), classes=["red", "blue"]),
            "not an index into its 2 classes",
        ),
        "wrong-length-dataset": (lambda: _Dataset(_samples(3), length=100), "len() is 100 but iterating yields 3"),
        "empty-dataset": (list, "yielded no samples"),
    },
    "evaluators": {
        "nan-evaluator": (lambda: _Evaluator(lambda b: {"acc1": float("nan")}), "not finite"),
        "tensor-evaluator": (lambda: _Evaluator(lambda b: {"acc1": torch.tensor(0.5)}), "not a float"),
        "scalar-evaluator": (lambda: _Evaluator(lambda b: 0.5), "must return a dict"),
        "silent-evaluator": (lambda: _Evaluator(lambda b: {}), "returned no metrics"),
        "training-evaluator": (lambda: _Evaluator(_train_a_little), "changed the model's weights"),
    },
    "curation_steps": {
        "short-step": (_step(lambda samples: [Verdict.kept() for _ in samples][:-1]), "verdicts for 8 samples"),
        "bool-step": (_step(lambda samples: [True for _ in samples]), "not a clipforge.Verdict"),
        "silent-drop-step": (_step(lambda samples: [Verdict(False) for _ in samples]), "without a reason"),
        "nan-score-step": (_step(lambda samples: [Verdict.kept(sharpness=float("nan")) for _ in samples]), "not a finite float"),
        "editing-step": (
            _step(lambda samples: [setattr(s, "caption", "edited") or Verdict.kept() for s in samples]),
            "changed the samples",
        ),
        "padding-step": (_step(lambda samples: [Verdict.kept() for _ in samples] or [Verdict.kept()]), "for an empty batch"),
        "pixel-peeking-step": (_PixelPeeker, "says reads_pixels = False but decoded the pixels"),
    },
}


class BrokenComponents:
    """A plugin registering every broken component above, one registration hook per kind."""

    def _register(self, kind, register):
        for name, (factory, _) in BROKEN[kind].items():
            register(name, factory)

    @clipforge.hookimpl
    def register_losses(self, register):
        self._register("losses", register)

    @clipforge.hookimpl
    def register_encoders(self, register):
        self._register("encoders", register)

    @clipforge.hookimpl
    def register_datasets(self, register):
        self._register("datasets", register)

    @clipforge.hookimpl
    def register_evaluators(self, register):
        self._register("evaluators", register)

    @clipforge.hookimpl
    def register_curation_steps(self, register):
        self._register("curation_steps", register)


@pytest.fixture
def broken(fresh_plugins):
    pm = fresh_plugins()
    pm.add_plugin(BrokenComponents(), "broken")
    return pm


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [(kind, name, message) for kind, entries in BROKEN.items() for name, (_, message) in entries.items()],
)
def test_each_check_fails_on_a_broken_component(broken, kind, name, message):
    assert components(kind, plugin="broken") == sorted(BROKEN[kind])
    with pytest.raises(ConformanceError) as e:
        check_component(kind, name)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{clipforge.core.kinds.KINDS[kind].noun} {name!r}: ")


def test_a_fixed_temperature_loss_passes_when_told_so(clipforge_features):
    loss = BROKEN["losses"]["fixed-temperature-loss"][0]()
    value = check_loss(loss, clipforge_features, temperature_grad=False)
    assert value.dim() == 0 and clipforge_features.image_features.grad is not None


def test_a_loss_with_a_logit_bias_gets_its_gradient_checked():
    from open_clip.loss import SigLipLoss

    class SigLip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SigLipLoss()

        def forward(self, image_features, text_features, logit_scale, logit_bias=None):
            return self.inner(image_features, text_features, logit_scale, logit_bias)

    features = clipforge.testing.tiny_features(logit_bias=True)
    assert torch.isfinite(check_loss(SigLip(), features))
    assert features.logit_bias.grad is not None


def test_the_encoder_round_trip_goes_through_the_store(clipforge_bundle, clipforge_store):
    out = check_encoder(clipforge_bundle, clipforge_store)
    assert out["image"].shape == out["text"].shape == (2, 32)
    assert set(clipforge_store.ls("conformance/encoder")) == {"open_clip_config.json", "open_clip_model.safetensors"}


def test_a_curation_step_sees_single_captions_caption_lists_and_decoded_images():
    seen = []
    check_curation_step(lambda samples: seen.extend(samples) or [Verdict.kept() for _ in samples])
    assert any(isinstance(s.caption, list) for s in seen) and any(
        len(s.caption.split()) == 1 for s in seen if isinstance(s.caption, str)
    )
    assert all(s.image.mode == "RGB" for s in seen)


# -- the pytest plugin ----------------------------------------------------------------------


def test_the_pytest_plugin_is_declared_as_a_pytest11_entry_point():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["pytest11"] == {"clipforge": "clipforge.testing.plugin"}


def test_the_pytest_plugin_fixtures_work_in_a_plugin_authors_test_session(tmp_path):
    (tmp_path / "test_author.py").write_text(
        textwrap.dedent("""
        import pytest
        from clipforge.testing import check_curation_step, check_loss, check_dataset

        def test_fixtures(clipforge_features, clipforge_samples, clipforge_dataset, clipforge_store, clipforge_bundle):
            assert clipforge_features.image_features.requires_grad
            assert len(check_curation_step(lambda s: [__import__("clipforge").Verdict.kept() for _ in s], clipforge_samples)) == 8
            assert len(check_dataset(clipforge_dataset)) == 16
            assert clipforge_store.ls() == []
            assert clipforge_bundle.model.encode_text(clipforge_bundle.tokenizer(["x"])).shape == (1, 32)

        def test_a_failed_check_is_a_test_failure(clipforge_features):
            check_loss(lambda *a: 0.0, clipforge_features)
    """)
    )
    # Autoload off and the plugin by name: the same session whether or not clipforge is installed.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "clipforge.testing.plugin", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "ConformanceError: loss: must be a torch.nn.Module" in proc.stdout


def test_the_kit_holds_a_step_that_decides_in_partitions_to_its_one_decision():
    from clipforge.plugins.curation.duplicates import ExactDuplicates

    class Forgetful(ExactDuplicates):
        """Forgets the links of every partition but the first: copies across partitions all survive."""

        def settle(self, plan, links, name):
            return super().settle(plan, links[:1], name)

    check_curation_step(ExactDuplicates(), _copies())
    with pytest.raises(ConformanceError, match="in 2 partitions, it gave other verdicts"):
        check_curation_step(Forgetful(), _copies())


def _copies() -> list[Sample]:
    """Samples whose images repeat: groups for a deduplication to find, across any split."""
    from PIL import Image

    return [Sample(f"k{i}", Image.new("RGB", (8, 8), (i % 3 * 80, 0, 0)), f"caption {i}") for i in range(12)]
