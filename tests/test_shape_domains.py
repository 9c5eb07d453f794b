"""Domains of the built-in data: synthetic-shapes' colours, shapes and styles, and the digits splits."""

from __future__ import annotations

import hashlib
import json
from itertools import chain

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipforge
from clipforge.plugins.datasets.digits import SPLITS, Digits
from clipforge.plugins.datasets.synthetic_shapes import (
    ALL_COLORS,
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    FILLS,
    SHAPES,
    TEXTURES,
    SyntheticShapes,
)
from clipforge.testing import check_dataset

# -- the default domain is what it always was -------------------------------------------------


def _digest(ds: SyntheticShapes, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        s = ds[i]
        image = s.image
        raw = image.tobytes() + repr((image.mode, image.size)).encode() if isinstance(image, Image.Image) else bytes(image)
        h.update(json.dumps([s.key, s.caption, s.label, s.meta], sort_keys=True).encode())
        h.update(raw)
    return h.hexdigest()


# Hashes of the samples (key, caption, label, meta, pixels) drawn before the dataset had domains:
# the demo's training and evaluation data, the default image size, and the other options.
@pytest.mark.parametrize(
    "fields, indices, expected",
    [
        (
            {"size": 10000, "seed": 0, "image_size": 32, "defects": 0.02},
            [*range(200), *range(9900, 10000)],
            "e63fd971087d149ed0ba353250193210a1e2bcf731ce771fbea5b74d1d420ca8",
        ),
        (
            {"size": 600, "seed": 1, "image_size": 32},
            range(300),
            "399a9801d6b00efde346dcb5b4c1a59a2d52f9e2d918d8d2eba5bb17e442df2c",
        ),
        ({"size": 300, "seed": 7}, range(300), "7949f3b252999c381a44e1175542da22bd96ea93363125981d29ca428754dc9a"),
        (
            {"size": 300, "seed": 3, "image_size": 48, "max_shapes": 1, "captions_per_image": 3, "offset": 500},
            range(300),
            "1d79649a2a89f6bd800d0ee9ca37d65a8dde10ea8e802f98975e3985a8261663",
        ),
    ],
)
def test_the_default_domain_draws_byte_for_byte_what_it_drew_before(fields, indices, expected):
    assert _digest(SyntheticShapes(**fields), indices) == expected
    # naming the defaults is the same dataset
    explicit = {**fields, "colors": list(COLORS), "shapes": list(SHAPES), "fill": "filled", "background": "plain"}
    assert _digest(SyntheticShapes(**explicit, scale=(1.0, 1.0), rotation=15, stroke=0.6), indices) == expected


# -- any domain -------------------------------------------------------------------------------

domains = st.fixed_dictionaries(
    {
        "colors": st.lists(st.sampled_from(list(ALL_COLORS)), min_size=1, max_size=5, unique=True),
        "shapes": st.lists(st.sampled_from(ALL_SHAPES), min_size=1, max_size=4, unique=True),
        "fill": st.sampled_from(FILLS),
        "background": st.sampled_from(list(BACKGROUNDS)),
        "scale": st.lists(st.floats(0.25, 1.0), min_size=2, max_size=2).map(lambda v: (min(v), max(v))),
        "rotation": st.floats(0, 180),
        "stroke": st.floats(0.05, 1.0),
        "max_shapes": st.sampled_from([1, 2]),
        "seed": st.integers(0, 2**31),
        "image_size": st.sampled_from([16, 32, 48]),
    }
)


def _words(caption: str, vocabulary) -> list[str]:
    return [w for w in caption.split() if w in vocabulary]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(domain=domains)
def test_every_sample_is_of_the_domain_asked_for(domain):
    ds = SyntheticShapes(size=12, **domain)
    colors, shapes = domain["colors"], domain["shapes"]
    assert ds.classes == [f"{c} {s}" for c in colors for s in shapes]
    samples = check_dataset(ds, name="synthetic-shapes")  # labels index classes, templates hold {c}, parts agree
    outline = domain["fill"] == "outline"
    bg, tone = BACKGROUNDS[domain["background"]]
    assert all(t.endswith(f" outline on a {bg} background.") == outline for t in ds.templates if "background" in t)
    for s in samples:
        main, *others = s.meta["shapes"]
        assert ds.classes[s.label] == f"{main['color']} {main['shape']}"
        assert {sh["color"] for sh in s.meta["shapes"]} <= set(colors)
        assert {sh["shape"] for sh in s.meta["shapes"]} <= set(shapes)
        if others:  # the second shape differs in colour and in kind wherever the domain allows it
            assert (others[0]["color"] != main["color"]) == (len(colors) > 1)
            assert (others[0]["shape"] != main["shape"]) == (len(shapes) > 1)
            assert others[0]["radius"] < main["radius"]
        for sh in s.meta["shapes"]:  # inside the image, at the asked scale of the full size
            assert sh["radius"] - 0.01 <= min(sh["x"], sh["y"]) and max(sh["x"], sh["y"]) <= ds.image_size - sh["radius"] + 0.01
            assert sh["radius"] <= 0.38 * domain["scale"][1] * ds.image_size + 0.01
        # the caption names the main shape first, says "outline" after every shape when outlined,
        # and names the background with the domain's words
        assert _words(s.caption, ALL_COLORS)[0] == main["color"] and _words(s.caption, ALL_SHAPES)[0] == main["shape"]
        assert s.caption.count(" outline") == (len(s.meta["shapes"]) if outline else 0)
        if "background" in s.caption:
            assert f"on a {bg} background" in s.caption or f"on a {tone} background" in s.caption
        assert s.meta["style"]["fill"] == domain["fill"] and s.meta["style"]["background"] == domain["background"]
        assert (s.meta["style"]["texture"] in TEXTURES) == (domain["background"] == "textured")
        assert s.key.startswith(f"shapes-{ds.domain_id}-{domain['seed']}-")
    # the same domain and seed draw the same bytes, in any order
    again = SyntheticShapes(size=12, **domain)
    for i in reversed(range(12)):
        assert again[i].image.tobytes() == samples[i].image.tobytes() and again[i].caption == samples[i].caption


@settings(max_examples=25, deadline=None)
@given(domain=domains, part_size=st.integers(1, 7), offset=st.integers(0, 50))
def test_parts_of_any_domain_are_the_dataset_in_order(domain, part_size, offset):
    ds = SyntheticShapes(size=11, offset=offset, **domain)
    catalog = clipforge.get_plugin_manager().catalog
    parts = [catalog.create("datasets", entry) for entry in ds.parts(part_size=part_size)]
    assert [(s.key, s.caption, s.image.tobytes()) for s in chain.from_iterable(parts)] == [
        (s.key, s.caption, s.image.tobytes()) for s in ds
    ]
    json.dumps(ds.parts(part_size=part_size))  # entries travel as task parameters


@settings(max_examples=30, deadline=None)
@given(domain=domains.filter(lambda d: d["image_size"] == 48))
def test_the_drawn_colours_are_the_chosen_ones(domain):
    """A filled shape's centre is its colour; an outlined circle's ring is, and its centre is not."""
    ds = SyntheticShapes(size=16, **domain)
    checked = 0
    for s in ds:
        for sh in s.meta["shapes"]:
            target = np.array(ALL_COLORS[sh["color"]])
            x, y, r = sh["x"], sh["y"], sh["radius"]
            if r < 6:  # too small for one pixel to lie whole inside a star's or a cross's arm
                continue
            centre = np.array(s.image.getpixel((int(x), int(y))))
            if domain["fill"] == "filled":
                assert np.abs(centre - target).max() <= 12, (sh, centre)
                checked += 1
            elif sh["shape"] == "circle" and 0.3 <= domain["stroke"] <= 0.6:
                ring = np.array(s.image.getpixel((int(x + r * (1 - domain["stroke"] / 2)), int(y))))
                assert np.abs(ring - target).max() <= 12, (sh, ring)
                assert np.abs(centre - target).max() > 30, (sh, centre)
                checked += 1
    assert checked or domain["fill"] == "outline" or all(sh["radius"] < 6 for s in ds for sh in s.meta["shapes"])


def test_backgrounds_are_plain_light_dark_or_textured():
    def corners(image: Image.Image) -> np.ndarray:
        a = np.asarray(image, dtype=int)
        return np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])  # shapes never reach a corner

    for background, light in (("plain", True), ("dark", False), ("textured", True)):
        ds = SyntheticShapes(size=60, seed=4, image_size=32, background=background)
        spreads = []
        for s in ds:
            c = corners(s.image)
            assert (c.min() >= 160) == light and (c.max() <= 90) == (not light), (background, c)
            spreads.append(float(np.ptp(c.mean(1))))
        if background == "textured":  # the pattern shows: the corners' shades differ in most images
            assert np.mean([d > 8 for d in spreads]) > 0.5
            assert {s.meta["style"]["texture"] for s in ds} == set(TEXTURES)
        else:
            assert max(spreads) <= 1  # one flat tone


def test_outlines_leave_the_inside_of_a_shape_to_the_background():
    filled = SyntheticShapes(size=200, seed=5, image_size=32)
    outlined = SyntheticShapes(size=200, seed=5, image_size=32, fill="outline")
    bright = np.mean([np.asarray(s.image).mean() for s in outlined]) - np.mean([np.asarray(s.image).mean() for s in filled])
    assert bright > 5  # less ink on the same light backgrounds
    thick = SyntheticShapes(size=200, seed=5, image_size=32, fill="outline", stroke=0.5)
    assert np.mean([np.asarray(s.image).mean() for s in thick]) < np.mean([np.asarray(s.image).mean() for s in outlined])


def test_rotation_zero_keeps_squares_upright_and_a_large_one_turns_them():
    def tilt(s) -> float:
        """How far from axis-aligned the square's pixels are: 0 for an upright square."""
        sh = s.meta["shapes"][0]
        a = np.asarray(s.image, dtype=int)
        ink = np.abs(a - np.array(ALL_COLORS[sh["color"]])).max(-1) <= 40
        ys, xs = np.nonzero(ink)
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        return 1 - ink.sum() / box  # an upright square fills its bounding box; a turned one does not

    common = {"size": 40, "seed": 6, "image_size": 64, "shapes": ["square"], "max_shapes": 1}
    upright = [tilt(s) for s in SyntheticShapes(**common, rotation=0)]
    turned = [tilt(s) for s in SyntheticShapes(**common, rotation=45)]
    assert max(upright) < 0.15 and np.mean(turned) > np.mean(upright) + 0.1


def test_scale_shrinks_the_shapes():
    full = [s.meta["shapes"][0]["radius"] for s in SyntheticShapes(size=200, seed=7, image_size=32)]
    half = [s.meta["shapes"][0]["radius"] for s in SyntheticShapes(size=200, seed=7, image_size=32, scale=(0.5, 0.5))]
    assert np.mean(half) == pytest.approx(np.mean(full) / 2, rel=0.15)


def test_domains_have_their_own_keys_and_streams():
    a = SyntheticShapes(size=50, seed=0, colors=["red", "green", "blue"], shapes=["circle", "square"])
    b = SyntheticShapes(size=50, seed=0, colors=["red", "green", "blue"], shapes=["circle", "square"], fill="outline")
    default = SyntheticShapes(size=50, seed=0)
    assert default.domain_id == "" and a.domain_id and b.domain_id and a.domain_id != b.domain_id
    keys = [{s.key for s in ds} for ds in (a, b, default)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    # not the same layouts in another style: a mix of domains holds no twins
    assert sum(x.meta["shapes"] == y.meta["shapes"] for x, y in zip(a, b)) < 5
    # the line's width changes nothing of filled shapes, so it is not part of their domain
    assert SyntheticShapes(size=1, colors=["red"], stroke=0.9).domain_id == SyntheticShapes(size=1, colors=["red"]).domain_id


def _style_features(images) -> np.ndarray:
    """Per image: each channel's mean and spread, and how much neighbouring pixels differ."""
    rows = []
    for image in images:
        a = np.asarray(image.convert("RGB").resize((32, 32)), dtype=float) / 255
        edges = np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()
        rows.append([*a.mean((0, 1)), *a.std((0, 1)), edges])
    return np.array(rows)


def test_a_sequence_of_domains_is_told_apart_by_simple_pixel_statistics():
    """The domains a continual benchmark steps through differ measurably: a linear classifier of
    seven numbers per image (colour means and spreads, edge density) names each image's domain."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sequence = [
        {"colors": ["red", "green", "blue"], "shapes": ["circle", "square"]},
        {"colors": ["yellow", "purple", "orange"], "shapes": ["triangle", "star", "cross"], "fill": "outline", "background": "textured"},
        {"colors": ["pink", "cyan", "brown"], "shapes": ["hexagon", "heart"], "background": "dark", "rotation": 180, "scale": (0.6, 1.0)},
    ]  # fmt: skip

    def domain_images(seed: int, n: int):
        shapes = [[s.image for s in SyntheticShapes(size=n, seed=seed, image_size=32, **d)] for d in sequence]
        return [*shapes, [s.image for s in Digits(size=n, seed=seed, split="train" if seed == 0 else "test")]]

    train, test = domain_images(0, 150), domain_images(1, 100)
    fit = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    fit.fit(np.concatenate([_style_features(x) for x in train]), np.repeat(np.arange(len(train)), [len(x) for x in train]))
    for domain, images in enumerate(test):
        accuracy = (fit.predict(_style_features(images)) == domain).mean()
        assert accuracy >= 0.95, (domain, accuracy)


# -- bad domains --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, path, words",
    [
        ({"colors": ["red", "magenta"]}, "colors", ["'magenta'", "red, green, blue", "brown"]),
        ({"colors": []}, "colors", ["at least one colour", "pink"]),
        ({"colors": ["red", "blue", "red"]}, "colors", ["'red'", "more than once"]),
        ({"shapes": ["circle", "oval"]}, "shapes", ["'oval'", "circle, square", "heart"]),
        ({"shapes": []}, "shapes", ["at least one shape", "hexagon"]),
        ({"shapes": ["star", "star"]}, "shapes", ["'star'", "more than once"]),
        ({"fill": "hatched"}, "fill", ["'filled'", "'outline'"]),
        ({"background": "sky"}, "background", ["'plain'", "'textured'", "'dark'"]),
        ({"scale": [0.8, 0.4]}, "scale", ["[0.8, 0.4]", "low <= high"]),
        ({"scale": [0.1, 0.5]}, "scale", ["0.25"]),
        ({"rotation": 200}, "rotation", ["180"]),
        ({"stroke": 0}, "stroke", ["0.05"]),
    ],
)
def test_a_bad_domain_names_the_field_the_value_and_what_is_available(fields, path, words):
    component = clipforge.get_plugin_manager().catalog.get("datasets", "synthetic-shapes")
    _, errors = component.check({"size": 5, **fields})
    messages = [m for p, m in errors if p == path or p.startswith(f"{path}.")]
    assert messages, errors
    assert all(any(w in m for m in messages) for w in words), messages
    with pytest.raises(clipforge.RecipeError):
        component.create({"size": 5, **fields})
    with pytest.raises(ValueError, match=path):  # built in Python, the same checks
        SyntheticShapes(size=5, **fields)


# -- digits ------------------------------------------------------------------------------------


def test_digit_splits_are_disjoint_and_cover_the_scans():
    train, test = set(SPLITS["train"]), set(SPLITS["test"])
    assert not train & test and train | test == set(SPLITS["all"]) == set(range(1797))
    assert len(test) == 360
    train_keys = {s.key for s in Digits(split="train")}
    test_ds = Digits(split="test")
    assert len(train_keys) == 1437 and not train_keys & {s.key for s in test_ds}
    assert {s.label for s in test_ds} == set(range(10))  # every digit is in the held-out scans
    subset = Digits(split="test", size=40, seed=3)
    assert {s.key for s in subset} <= {s.key for s in test_ds} and len(subset) == 40
    assert [s.key for s in Digits(size=30, seed=2)] == [s.key for s in Digits(size=30, seed=2, split="all")]


def test_a_digit_subset_larger_than_its_split_is_refused_at_size():
    component = clipforge.get_plugin_manager().catalog.get("datasets", "digits")
    _, errors = component.check({"split": "test", "size": 400})
    assert [p for p, _ in errors] == ["size"] and "360" in errors[0][1] and "'test'" in errors[0][1]
    assert component.check({"split": "train", "size": 400})[1] == []


def test_digits_train_a_model_and_evaluate_it_as_a_domain_of_their_own(tmp_path):
    """Curated as training data (captions and all), trained on, and evaluated on their held-out split."""
    from clipforge.core.storage import Store
    from clipforge.core.validation import load_recipe
    from clipforge.engine.curation import curate, curation_key
    from clipforge.engine.evaluation import evaluate
    from clipforge.engine.shards import iter_shard
    from clipforge.engine.training import train
    from tests.conftest import TINY_CONFIG

    recipe = load_recipe(
        {
            "name": "digits",
            "storage": {"root": str(tmp_path)},
            "data": {
                "train": {"type": "digits", "split": "train", "size": 640},
                "eval": {"type": "digits", "split": "test", "size": 100},
            },
            "curation": [{"type": "caption-length", "min_words": 2}],
            "model": {"type": "open-clip", "config": TINY_CONFIG},
            "loss": {"type": "clip"},
            "train": {"epochs": 5, "batch_size": 64, "lr": 2e-3, "warmup_steps": 5, "seed": 0},
            "evaluation": [{"type": "zero-shot-classification"}],
        }
    )  # fmt: skip
    catalog = clipforge.get_plugin_manager().catalog
    store = Store(str(tmp_path))
    summary = curate(recipe, catalog, store, f"curated/{curation_key(recipe)}", progress=False)
    assert summary.kept == 640
    pairs = [p for shard in summary.shards for p in iter_shard(store, shard.path)]
    assert all(p["caption"].startswith("a photo of the digit ") for p in pairs)
    assert {p["key"] for p in pairs} <= {f"digits-{i:04d}" for i in SPLITS["train"]}
    result = train(recipe, catalog, store, "run/train", summary.shards, progress=False)
    metrics = evaluate(recipe, catalog, store.uri(result.model), device="cpu").metrics
    assert metrics["eval/zero-shot-classification/acc1"] >= 0.3  # chance: 0.1
