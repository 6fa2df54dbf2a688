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


# ---------------------------------------------------------------------------
# ROUGE-L and CIDEr-D

def test_lcs_and_rouge_l_by_hand():
    from dtrain.data.rouge import lcs_length, sentence_rouge_l

    assert lcs_length(t("a b c d e"), t("a c e x")) == 3
    assert lcs_length(t("a b"), t("")) == 0
    hyp = t("a man rides a horse")
    refs = [t("a man riding a brown horse"), t("horse")]
    # LCS 4 (a man a horse) with the first: P = 4/5; best recall is 1/1 from "horse"
    p, r, beta = 4 / 5, 1.0, 1.2
    want = (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    assert sentence_rouge_l(hyp, refs) == pytest.approx(want, rel=1e-15)
    assert sentence_rouge_l(t("x y"), refs) == 0.0
    assert sentence_rouge_l([], refs) == 0.0


def test_cider_d_by_hand():
    from dtrain.data.cider import corpus_cider_d

    # two images, each one reference equal to its hypothesis: every n-gram of image 0
    # is absent from image 1's references, so idf = log(2) for all, the cosine is 1 for
    # each n with n-grams, and the length penalty is exp(0) = 1
    hyps = [t("a b c d"), t("x y")]
    mean, per_image = corpus_cider_d(hyps, [[hyps[0]], [hyps[1]]])
    assert per_image[0] == pytest.approx(10.0, rel=1e-12)  # mean over n of 1, times 10
    assert per_image[1] == pytest.approx(10.0 * 2 / 4, rel=1e-12)  # no 3- or 4-grams in "x y"
    assert mean == pytest.approx((per_image[0] + per_image[1]) / 2, rel=1e-15)
    # an n-gram found in every image's references has idf 0 and so counts for nothing
    mean, per_image = corpus_cider_d([t("q"), t("q")], [[t("q")], [t("q")]])
    assert per_image == [0.0, 0.0]
    # the Gaussian penalty on the difference in bigram counts (sigma 6), and clipping:
    # a hypothesis repeating a matched word does not gain over the reference's weight
    one, _ = corpus_cider_d([t("a b"), t("z")], [[t("a b")], [t("z")]])
    rep, per = corpus_cider_d([t("a a a b"), t("z")], [[t("a b")], [t("z")]])
    assert per[0] < 10 * 2 / 4 and rep < one


def _pycoco_scores(mod, cls, gts, res):
    scorer = getattr(pytest.importorskip(f"pycocoevalcap.{mod}"), cls)()
    with contextlib.redirect_stdout(io.StringIO()):
        mean, per = scorer.compute_score(gts, res)
    return mean, per


def test_rouge_and_cider_agree_with_pycocoevalcap():
    from dtrain.data.cider import corpus_cider_d
    from dtrain.data.rouge import corpus_rouge_l

    pytest.importorskip("pycocoevalcap")
    rng = np.random.default_rng(1)
    for n_images in (1, 2, 7, 300, 600):
        hyps, refs = _random_corpus(rng, n_images)
        hyps = [h if h else ["w0"] for h in hyps]  # the COCO scorers' own empty-hypothesis
        gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}  # tests are below
        res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
        for ours, (mod, cls) in ((corpus_rouge_l, ("rouge.rouge", "Rouge")),
                                 (corpus_cider_d, ("cider.cider", "Cider"))):
            mean, per = ours(hyps, refs)
            theirs_mean, theirs_per = _pycoco_scores(mod, cls, gts, res)
            np.testing.assert_allclose(per, theirs_per, rtol=0, atol=1e-9, err_msg=cls)
            assert abs(mean - theirs_mean) <= 1e-9, (cls, n_images)


def test_empty_hypothesis_agrees_with_pycocoevalcap():
    from dtrain.data.cider import corpus_cider_d
    from dtrain.data.rouge import corpus_rouge_l

    pytest.importorskip("pycocoevalcap")
    hyps = [[], t("a man on a horse"), t("two dogs")]
    refs = [[t("a cat"), t("the cat")], [t("a man riding a horse")], [t("two dogs play")]]
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    for ours, (mod, cls) in ((corpus_rouge_l, ("rouge.rouge", "Rouge")),
                             (corpus_cider_d, ("cider.cider", "Cider"))):
        mean, per = ours(hyps, refs)
        theirs_mean, theirs_per = _pycoco_scores(mod, cls, gts, res)
        np.testing.assert_allclose(per, theirs_per, rtol=0, atol=1e-12)


def test_simple_tokenizer_matches_ptb_on_clean_captions():
    from dtrain.data import metrics

    caps = {1: ["a man riding a horse", "two  dogs in the snow"], 2: ["one", "a b c d"]}
    assert metrics.simple_tokenize("A Man, riding; a horse!") == t("a man riding a horse")
    if metrics._java_missing():
        pytest.skip(f"PTB tokenizer: {metrics._java_missing()}")
    ptb = metrics.ptb_tokenize(caps)
    assert ptb == {k: [metrics.simple_tokenize(c) for c in v] for k, v in caps.items()}


def test_caption_metrics_keys_and_values():
    from dtrain.data.metrics import OWN_METRICS, caption_metrics

    hyps = [t("a man on a horse"), t("two dogs")]
    refs = [[t("a man on a horse")], [t("two dogs")]]
    m = caption_metrics(hyps, refs)
    assert tuple(m) == OWN_METRICS
    assert m["bleu1"] == pytest.approx(1.0, abs=1e-8) and m["rouge_l"] == pytest.approx(1.0)


def test_meteor_from_pycocoevalcap_or_one_line_why(monkeypatch):
    from dtrain.data import metrics

    hyps = [t("a man on a horse"), []]
    refs = [[t("a man riding a horse"), t("a person on a horse")], [t("two dogs")]]
    if metrics._java_missing() is None:
        # one Java start (METEOR loads its paraphrase table: seconds); the value is
        # pycocoevalcap's own, so only the plumbing is checked here
        scores, missing = metrics.extra_metrics(hyps, refs, which=("meteor",))
        assert missing == {} and 0 < scores["meteor"] < 1
    monkeypatch.setenv("PATH", "")  # no java
    scores, missing = metrics.extra_metrics(hyps, refs)
    assert scores == {} and set(missing) == {"meteor", "spice"}
    line = metrics.missing_line(missing)
    assert "\n" not in line and "METEOR" in line and "java" in line
