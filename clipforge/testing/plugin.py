"""The pytest plugin of :mod:`clipforge.testing` (entry point ``pytest11``): fixtures of tiny inputs.

Loaded in every pytest session of an environment where clipforge is installed, so it imports
nothing heavy until a fixture is used; ``-p no:clipforge`` turns it off.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def clipforge_bundle():
    """A tiny randomly initialised open_clip :class:`~clipforge.EncoderBundle` (32-d embeddings, 32 px images)."""
    from clipforge.testing import tiny_encoder_bundle

    return tiny_encoder_bundle()


@pytest.fixture
def clipforge_features():
    """A batch of 8 image and text features, the temperature, no bias: what a loss is called with."""
    from clipforge.testing import tiny_features

    return tiny_features()


@pytest.fixture
def clipforge_samples():
    """8 samples as curation steps get them: decoded RGB images, captions (one single-word, one a list), labels."""
    from clipforge.testing import tiny_samples

    return tiny_samples()


@pytest.fixture
def clipforge_dataset():
    """A 16-sample classification dataset with captions, ``classes`` and ``templates``: what evaluators get."""
    from clipforge.testing import tiny_dataset

    return tiny_dataset()


@pytest.fixture
def clipforge_store(tmp_path):
    """A :class:`~clipforge.Store` on a fresh folder of this test."""
    from clipforge.core.storage import Store

    return Store(str(tmp_path / "clipforge-store"))
