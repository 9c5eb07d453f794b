"""An example clipforge plugin: every component is added through a registration hook, nothing else.

Component names carry the ``example-`` prefix so that they never clash with clipforge's own.
No module imported here imports torch or scikit-learn at import time: ``clipforge plugins``
and ``clipforge validate`` load every installed plugin and must stay fast.
"""

from __future__ import annotations

import clipforge
from clipforge_example.curation import ContrastFilter
from clipforge_example.digits import Digits
from clipforge_example.evaluators import PairCosine
from clipforge_example.params import ContrastParams, DclParams, DigitsParams, PairCosineParams

__version__ = "0.1.0"


def create_dcl(weighted: bool = False, sigma: float = 0.5):
    """Decoupled contrastive loss (DCL, or DCLW when weighted): the positive pair leaves the denominator."""
    from clipforge_example.losses import DecoupledContrastiveLoss  # torch, on first use only

    return DecoupledContrastiveLoss(weighted=weighted, sigma=sigma)


@clipforge.hookimpl
def register_losses(register):
    register("example-dcl", create_dcl, params=DclParams)


@clipforge.hookimpl
def register_evaluators(register):
    register("example-pair-cosine", PairCosine, params=PairCosineParams)


@clipforge.hookimpl
def register_datasets(register):
    register("example-digits", Digits, params=DigitsParams)


@clipforge.hookimpl
def register_curation_steps(register):
    register("example-contrast", ContrastFilter, params=ContrastParams)
