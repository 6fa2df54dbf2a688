"""Corpus BLEU-1..4 with the semantics of the COCO caption evaluation code.

This follows pycocoevalcap's Bleu scorer (bleu/bleu_scorer.py, option "closest"):

- n-gram matches are clipped by the largest count of that n-gram in any single
  reference of the same image;
- the reference length of a hypothesis is the length of its closest reference
  (ties go to the shorter one), summed over the corpus;
- BLEU-n = (prod_{k<=n} (correct_k + tiny) / (guess_k + small)) ** (1/n) with
  tiny = 1e-15 and small = 1e-9, times the brevity penalty exp(1 - r/c) when the
  corpus ratio c/r (computed as (c + tiny) / (r + small)) is below 1.

The arithmetic is done in the same order as there, so results agree to rounding.
Inputs are token lists (already tokenised); the COCO toolkit's PTB tokenizer is
not applied.
"""

from __future__ import annotations

import math
from collections import Counter

_TINY = 1e-15
_SMALL = 1e-9


def ngram_counts(tokens, max_n=4) -> Counter:
    """Counts of every n-gram (as a tuple) of length 1..max_n."""
    tokens = tuple(tokens)
    counts = Counter()
    for k in range(1, max_n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tokens[i:i + k]] += 1
    return counts


def sentence_stats(hypothesis, references, max_n=4):
    """(hyp length, closest reference length, guesses per n, clipped matches per n)."""
    if len(references) == 0:
        raise ValueError("every hypothesis needs at least one reference")
    max_ref = {}
    ref_lens = []
    for ref in references:
        ref_lens.append(len(ref))
        for gram, c in ngram_counts(ref, max_n).items():
            if c > max_ref.get(gram, 0):
                max_ref[gram] = c
    c_len = len(hypothesis)
    r_len = min((abs(rl - c_len), rl) for rl in ref_lens)[1]
    guess = [max(0, c_len - k + 1) for k in range(1, max_n + 1)]
    correct = [0] * max_n
    for gram, c in ngram_counts(hypothesis, max_n).items():
        correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    return c_len, r_len, guess, correct


def corpus_bleu(hypotheses, references, max_n=4) -> list[float]:
    """Corpus BLEU-1..BLEU-max_n.

    hypotheses: one token list per image; references: per image, a list of token
    lists (all of that image's captions). Returns [BLEU-1, ..., BLEU-max_n].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    c_total = 0
    r_total = 0
    guess = [0] * max_n
    correct = [0] * max_n
    for hyp, refs in zip(hypotheses, references):
        c_len, r_len, g, m = sentence_stats(hyp, refs, max_n)
        c_total += c_len
        r_total += r_len
        for k in range(max_n):
            guess[k] += g[k]
            correct[k] += m[k]
    scores = []
    product = 1.0
    for k in range(max_n):
        product *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (c_total + _TINY) / (r_total + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores
