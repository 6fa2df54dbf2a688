"""CIDEr-D with the semantics of the COCO caption evaluation code (pycocoevalcap cider/).

pycocoevalcap's ``Cider`` scorer is CIDEr-D. For n = 1..4, every caption becomes a TF-IDF
vector g_n: the weight of an n-gram w is count(w) * (log(M) - log(max(1, df(w)))), where M is
the number of images evaluated and df(w) the number of those images whose references (any
of them) contain w. The document frequencies therefore come from the evaluated set's own
references, not from a fixed corpus. For a hypothesis c and reference s:

    sim_n(c, s) = sum_w min(g_n(c)[w], g_n(s)[w]) * g_n(s)[w] / (|g_n(c)| |g_n(s)|)
                  * exp(-(l(c) - l(s))^2 / (2 sigma^2)),      sigma = 6

(the min is CIDEr-D's clipping; the division is skipped when a norm is 0). The length l
is the number of *bigrams* of the caption, as in the COCO code (its ``length`` counts the
n-grams with n == 2). An image scores 10 * mean_n(sum_s sim_n(c, s)) / (number of its
references); the corpus score is the mean over images. The arithmetic is done in the same
order as there (with Python's math in place of NumPy's scalar functions), so the results
agree to rounding.
"""

from __future__ import annotations

import math
from collections import Counter

from .bleu import ngram_counts

SIGMA = 6.0
MAX_N = 4


def document_frequency(references, max_n=MAX_N) -> Counter:
    """For every n-gram, the number of images whose references contain it."""
    df = Counter()
    for refs in references:
        df.update({gram for ref in refs for gram in ngram_counts(ref, max_n)})
    return df


def tfidf_vector(counts, log_df, log_m, max_n=MAX_N):
    """(weights per n: [{gram: tf * idf}], norms per n, number of bigrams); ``log_df(gram)``
    is log(max(1, df(gram)))."""
    vec = [{} for _ in range(max_n)]
    norm = [0.0] * max_n
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = float(tf) * (log_m - log_df(gram))
        vec[n][gram] = weight
        norm[n] += weight * weight
        if n == 1:
            length += tf
    return vec, [math.sqrt(v) for v in norm], length


def similarity(hyp, ref, sigma=SIGMA):
    """[sim_n for n = 1..max_n] of two tfidf_vector results."""
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    delta = float(len_h - len_r)
    penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
    val = [0.0] * len(vec_h)
    for n in range(len(vec_h)):
        ref_n = vec_r[n]
        for gram, weight in vec_h[n].items():
            ref_weight = ref_n.get(gram, 0.0)
            val[n] += min(weight, ref_weight) * ref_weight
        if norm_h[n] != 0 and norm_r[n] != 0:
            val[n] /= norm_h[n] * norm_r[n]
        val[n] *= penalty
    return val


def corpus_cider_d(hypotheses, references, max_n=MAX_N, sigma=SIGMA):
    """(mean CIDEr-D over images, per-image scores); token lists in, as corpus_bleu."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        return 0.0, []
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    df = document_frequency(references, max_n)
    log_df_cache = {}

    def log_df(gram):
        value = log_df_cache.get(gram)
        if value is None:
            value = log_df_cache[gram] = math.log(max(1.0, df.get(gram, 0.0)))
        return value

    log_m = math.log(float(len(references)))
    scores = []
    for hyp, refs in zip(hypotheses, references):
        h = tfidf_vector(ngram_counts(hyp, max_n), log_df, log_m, max_n)
        total = [0.0] * max_n
        for ref in refs:
            sim = similarity(h, tfidf_vector(ngram_counts(ref, max_n), log_df, log_m, max_n),
                             sigma)
            total = [t + v for t, v in zip(total, sim)]
        scores.append(sum(total) / max_n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores
