"""Corpus BLEU: hand-computed cases and agreement with pycocoevalcap's scorer."""

import contextlib
import io
import math

import numpy as np
import pytest

from dtrain.data.bleu import corpus_bleu, sentence_stats

TINY, SMALL = 1e-15, 1e-9


def t(s):
    return s.split()


def penalty(c, r):
    """The COCO code's brevity penalty. Note that c == r gives a ratio a hair below 1,
    (c + tiny) / (r + small), and so a penalty of about exp(-1e-9 / c)."""
    ratio = (c + TINY) / (r + SMALL)
    return math.exp(1 - 1 / ratio) if ratio < 1 else 1.0


def p(correct, guess):
    return (correct + TINY) / (guess + SMALL)


def test_perfect_match():
    ref = t("a man riding a horse on the beach")
    assert corpus_bleu([ref], [[ref]]) == pytest.approx([1.0] * 4, abs=1e-8)


def test_clipping():
    # "the" appears 7 times, at most twice in a reference: unigram precision 2/7
    hyp = t("the the the the the the the")
    refs = [t("the cat is on the mat"), t("there is a cat on the mat")]
    b = corpus_bleu([hyp], [refs])
    # the closest reference has 7 words, as many as the hypothesis
    assert b[0] == pytest.approx(p(2, 7) * penalty(7, 7), rel=1e-12)
    assert b[1] < 1e-6  # no bigram matches: (0 + tiny) / (6 + small)
    # clipping takes the largest count in any single reference, not the sum
    c_len, r_len, guess, correct = sentence_stats(t("a a a b"), [t("a b c"), t("a a d")])
    assert correct[0] == 3 and guess[0] == 4


def test_brevity_penalty():
    hyp = t("the cat")
    ref = t("the cat is on the mat")
    bp = penalty(2, 6)
    assert bp == pytest.approx(math.exp(1 - 6 / 2), rel=1e-9)
    b = corpus_bleu([hyp], [[ref]])
    assert b[0] == pytest.approx(p(2, 2) * bp, rel=1e-12)
    assert b[1] == pytest.approx((p(2, 2) * p(1, 1)) ** (1 / 2) * bp, rel=1e-12)
    # no trigram in a 2-word hypothesis: the COCO code's tiny/small constants give
    # (tiny / small) ** (1/3) = 1e-2 rather than 0
    assert p(0, 0) == pytest.approx(1e-6)
    assert b[2] == pytest.approx((p(2, 2) * p(1, 1) * p(0, 0)) ** (1 / 3) * bp, rel=1e-12)
    assert b[2] == pytest.approx(1e-2 * bp, rel=1e-6)
    assert b[3] == pytest.approx((p(2, 2) * p(1, 1) * p(0, 0) ** 2) ** (1 / 4) * bp, rel=1e-12)


def test_closest_reference_length():
    hyp = t("a b c d e")  # length 5
    # references of length 4 and 6 are equally close: the shorter (4) is taken -> no penalty
    b = corpus_bleu([hyp], [[t("a b c d"), t("a b c d e f")]])
    assert b == pytest.approx([1.0] * 4, abs=1e-8)
    # the closest (7) rather than the shortest (2) or the average
    b = corpus_bleu([t("a b c d e f")], [[t("x y"), t("a b c d e f g")]])
    assert b[0] == pytest.approx(p(6, 6) * penalty(6, 7), rel=1e-12)
    assert penalty(6, 7) == pytest.approx(math.exp(1 - 7 / 6), rel=1e-9)
    # several references: each n-gram may match any of them, clipped to its largest
    # count in one reference ("a" twice in the hypothesis, at most once per reference)
    hyp = t("a cat sat on a mat")
    refs = [t("a cat sat here"), t("on a mat there was"), t("the dog")]
    c_len, r_len, guess, correct = sentence_stats(hyp, refs)
    assert (c_len, r_len) == (6, 5)
    assert guess == [6, 5, 4, 3]
    assert correct == [5, 4, 2, 0]  # a cat sat on mat | a cat, cat sat, on a, a mat | 2 | 0


def test_corpus_sums_counts_not_scores():
    hyps = [t("a b c d"), t("x y z w v u")]
    refs = [[t("a b c d")], [t("x y q w v u")]]
    # guesses 4+6, 3+5, 2+4, 1+3; correct 4+5, 3+3, 2+1, 1+0; lengths 10 vs 10
    ps = [p(9, 10), p(6, 8), p(3, 6), p(1, 4)]
    want = [np.prod(ps[:k]) ** (1 / k) * penalty(10, 10) for k in range(1, 5)]
    assert corpus_bleu(hyps, refs) == pytest.approx(want, rel=1e-12)


def test_errors():
    with pytest.raises(ValueError):
        corpus_bleu([t("a")], [])
    with pytest.raises(ValueError):
        corpus_bleu([t("a")], [[]])


def _random_corpus(rng, n_images):
    words = [f"w{i}" for i in range(rng.integers(3, 15))]
    hyps, refs = [], []
    for _ in range(n_images):
        hyps.append(list(rng.choice(words, size=rng.integers(0, 16))))
        refs.append([list(rng.choice(words, size=rng.integers(1, 16)))
                     for _ in range(rng.integers(1, 7))])
    return hyps, refs


def test_agrees_with_pycocoevalcap():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    rng = np.random.default_rng(0)
    for n_images in (1, 2, 7, 300, 500):
        hyps, refs = _random_corpus(rng, n_images)
        gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
        res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its totals
            theirs, _ = bleu_mod.Bleu(4).compute_score(gts, res)
        ours = corpus_bleu(hyps, refs)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
