"""Decoding captions from a CaptioningModel: greedy, and beam search batched across images.

Beam search keeps K beams per image; the N*K beams of a batch of N images advance together,
so each step is one embedding gather, one cell step and one vocabulary GEMM for all of them
(beams that have ended stay in the batch, emitting <NULL>, until every beam has ended or
``max_length`` is reached). A step chooses, per image, the K best of its K*K candidates:
each beam's K most likely next words (taken from the raw scores, ties to the lower word id,
as ``argmax``), ranked by

    sum of log-probabilities / length ** length_penalty

where the length counts the words emitted, <END> included (length_penalty 0: no
normalisation). An ended beam proposes one candidate, itself, with its score unchanged.
The caption returned is that of the best-ranked beam. With K = 1 the one candidate of each
step is the argmax of the same scores the greedy sampler computes, from the same arithmetic,
so beam search with K = 1 returns ``CaptioningModel.sample``'s captions bit for bit.

Captions are (N, max_length) word ids with <NULL> after <END>, as ``sample`` returns.
"""

from __future__ import annotations

import numpy as np


def check_beam_args(beam_size, length_penalty, vocab_size=None):
    """ValueError naming the flag when --beam-size / --length-penalty are out of range."""
    if not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise ValueError(f"--beam-size: expected an integer >= 1, got {beam_size}")
    if vocab_size is not None and beam_size > vocab_size:
        raise ValueError(f"--beam-size: expected at most the vocabulary size {vocab_size}, "
                         f"got {beam_size}")
    if not (np.isfinite(length_penalty) and length_penalty >= 0):
        raise ValueError(f"--length-penalty: expected a finite number >= 0, got {length_penalty}")


def top_k_log_probs(scores, k, xp):
    """(ids (R, k), log-probabilities (R, k) in float64) of each row's k largest scores,
    in decreasing order, ties to the lower id (repeated argmax, as the greedy sampler)."""
    rows = xp.arange(scores.shape[0])
    work = scores.copy()
    ids = []
    for _ in range(k):
        best = xp.argmax(work, axis=1)
        ids.append(best)
        work[rows, best] = -np.inf
    ids = xp.stack(ids, axis=1)
    s64 = scores.astype(np.float64)
    top = s64.max(axis=1, keepdims=True)
    log_norm = top + xp.log(xp.exp(s64 - top).sum(axis=1, keepdims=True))
    return ids, xp.take_along_axis(s64, ids, axis=1) - log_norm


def beam_search(model, features, max_length=16, beam_size=3, length_penalty=0.0):
    """Captions (N, max_length) of the best beam per image (see the module docstring)."""
    xp, p, cell = model.xp, model.params, model.cell
    check_beam_args(beam_size, length_penalty, model.vocab_size)
    start, end = model.word_to_idx["<START>"], model.word_to_idx["<END>"]
    null = model.null_idx
    K = int(beam_size)
    features = xp.asarray(features, dtype=model.dtype)
    N = features.shape[0]
    R = N * K
    state = cell.init_state(xp.repeat(features @ p["W_proj"] + p["b_proj"], K, axis=0))
    word = xp.full(R, start, dtype=np.int64)
    score = xp.full((N, K), -np.inf)  # only beam 0 is live at the start: no duplicates
    score[:, 0] = 0.0
    length = xp.zeros((N, K), dtype=np.int64)
    finished = xp.zeros((N, K), dtype=bool)
    tokens = xp.full((R, max_length), null, dtype=np.int64)
    only_first = xp.where(xp.arange(K) == 0, 0.0, -np.inf)[None, :]
    image_base = (xp.arange(N) * K)[:, None]
    for t in range(max_length):
        h, state = cell.sample_step(p["W_embed"][word], state, p["Wx"], p["Wh"], p["b"])
        cand_word, cand_logp = top_k_log_probs(h @ p["W_vocab"] + p["b_vocab"], K, xp)
        ended = finished.reshape(R, 1)
        cand_word = xp.where(ended, null, cand_word)
        cand_logp = xp.where(ended, only_first, cand_logp)
        total = (score.reshape(R, 1) + cand_logp).reshape(N, K * K)
        cand_len = xp.broadcast_to(xp.where(ended, length.reshape(R, 1), t + 1), (R, K))
        cand_len = cand_len.reshape(N, K * K)
        rank = total / cand_len.astype(np.float64) ** length_penalty if length_penalty else total
        order = xp.argsort(-rank, axis=1, kind="stable")[:, :K] if K > 1 \
            else xp.zeros((N, 1), dtype=np.int64)
        rows = (image_base + order // K).reshape(R)
        score = xp.take_along_axis(total, order, axis=1)
        length = xp.take_along_axis(cand_len, order, axis=1)
        word = xp.take_along_axis(cand_word.reshape(N, K * K), order, axis=1).reshape(R)
        finished = finished.reshape(R)[rows].reshape(N, K) | (word == end).reshape(N, K)
        tokens = tokens[rows]
        tokens[:, t] = word
        state = tuple(s[rows] for s in state)
        if t % 4 == 3 and bool(finished.all()):
            break
    return tokens.reshape(N, K, max_length)[:, 0]


def decode(model, features, max_length=16, beam_size=1, length_penalty=0.0):
    """(N, max_length) word ids: ``model.sample`` (greedy) for beam_size 1, where a length
    penalty changes nothing, and beam search otherwise."""
    p = model.params  # unchanged while decoding: a converting Gemm (bf16) converts them once
    with model.gemm.operands_fixed(p["W_proj"], p["Wx"], p["Wh"], p["W_vocab"]):
        if beam_size == 1:
            return model.sample(features, max_length=max_length)
        return beam_search(model, features, max_length, beam_size, length_penalty)
