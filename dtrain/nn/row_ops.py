"""Row gathers and scatters of the model's hot paths, and the plain xp references of
the fixed-shape mode's kernels (masked softmax, per-word embedding gradient sums)."""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module


def take_rows(src, idx, out, kernels=None, bits=None):
    """out[i] = src[idx[i]] (``take`` along axis 0), by ``kernels`` where they offer it
    (one pass on every thread of the CPU's shared pool). ``bits``, when given (out's twin
    from ``Gemm.twin``; only ever given with the CPU kernels), receives the rows' bf16
    rounding in the same pass."""
    gather = getattr(kernels, "gather_rows", None)
    if gather is not None:
        return gather(src, idx, out) if bits is None else gather(src, idx, out, bits=bits)
    if bits is not None:
        raise ValueError("take_rows: bits (a bf16 twin) needs the CPU kernels")
    return get_array_module(src).take(src, idx, axis=0, out=out)


def scatter_rows(src, pos, out, kernels=None):
    """out = 0 but out[pos] = src (``pos`` ascending), in one pass where ``kernels`` offer it."""
    scatter = getattr(kernels, "scatter_rows", None)
    if scatter is not None:
        return scatter(src, pos, out)
    out.fill(0)
    out[pos] = src
    return out


def _masked_softmax_xp(scores, targets, weights, normalizer, row_loss):
    """Plain xp reference of the masked softmax kernel (in place in ``scores``)."""
    xp = get_array_module(scores)
    rows = xp.arange(scores.shape[0])
    shifted = scores - scores.max(axis=1, keepdims=True)
    target_logit = shifted[rows, targets]
    xp.exp(shifted, out=scores)
    sums = scores.sum(axis=1)
    row_loss[...] = (xp.log(sums) - target_logit) * weights
    scores /= sums[:, None]
    scores[rows, targets] -= 1.0
    scores *= (weights / normalizer)[:, None]


def _embedding_grad_segments_xp(dx, order, seg_start, ids, rows, dense):
    """Plain xp reference of the per-word embedding gradient sums."""
    xp = get_array_module(dx)
    counts = seg_start[1:] - seg_start[:-1]
    segment = xp.repeat(xp.arange(ids.shape[0]), counts.tolist() if xp is not np else counts)
    rows.fill(0)
    xp.add.at(rows, segment, dx[order[: segment.shape[0]]])
    dense.fill(0)
    real = ids >= 0
    dense[ids[real]] = rows[real]
