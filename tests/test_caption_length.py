"""The caption-length curation step: its verdicts, bad captions, and its params through the catalog."""

from __future__ import annotations

import pytest

import clipforge
from clipforge import Sample, Verdict
from clipforge.plugins.curation.caption_length import CaptionLength


def _samples(*captions):
    return [Sample(key=str(i), image=None, caption=c) for i, c in enumerate(captions)]


def test_one_verdict_per_sample_in_order():
    step = CaptionLength(min_words=2)
    verdicts = step(_samples("a red circle", "circle", "two words"))
    assert [v.keep for v in verdicts] == [True, False, True]
    assert verdicts[0] == Verdict.kept(words=3.0, chars=12.0)
    assert verdicts[1] == Verdict.dropped("too few words (1 < 2)", words=1.0, chars=6.0)
    assert step([]) == []


@pytest.mark.parametrize(
    "params, caption, reason",
    [
        ({"min_words": 2}, "circle", "too few words (1 < 2)"),
        ({"max_words": 3}, "a large red circle", "too many words (4 > 3)"),
        ({"min_chars": 10}, "  a circle  ", "too short (8 < 10 chars)"),
        ({"max_chars": 5}, "a red circle", "too long (12 > 5 chars)"),
        ({"min_words": 0}, "   \n\t ", "empty caption"),
        ({"min_words": 0}, "", "empty caption"),
        ({}, None, "missing caption"),
        ({}, [], "missing caption (empty list)"),
        ({}, 42, "caption is not text (int)"),
        ({}, b"a red circle", "caption is not text (bytes)"),
    ],
)
def test_drop_reasons(params, caption, reason):
    (verdict,) = CaptionLength(**params)(_samples(caption))
    assert not verdict.keep and verdict.reason == reason


def test_bounds_are_inclusive():
    step = CaptionLength(min_words=2, max_words=3, min_chars=5, max_chars=12)
    assert [v.keep for v in step(_samples("a red", "a red circle", "abcd", "a red circles"))] == [
        True,
        True,
        False,
        False,
    ]


def test_a_list_of_captions_is_kept_if_any_passes():
    step = CaptionLength(min_words=3)
    kept, dropped, mixed = step(_samples(["circle", "a red circle"], ["circle", "red circle"], [None, 7, "a red star"]))
    assert kept == Verdict.kept(words=3.0, chars=12.0)
    assert dropped == Verdict.dropped("too few words (1 < 3)", words=1.0, chars=6.0)
    assert mixed.keep


def test_an_object_without_a_caption_is_dropped_not_raised():
    (verdict,) = CaptionLength()([object()])
    assert verdict.reason == "missing caption"


def test_synthetic_captions_pass_the_default_recipe_filter():
    catalog = clipforge.get_plugin_manager().catalog
    step = catalog.create("curation_steps", {"type": "caption-length", "min_words": 2})
    samples = list(catalog.create("datasets", {"type": "synthetic-shapes", "size": 50}))
    assert all(v.keep for v in step(samples))
    assert isinstance(step, clipforge.CurationStep)


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"min_words": -1}, "min_words"),
        ({"min_words": 5, "max_words": 3}, "max_words"),
        ({"min_chars": 10, "max_chars": 2}, "max_chars"),
        ({"max_words": "many"}, "max_words"),
        ({"min_length": 2}, "min_length"),
    ],
)
def test_bad_params_name_the_field(fields, path):
    component = clipforge.get_plugin_manager().catalog.get("curation_steps", "caption-length")
    _, errors = component.check(fields)
    assert path in [p for p, _ in errors]
    with pytest.raises(clipforge.RecipeError):
        component.create(fields)


def test_min_above_max_message_is_clear():
    component = clipforge.get_plugin_manager().catalog.get("curation_steps", "caption-length")
    _, errors = component.check({"min_words": 5, "max_words": 3})
    assert any("max_words (3) must be >= min_words (5)" in msg for _, msg in errors)


def test_defaults_keep_any_non_empty_caption():
    component = clipforge.get_plugin_manager().catalog.get("curation_steps", "caption-length")
    kwargs, errors = component.check({})
    assert not errors
    assert all(v.keep for v in component.create({})(_samples("x", "a red circle")))
    assert kwargs == {"min_words": 1, "max_words": None, "min_chars": 0, "max_chars": None}
