"""Curation steps embed as the evaluators do: in eval mode, pixels in the weights' dtype, the model's mode restored."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import clipforge
from clipforge.plugins.curation.embedding import model_embeddings
from tests.conftest import TINY_CONFIG


def _bundle() -> clipforge.EncoderBundle:
    return clipforge.get_plugin_manager().catalog.create("encoders", {"type": "open-clip", "config": TINY_CONFIG})


def _samples() -> list[clipforge.Sample]:
    colours = ["red", "blue", "green"]
    return [clipforge.Sample(str(i), Image.new("RGB", (32, 32), c), [f"a {c} square", "x"]) for i, c in enumerate(colours)]


def test_curation_embeddings_are_the_evaluators_embeddings():
    bundle, samples = _bundle(), _samples()
    images, texts = model_embeddings(bundle, samples)
    expected_images, _ = clipforge.embed_images(bundle, samples, "cpu", 2)
    expected_texts = clipforge.embed_texts(bundle, [s.captions[0] for s in samples], "cpu", 2)
    np.testing.assert_allclose(images, expected_images.numpy(), atol=1e-6)
    np.testing.assert_allclose(texts, expected_texts.numpy(), atol=1e-6)
    assert images.dtype == texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)


def test_a_training_mode_bf16_model_embeds_in_eval_mode_and_keeps_its_mode():
    bundle = _bundle()
    bundle.model.to(torch.bfloat16).train()
    images, texts = model_embeddings(bundle, _samples())
    assert bundle.model.training
    assert images.shape == texts.shape == (3, TINY_CONFIG["embed_dim"]) and np.isfinite(images).all()
    assert model_embeddings(bundle, [])[0].shape == (0, 0)
