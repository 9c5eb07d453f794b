"""What each component computes, against an independent computation or a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge import EncoderBundle
from clipforge.testing import tiny_features
from clipforge_example import ContrastFilter, Digits, PairCosine, create_dcl
from clipforge_example.digits import NAMES


def _dcl_by_the_formula(img, txt, scale):
    """L_i = -s_ii/t + log sum_{j != i} exp(s_ij/t), both directions, written out element by element."""
    n = len(img)
    s = (img @ txt.T).tolist()
    total = 0.0
    for sim in (s, [list(col) for col in zip(*s)]):
        for i in range(n):
            negatives = [math.exp(scale * sim[i][j]) for j in range(n) if j != i]
            total += (-scale * sim[i][i] + math.log(sum(negatives))) / n
    return total / 2


def test_dcl_is_the_formula_and_not_infonce():
    f = tiny_features(batch_size=6, dim=8, seed=3)
    out = create_dcl()(f.image_features, f.text_features, f.logit_scale)
    scale = f.logit_scale.item()
    expected = _dcl_by_the_formula(f.image_features.detach(), f.text_features.detach(), scale)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    logits = scale * f.image_features @ f.text_features.T
    labels = torch.arange(6)
    infonce = ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).item()
    assert infonce > out["loss"].item()  # the positive in InfoNCE's denominator only adds to it
    assert out["loss"].item() == pytest.approx((out["image_to_text"] + out["text_to_image"]).item() / 2)


def test_weighted_dcl_weighs_hard_positives_more():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)  # pair 1 is the harder positive
    scale = torch.tensor(10.0)
    plain, weighted = create_dcl(), create_dcl(weighted=True, sigma=0.5)
    # DCLW's weights average 1: same loss as DCL when the positives are equally hard
    same = F.normalize(torch.eye(2), dim=-1)
    assert weighted(same, same, scale)["loss"].item() == pytest.approx(plain(same, same, scale)["loss"].item())
    w = 2 - 2 * torch.softmax((img * txt).sum(1) / 0.5, dim=0)
    assert w[1] > 1 > w[0]
    assert weighted(img, txt, scale)["loss"].item() != pytest.approx(plain(img, txt, scale)["loss"].item())


def test_digits_are_the_real_handwritten_digits_split_without_overlap():
    from sklearn.datasets import load_digits

    full, train, test = Digits(), Digits(split="train"), Digits(split="test")
    assert (len(full), len(train), len(test)) == (1797, 1437, 360)
    assert not {s.key for s in train} & {s.key for s in test}
    sample = test[3]  # the 15th digit of the full set
    assert sample.key == "digits-0015" and sample.label == load_digits().target[15]
    assert NAMES[sample.label] in sample.caption or str(sample.label) in sample.caption
    assert sample.image.size == (32, 32) and sample.image.mode == "RGB"
    assert "a photo of the digit seven" in {s.caption for s in full if s.label == 7}
    assert full.classes[7] == "seven" and all("{c}" in t for t in full.templates)
    assert [s.caption for s in Digits(split="test", seed=1)] != [s.caption for s in test]
    assert [s.caption for s in Digits(split="test")] == [s.caption for s in test]


def test_the_contrast_filter_drops_exactly_the_blank_scans():
    samples = list(Digits(split="test", blank=0.1))
    blank = {s.key for s in samples if s.meta.get("defect") == "blank scan"}
    assert 15 < len(blank) < 60
    verdicts = ContrastFilter(min_std=0.05)(samples)
    assert {s.key for s, v in zip(samples, verdicts) if not v.keep} == blank
    dropped = next(v for s, v in zip(samples, verdicts) if s.key in blank)
    assert dropped.reason.startswith("low contrast (std 0.000 < 0.05") and dropped.scores["std"] == 0.0
    assert all(v.scores["std"] > 0.2 for v in verdicts if v.keep)


def test_pair_cosine_on_a_model_that_embeds_each_digit_to_its_own_axis():
    """Images and captions both map to the one-hot of their digit: matching pairs have cosine 1, other classes 0."""
    dataset = Digits(split="test")
    samples = list(dataset)
    label_of_image = {}

    def preprocess(image):
        return torch.tensor([label_of_image[image.tobytes()]], dtype=torch.float32)

    for s in samples:
        label_of_image[s.image.tobytes()] = s.label

    class OneHot(torch.nn.Module):
        def encode_image(self, x):
            return F.one_hot(x[:, 0].long(), 10).float()

        def encode_text(self, tokens):
            return F.one_hot(tokens, 10).float()

    def tokenizer(captions):
        return torch.tensor([next(d for d, name in enumerate(NAMES) if name in c or str(d) in c) for c in captions])

    bundle = EncoderBundle(OneHot(), tokenizer, preprocess, preprocess, arch="none")
    metrics = PairCosine(batch_size=50).evaluate(bundle, samples, "cpu")
    assert metrics == {"positive_cosine": 1.0, "negative_cosine": 0.0, "cosine_gap": 1.0}


def test_pair_cosine_needs_two_samples(clipforge_bundle):
    with pytest.raises(ValueError, match="at least 2 samples"):
        PairCosine().evaluate(clipforge_bundle, list(Digits(split="test"))[:1], "cpu")
