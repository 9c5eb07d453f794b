"""Every component of this plugin passes clipforge's conformance check of its kind.

The components are taken from clipforge's catalog, as a recipe would get them: this also
checks that the plugin is installed, found through its entry point, and registers them.
"""

from __future__ import annotations

import pytest

from clipforge.testing import check_component, check_curation_step, check_dataset, check_evaluator, check_loss, components

DISTRIBUTION = "clipforge-plugin-example"
EXPECTED = {
    "losses": ["example-dcl"],
    "datasets": ["example-digits"],
    "evaluators": ["example-pair-cosine"],
    "curation_steps": ["example-contrast"],
}
#: Recipe fields for each component that needs some to be small.
FIELDS = {"example-digits": {"split": "test"}}


def test_the_plugin_registers_its_components_through_its_entry_point():
    for kind, names in EXPECTED.items():
        assert components(kind, distribution=DISTRIBUTION) == names
    assert components("encoders", distribution=DISTRIBUTION) == []


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, names in EXPECTED.items() for n in names])
def test_component_conforms(kind, name):
    check_component(kind, name, FIELDS.get(name))


def test_weighted_dcl_conforms(clipforge_features):
    from clipforge_example import create_dcl

    check_loss(create_dcl(weighted=True), clipforge_features)


def test_the_evaluator_conforms_on_the_plugins_own_dataset(clipforge_bundle):
    from clipforge_example import Digits, PairCosine

    metrics = check_evaluator(PairCosine(batch_size=64), clipforge_bundle, Digits(split="test"))
    assert set(metrics) == {"positive_cosine", "negative_cosine", "cosine_gap"}


def test_the_contrast_filter_conforms_on_blank_scans():
    from clipforge_example import ContrastFilter, Digits

    samples = check_dataset(Digits(split="test", blank=0.5), limit=40)
    verdicts = check_curation_step(ContrastFilter(), samples)
    assert any(not v.keep for v in verdicts) and any(v.keep for v in verdicts)
