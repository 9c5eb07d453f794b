"""The synthetic-shapes dataset: deterministic, labelled consistently with its captions, reachable by recipe."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

import clipforge
from clipforge.plugins.datasets.synthetic_shapes import COLORS, SHAPES, SyntheticShapes


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_samples_in_any_order():
    a = list(SyntheticShapes(40, seed=7))
    b = SyntheticShapes(40, seed=7)
    for i in reversed(range(40)):  # random access in another order gives the same sample
        s = b[i]
        assert (s.key, s.caption, s.label, s.meta) == (a[i].key, a[i].caption, a[i].label, a[i].meta)
        assert s.image.tobytes() == a[i].image.tobytes()


def test_a_longer_dataset_starts_with_the_shorter_one():
    short, long = list(SyntheticShapes(5, seed=1)), list(SyntheticShapes(50, seed=1))
    assert [_png(s.image) for s in short] == [_png(s.image) for s in long[:5]]


def test_different_seeds_differ():
    a, b = list(SyntheticShapes(20, seed=0)), list(SyntheticShapes(20, seed=1))
    assert [s.caption for s in a] != [s.caption for s in b]
    assert sum(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b)) == 0
    assert not {s.key for s in a} & {s.key for s in b}


def test_size_keys_and_bounds():
    ds = SyntheticShapes(13, seed=2)
    samples = list(ds)
    assert len(ds) == len(samples) == 13
    assert [s.key for s in samples] == [f"shapes-2-{i:07d}" for i in range(13)]
    with pytest.raises(IndexError):
        ds[13]


@pytest.mark.parametrize("image_size", [16, 64, 97])
def test_images_are_rgb_of_the_requested_size(image_size):
    for s in SyntheticShapes(10, seed=3, image_size=image_size):
        assert isinstance(s.image, Image.Image)
        assert s.image.mode == "RGB" and s.image.size == (image_size, image_size)
        assert len(s.image.getcolors(maxcolors=image_size**2)) > 1  # not a blank canvas


def test_classes_cover_every_colour_and_shape():
    ds = SyntheticShapes(1)
    assert ds.classes == [f"{c} {s}" for c in COLORS for s in SHAPES]
    assert len(set(ds.classes)) == len(COLORS) * len(SHAPES) == 30
    assert ds.templates and all("{c}" in t for t in ds.templates)


def test_labels_match_the_first_shape_named_in_the_caption():
    ds = SyntheticShapes(300, seed=4)
    labels = set()
    for s in ds:
        color, shape = ds.classes[s.label].split()
        main = s.meta["shapes"][0]
        assert (main["color"], main["shape"]) == (color, shape)
        # the main shape is named first: its colour and kind come before any other
        words = s.caption.replace(",", "").split()
        first_color = next(w for w in words if w in COLORS)
        first_shape = next(w for w in words if w in SHAPES)
        assert (first_color, first_shape) == (color, shape), s.caption
        labels.add(s.label)
    assert len(labels) > 20  # the classes are all used, roughly evenly


def test_second_shape_is_smaller_distinct_and_in_the_named_relation():
    seen = 0
    for s in SyntheticShapes(200, seed=5):
        shapes = s.meta["shapes"]
        if len(shapes) == 1:
            assert s.meta["relation"] is None
            continue
        seen += 1
        main, other = shapes
        assert main["color"] != other["color"] and main["shape"] != other["shape"]
        assert main["radius"] > other["radius"] and (main["size"], other["size"]) == ("large", "small")
        assert other["color"] in s.caption and other["shape"] in s.caption
        dx, dy = main["x"] - other["x"], main["y"] - other["y"]
        expected = {"above": dy < 0, "below": dy > 0, "to the left of": dx < 0, "to the right of": dx > 0}
        assert expected[s.meta["relation"]]
        assert max(abs(dx), abs(dy)) == (abs(dy) if s.meta["relation"] in ("above", "below") else abs(dx))
    assert 50 < seen < 150


def test_shapes_stay_inside_the_image():
    for s in SyntheticShapes(200, seed=6, image_size=32):
        for sh in s.meta["shapes"]:
            assert sh["radius"] - 0.01 <= sh["x"] <= 32 - sh["radius"] + 0.01
            assert sh["radius"] - 0.01 <= sh["y"] <= 32 - sh["radius"] + 0.01


def test_main_shape_colour_dominates_its_pixels():
    s = SyntheticShapes(1, seed=0, max_shapes=1)[0]
    main = s.meta["shapes"][0]
    r, g, b = s.image.getpixel((round(main["x"]), round(main["y"])))
    target = COLORS[main["color"]]
    assert max(abs(r - target[0]), abs(g - target[1]), abs(b - target[2])) <= 12


def test_max_shapes_one_draws_one_shape():
    assert all(len(s.meta["shapes"]) == 1 for s in SyntheticShapes(50, seed=0, max_shapes=1))


def test_captions_vary_and_meta_is_json():
    samples = list(SyntheticShapes(100, seed=8))
    assert len({s.caption for s in samples}) > 80
    prefixes = {" ".join(s.caption.split()[:2]) for s in samples}
    assert len(prefixes) > 5  # several phrasings, not one template
    assert any(" and " in s.caption or " of " in s.caption for s in samples)
    json.dumps([s.meta for s in samples])


def test_several_captions_per_image_are_distinct_phrasings():
    for s in SyntheticShapes(30, seed=9, captions_per_image=4):
        assert isinstance(s.caption, list) and len(s.caption) == 4 == len(set(s.caption))
        color, shape = SyntheticShapes(1).classes[s.label].split()
        assert all(color in c and shape in c for c in s.caption)


def test_articles_are_grammatical():
    captions = [c for s in SyntheticShapes(200, seed=10, captions_per_image=3) for c in s.caption]
    assert any("an orange" in c for c in captions)
    assert not any("a orange" in c or "an red" in c for c in captions)


def test_created_through_the_catalog():
    catalog = clipforge.get_plugin_manager().catalog
    ds = catalog.create("datasets", {"type": "synthetic-shapes", "size": 10})
    assert isinstance(ds, clipforge.ClassificationDataset)
    samples = list(ds)
    assert len(samples) == 10 and all(isinstance(s, clipforge.Sample) for s in samples)


@pytest.mark.parametrize(
    "fields, path",
    [
        ({"size": 0}, "size"),
        ({}, "size"),
        ({"size": 5, "image_size": 8}, "image_size"),
        ({"size": 5, "max_shapes": 3}, "max_shapes"),
        ({"size": 5, "captions_per_image": 0}, "captions_per_image"),
        ({"size": 5, "colour": "red"}, "colour"),
    ],
)
def test_bad_params_name_the_field(fields, path):
    component = clipforge.get_plugin_manager().catalog.get("datasets", "synthetic-shapes")
    _, errors = component.check(fields)
    assert path in [p for p, _ in errors]
    with pytest.raises(clipforge.RecipeError):
        component.create(fields)


def test_defects_spoil_a_seeded_fraction_and_leave_the_rest_unchanged():
    clean = SyntheticShapes(size=400, seed=3, image_size=32)
    spoiled = SyntheticShapes(size=400, seed=3, image_size=32, defects=0.1)
    defective = [s for s in spoiled if "defect" in s.meta]
    assert 20 <= len(defective) <= 60
    assert {s.meta["defect"] for s in defective} == {"truncated image", "not an image", "empty caption", "one-word caption"}
    for a, b in zip(clean, spoiled):
        if "defect" not in b.meta:
            assert a.caption == b.caption and a.image.tobytes() == b.image.tobytes()
    assert [s.key for s in SyntheticShapes(size=400, seed=3, image_size=32, defects=0.1) if "defect" in s.meta] == [
        s.key for s in defective
    ]
