"""MetaCLIP balancing in every language: Unicode normalisation, whole words where scripts use spaces,
substrings where they do not, one caption at a time, entries as written, entries from a file."""

from __future__ import annotations

import unicodedata
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipforge
from clipforge.core.components import Pool
from clipforge.core.validation import load_recipe
from clipforge.plugins.curation.balance import JOINERS, NO_SPACE_SCRIPTS, Balance, Matcher, normalise


def matched(entries: list[str], caption: str | list[str]) -> list[str]:
    step = Balance(entries=entries, t=10)
    return [step.entries[i] for i in step.matches(caption)]


@pytest.mark.parametrize(
    ("entries", "caption", "expected"),
    [
        (["café"], "a caf sign", []),  # the ASCII pattern cut café to caf
        (["café"], "Un CAFÉ au lait", ["café"]),
        (["café"], "cafe\u0301 noir", ["café"]),  # e + combining acute: NFKC composes it
        (["naïve"], "a naïve painting", ["naïve"]),
        (["naïve"], "na ve", []),
        (["über"], "Über alles", ["über"]),
        (["über"], "a ber", []),
        (["東京"], "東京タワーの夜景", ["東京"]),  # Japanese: no spaces, a substring matches
        (["東京"], "我爱东京和東京", ["東京"]),
        (["北京"], "北京大学", ["北京"]),  # Chinese
        (["แมว"], "แมวดำนอนบนโซฟา", ["แมว"]),  # Thai
        (["c++"], "learning C++ today", ["c++"]),
        (["c++", "c"], "c++ and c", ["c++", "c"]),
        (["c"], "written in c++", []),  # c++ is not c
        (["c"], "c# code", []),
        (["c"], "(c) 2020", ["c"]),
        (["red car"], "a bright red car.", ["red car"]),
        (["red car"], "a bright red, car", []),
        (["straße"], "STRASSE", ["strasse"]),  # case folding: ß folds to ss
        (["ｔｏｋｙｏ"], "tokyo at night", ["tokyo"]),  # full-width letters: NFKC
        (["tokyo"], "東京tokyo", ["tokyo"]),  # a word beside a script without spaces
        (["кот"], "Котёнок и кот", ["кот"]),  # Cyrillic: whole words only
        (["οδός"], "ΜΙΑ ΟΔΟΣ", []),  # final sigma folds to σ, not ς: the entry folds alike
        (["οδος"], "ΜΙΑ ΟΔΟΣ", ["οδοσ"]),
        (["dog"], "«dog»!", ["dog"]),
        (["dog"], "dog's bowl", []),
        (["dog"], "hot-dog stand", []),
        (["dog"], "my dog🐶", ["dog"]),
        (["서울"], "서울 타워", ["서울"]),  # Korean separates words with spaces
        (["서울"], "서울타워", []),
    ],
)
def test_entries_match_in_every_script(entries, caption, expected):
    assert sorted(matched(entries, caption)) == sorted(expected)


def test_each_caption_of_a_sample_is_matched_on_its_own():
    assert matched(["red car", "red", "car park"], ["a bright red", "car park"]) == ["red", "car park"]
    assert matched(["red car"], ["a bright red", "car park"]) == []
    assert matched(["red car"], ["nothing", "a red car"]) == ["red car"]


def test_the_issue_entries_are_accepted_and_an_entry_of_no_text_is_refused():
    load_recipe(_recipe({"type": "balance", "entries": ["東京", "c++", "café", "naïve", "über"]}))
    with pytest.raises(clipforge.RecipeError, match=r"no text after normalisation at 1"):
        load_recipe(_recipe({"type": "balance", "entries": ["ok", " \u3000 "]}))
    with pytest.raises(clipforge.RecipeError, match="exactly one of 'entries'"):
        load_recipe(_recipe({"type": "balance", "entries": ["a"], "entries_file": "x.txt"}))


def _recipe(step: dict) -> dict:
    return {"name": "b", "data": {"train": {"type": "synthetic-shapes", "size": 4}}, "curation": [step],
            "model": {"type": "open-clip", "arch": "RN50"}}  # fmt: skip


# -- properties ---------------------------------------------------------------------------

LETTERS = "abcxyzçéèêëïîôœßüñ" + "αβγδεζηλμνοσς" + "абвгдежзик" + "بتثجحخد" + "한국어서울"
NO_SPACE_LETTERS = "東京大学中文日本語" + "あいうえおかアイウエオ" + "กขคงจฉช"
MARKS = ".,;:!?()\"'«»#+&@-/%·🐶"
ALPHABET = LETTERS + NO_SPACE_LETTERS + MARKS + "0123456789" + "  \u00a0\u3000"
entry_text = st.text(LETTERS + NO_SPACE_LETTERS + "+#'", min_size=1, max_size=6).filter(lambda s: normalise(s) != "")
phrases = st.lists(entry_text, min_size=1, max_size=3).map(" ".join)


@settings(max_examples=500)
@given(st.text())
def test_normalisation_is_idempotent(text):
    assert normalise(normalise(text)) == normalise(text)


@settings(max_examples=300, deadline=None)
@given(entry=phrases, others=st.lists(phrases, max_size=5))
def test_a_caption_made_of_an_entry_matches_it(entry, others):
    step = Balance(entries=[entry, *others])
    assert normalise(entry) in [step.entries[i] for i in step.matches(entry)]
    assert normalise(entry) in [step.entries[i] for i in step.matches(f"look: ({entry}), again")]


@settings(max_examples=300, deadline=None)
@given(entry=st.text(LETTERS, min_size=1, max_size=6), left=st.text(LETTERS, max_size=3), right=st.text(LETTERS, max_size=3))
def test_an_entry_inside_a_longer_word_of_a_spaced_script_does_not_match(entry, left, right):
    caption = f"one {left}{entry}{right} two"
    inside = left + right != ""
    step = Balance(entries=[entry])
    assert bool(step.matches(caption)) == (not inside or normalise(entry) in normalise(caption).split())


def _class(ch: str) -> str:
    """The character classes of the module's docstring, written out per character: the reference."""
    cp = ord(ch)
    if ch.isspace():
        return "space"
    punct = unicodedata.category(ch) in ("Ps", "Pe", "Pi", "Pf", "Po", "So") and ch not in JOINERS
    if 0x1F000 <= cp <= 0x1FAFF:
        return "punct"
    if any(lo <= cp <= hi for lo, hi in NO_SPACE_SCRIPTS):
        return "punct" if punct else "nospace"
    return "punct" if punct else "word"


def _side_ok(text: str, i: int, step: int) -> bool:
    """Walking from position ``i`` in direction ``step``, only phrase punctuation until the text's edge, a space or a no-space character."""
    while 0 <= i < len(text):
        c = _class(text[i])
        if c in ("space", "nospace"):
            return True
        if c == "word":
            return False
        i += step
    return True


def reference(entries: list[str], captions: list[list[str]]) -> list[list[int]]:
    """A straightforward per-entry search: every occurrence of every entry in every caption, its sides checked."""
    out = []
    for caps in captions:
        found = set()
        for k, entry in enumerate(entries):
            for caption in map(normalise, caps):
                start = caption.find(entry)
                while start >= 0:
                    end = start + len(entry)
                    left = _class(entry[0]) == "nospace" or _side_ok(caption, start - 1, -1)
                    right = _class(entry[-1]) == "nospace" or _side_ok(caption, end, 1)
                    if left and right:
                        found.add(k)
                    start = caption.find(entry, start + 1)
        out.append(sorted(found))
    return out


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(phrases, min_size=1, max_size=12),
    captions=st.lists(st.lists(st.text(ALPHABET, max_size=40), min_size=1, max_size=3), max_size=8),
    planted=st.data(),
)
def test_the_automaton_finds_what_a_search_entry_by_entry_finds(entries, captions, planted):
    # plant entries into some captions, with random surroundings, so that matches are common
    for caps in captions:
        i = planted.draw(st.integers(0, len(caps) - 1))
        entry = planted.draw(st.sampled_from(entries))
        around = planted.draw(st.tuples(st.text(ALPHABET, max_size=3), st.text(ALPHABET, max_size=3)))
        caps[i] = f"{around[0]}{entry}{around[1]}"
    matcher = Matcher([normalise(e) for e in entries])
    assert matcher(captions) == reference(matcher.entries, captions)


# -- balancing, with and without a pool ---------------------------------------------------


def test_caps_hold_in_every_language_and_the_pool_fills_them_first():
    captions = {"cat": "a photo of a cat", "猫": "黒い猫の写真", "кот": "кот спит", "แมว": "แมวดำ"}
    keys, matches = [], []
    step = Balance(entries=list(captions), t=20, seed=0)
    for entry, caption in captions.items():
        for i in range(200):
            keys.append(f"{entry}-{i}")
            matches += step.features([clipforge.Sample(keys[-1], None, f"{caption} {i}")])
    verdicts = step.decide(keys, matches)
    kept = Counter(k.split("-")[0] for k, v in zip(keys, verdicts) if v.keep)
    assert all(8 <= kept[e] <= 35 for e in captions), kept  # each kept with probability 20/200
    # a pool already holding 15 pairs of "cat" (and 40 of "кот"): the new data shares what is left of t
    cat, kot = step.entries.index("cat"), step.entries.index("кот")
    pool = Pool(
        keys=[f"p{i}" for i in range(55)], features=[[cat]] * 15 + [[kot]] * 40, kept=[True] * 55, manifests=["m"], ends=[55]
    )
    against = step.decide_against(keys, matches, pool)
    kept = Counter(k.split("-")[0] for k, v in zip(keys, against) if v.keep)
    assert 0 < kept["cat"] <= 12 and kept["кот"] == 0 and 8 <= kept["猫"] <= 35, kept
    assert next(v for k, v in zip(keys, against) if k.startswith("кот")).reason == "entry over its cap"
    no_stats = Pool(keys=pool.keys, features=pool.features, kept=pool.kept, manifests=["m"], ends=[55], statistics=False)
    assert step.decide_against(keys, matches, no_stats) == verdicts


# -- entries from a file ------------------------------------------------------------------


def _create(fields: dict):
    return clipforge.get_plugin_manager().catalog.create("curation_steps", {"type": "balance", **fields})


def test_entries_read_from_a_file_one_per_line(tmp_path):
    path = tmp_path / "entries.txt"
    path.write_text("\ufeffcafé\n\n東京\nc++\nred car\n", encoding="utf-8")  # a BOM and a blank line
    step = _create({"entries_file": str(path), "t": 5})
    assert step.entries == ["café", "東京", "c++", "red car"]
    assert [step.entries[i] for i in step.matches("a red car at the café")] == ["café", "red car"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "holds no entries"),
        (b"\n  \n", "holds no entries"),
        (b"ok\ncaf\xe9\n", r"is not UTF-8 text \(line 2, byte 6"),
    ],
)
def test_a_bad_entries_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "entries.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(clipforge.ConfigError, match=f"entries_file '{path}' {message}"):
        _create({"entries_file": str(path)})


@pytest.mark.slow
def test_entries_read_from_the_store(tmp_path, monkeypatch):
    import s3fs

    from tests.services import ACCESS_KEY, SECRET_KEY, create_bucket, moto_s3

    with moto_s3(tmp_path) as endpoint:
        create_bucket(endpoint, "meta")
        for name, value in (
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(name, value)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.pipe("meta/entries.txt", "猫\ncat\n".encode())
        step = _create({"entries_file": "s3://meta/entries.txt", "storage_options": {"endpoint_url": endpoint}})
        assert step.entries == ["猫", "cat"]
        with pytest.raises(clipforge.ConfigError, match="'s3://meta/missing.txt' does not exist"):
            _create({"entries_file": "s3://meta/missing.txt", "storage_options": {"endpoint_url": endpoint}})


@pytest.mark.parametrize(("count", "t"), [(10_000, 1_000), (5_000, 2_500), (300, 1_000)])
def test_an_entry_keeps_about_t_of_its_pairs_in_any_order(count, t):
    step = Balance(entries=["cat", "dog"], t=t, seed=3)
    keys = [f"k{i}" for i in range(count)]
    matches = [[0]] * count
    kept = [v.keep for v in step.decide(keys, matches)]
    expected = min(count, t)
    assert abs(sum(kept) - expected) <= 4 * (expected * (1 - expected / count)) ** 0.5 + 1e-9
    order = np.random.default_rng(0).permutation(count)
    again = step.decide([keys[i] for i in order], [matches[i] for i in order])
    assert [v.keep for v in again] == [kept[i] for i in order]  # a function of the key and the seed, not of the position
