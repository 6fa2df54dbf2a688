"""ROUGE-L with the semantics of the COCO caption evaluation code (pycocoevalcap rouge/rouge.py).

For one image with hypothesis c and references r_1..r_m:

- LCS(c, r_j) is the length of the longest common subsequence of the token lists;
- P = max_j LCS / |c|, R = max_j LCS / |r_j| (the maxima are taken separately, over
  all references, as there);
- score = (1 + beta^2) P R / (R + beta^2 P) with beta = 1.2, or 0 when P or R is 0.

The corpus score is the mean of the per-image scores. An empty hypothesis scores 0
(the COCO code sees it as the one empty token "", which matches nothing).
"""

from __future__ import annotations

BETA = 1.2


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two token sequences (O(|a| |b|))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def sentence_rouge_l(hypothesis, references, beta=BETA) -> float:
    """ROUGE-L F-measure of one token list against its reference token lists."""
    if len(references) == 0:
        raise ValueError("every hypothesis needs at least one reference")
    if len(hypothesis) == 0:
        return 0.0
    prec, rec = [], []
    for ref in references:
        lcs = lcs_length(ref, hypothesis)
        prec.append(lcs / float(len(hypothesis)))
        rec.append(lcs / float(len(ref)) if len(ref) else 0.0)
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p)


def corpus_rouge_l(hypotheses, references) -> tuple[float, list[float]]:
    """(mean ROUGE-L over images, per-image scores)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    scores = [sentence_rouge_l(h, r) for h, r in zip(hypotheses, references)]
    return (sum(scores) / len(scores) if scores else 0.0), scores
