"""Caption batches laid out for the model's two hot paths: packed (``PackedBatch``,
only real positions, rows sorted by length) and fixed-shape (``FixedBatch``, every
row for all T steps, for CUDA graphs). Host NumPy in, host NumPy out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedBatch:
    """Host-side packing of a caption batch for the packed recurrence.

    Rows are sorted by caption length (last real token), longest first; step
    t then involves only the first ``batch_sizes[t]`` sorted rows, and the
    recurrence stops at the longest caption. ``score_pos`` lists the packed
    positions with a real target (None when all are real).
    """

    order: np.ndarray  # (n0,) original row of each sorted active row
    batch_sizes: list
    words_in: np.ndarray  # (total,) input word per packed position
    targets: np.ndarray  # (total or M,) target word per scored position
    score_pos: np.ndarray | None
    num_tokens: int


def pack_captions(captions, null_idx, kernels=None):
    """Pack (N, T+1) caption ids (host NumPy) for the packed recurrence (by ``kernels``'
    compiled ``pack_captions`` where they offer one, with the same result)."""
    captions = np.asarray(captions)
    pack = getattr(kernels, "pack_captions", None)
    if (pack is not None and captions.ndim == 2 and captions.dtype.kind in "iu"
            and captions.shape[1] >= 1):
        order, batch_sizes, words_in, targets, real, num_tokens = pack(captions, null_idx)
        score_pos = None
        if not real.all():
            score_pos = np.flatnonzero(real)
            targets = targets[score_pos]
        n0 = int(batch_sizes[0]) if batch_sizes.size else 0
        return PackedBatch(order=order[:n0], batch_sizes=batch_sizes.tolist(), words_in=words_in,
                           targets=targets, score_pos=score_pos, num_tokens=int(num_tokens))
    cin, cout = captions[:, :-1], captions[:, 1:]
    mask = cout != null_idx
    T = cin.shape[1]
    has_token = mask.any(axis=1)
    lengths = np.where(has_token, T - np.argmax(mask[:, ::-1], axis=1), 0)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    t_max = int(sorted_len[0]) if sorted_len.size else 0
    active = np.arange(t_max)[:, None] < sorted_len[None, :]
    t_idx, j_idx = np.nonzero(active)  # time-major: packed order
    rows = order[j_idx]
    batch_sizes = active.sum(axis=1).tolist()
    words_in = cin[rows, t_idx]
    targets = cout[rows, t_idx]
    real = mask[rows, t_idx]
    score_pos = None
    if not real.all():
        score_pos = np.flatnonzero(real)
        targets = targets[score_pos]
    n0 = batch_sizes[0] if batch_sizes else 0
    return PackedBatch(
        order=order[:n0],
        batch_sizes=batch_sizes,
        words_in=words_in,
        targets=targets,
        score_pos=score_pos,
        num_tokens=int(mask.sum()),
    )


@dataclass
class FixedBatch:
    """A caption batch in the fixed-shape layout (the GPU graph mode).

    Every one of the N rows runs all T steps, T being the batch's longest
    caption, so a step's shapes depend on (N, T) alone and one captured CUDA
    graph per shape replays every batch of that shape. Arrays are time-major
    (position t*N + n), int32, and of fixed length M = T*N: every position is
    scored and ``weights`` (1 real target, 0 padding) masks the loss inside
    the softmax kernel. The embedding gradient is summed per word over the
    positions inside a caption: ``order`` lists them grouped by word (stable),
    word s's group is order[seg_start[s]:seg_start[s+1]], ``ids[s]`` its word;
    the unused tail (s >= num_ids) holds empty segments with id -1.
    """

    N: int
    T: int
    words: np.ndarray  # (M,) input word per position
    targets: np.ndarray  # (M,) target word per position
    weights: np.ndarray  # (M,) 1.0 where the target is a real token, else 0.0
    order: np.ndarray  # (M,) positions grouped by input word; tail unused
    seg_start: np.ndarray  # (M+1,) start of each word's group in ``order``
    ids: np.ndarray  # (M,) word of each group, -1 for the unused tail
    num_ids: int
    num_tokens: int


def fixed_batch(captions, null_idx, dtype=np.float32):
    """Lay out (N, T+1) caption ids (host NumPy) for the fixed-shape mode."""
    captions = np.asarray(captions)
    N = captions.shape[0]
    cin, cout = captions[:, :-1], captions[:, 1:]
    mask = cout != null_idx
    has_token = mask.any(axis=1)
    lengths = np.where(has_token, cin.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
    T = max(1, int(lengths.max()) if N else 1)
    M = T * N
    words = np.ascontiguousarray(cin[:, :T].T, dtype=np.int32).reshape(M)
    targets = np.ascontiguousarray(cout[:, :T].T, dtype=np.int32).reshape(M)
    weights = np.ascontiguousarray(mask[:, :T].T, dtype=dtype).reshape(M)
    inside = (np.arange(T)[:, None] < lengths[None, :]).reshape(M)
    pos = np.flatnonzero(inside)
    grouped = pos[np.argsort(words[pos], kind="stable")]
    sorted_words = words[grouped]
    new_word = np.r_[True, sorted_words[1:] != sorted_words[:-1]]
    starts = np.flatnonzero(new_word) if pos.size else pos[:0]
    S = starts.size
    order = np.zeros(M, dtype=np.int32)
    order[: pos.size] = grouped
    seg_start = np.full(M + 1, pos.size, dtype=np.int32)
    seg_start[:S] = starts
    ids = np.full(M, -1, dtype=np.int32)
    ids[:S] = sorted_words[starts]
    return FixedBatch(N=N, T=T, words=words, targets=targets, weights=weights, order=order,
                      seg_start=seg_start, ids=ids, num_ids=int(S), num_tokens=int(mask.sum()))
