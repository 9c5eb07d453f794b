"""A conformance kit for plugin authors: tiny inputs and one check per component kind.

Use the checks as plain functions, or through the pytest plugin this package registers
(entry point ``pytest11``), whose fixtures hand out the tiny inputs::

    from clipforge.testing import check_component, components

    @pytest.mark.parametrize("name", components("losses", distribution="my-clipforge-plugin"))
    def test_my_losses(name):
        check_component("losses", name)

Each check raises :class:`ConformanceError` (an ``AssertionError``) naming what is wrong, and
returns what it computed (the loss, the embeddings, the samples, the metrics, the verdicts).
"""

from clipforge.testing.checks import (
    CHECKS,
    ConformanceError,
    check_adapter,
    check_component,
    check_curation_step,
    check_dataset,
    check_encoder,
    check_evaluator,
    check_launcher,
    check_loss,
    components,
)
from clipforge.testing.inputs import (
    TINY_ENCODER_CONFIG,
    Features,
    tiny_dataset,
    tiny_encoder_bundle,
    tiny_features,
    tiny_samples,
)

__all__ = [
    "CHECKS",
    "TINY_ENCODER_CONFIG",
    "ConformanceError",
    "Features",
    "check_adapter",
    "check_component",
    "check_curation_step",
    "check_dataset",
    "check_encoder",
    "check_evaluator",
    "check_launcher",
    "check_loss",
    "components",
    "tiny_dataset",
    "tiny_encoder_bundle",
    "tiny_features",
    "tiny_samples",
]
