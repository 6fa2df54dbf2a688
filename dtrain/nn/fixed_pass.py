"""The fixed-shape pass of CaptioningModel (the GPU graph mode): every one of the N
rows runs all T steps, every position is scored and 0/1 weights mask the loss.

Same mathematics as the packed pass (tests/test_gpu.py compares them in float64),
without device synchronisation or a data-dependent shape, so the call can be
captured as a CUDA graph.
"""

from __future__ import annotations

import numpy as np

from .row_ops import _embedding_grad_segments_xp, _masked_softmax_xp


def fixed_forward_backward(model, features, batch, normalizer, ws=None, loss_out=None):
    """``CaptioningModel.forward_backward_fixed`` of ``model`` (see there); the
    gradients land in ``model.grads``, a :class:`StepGrads` is returned."""
    xp, dtype, kern, cell, gemm = model.xp, model.dtype, model.kernels, model.cell, model.gemm
    ws = model.ws if ws is None else ws
    p, g = model.params, model.grads
    N, T = batch.N, batch.T
    M, H = N * T, model.hidden_dim
    h0 = ws.get("fx_h0", (N, H), dtype, xp)
    gemm.matmul(features, p["W_proj"], h0)
    h0 += p["b_proj"]
    x = ws.get("fx_embed", (M, model.wordvec_dim), dtype, xp)
    xp.take(p["W_embed"], batch.words, axis=0, out=x)
    hidden, cache = cell.packed_forward(x, h0, p["Wx"], p["Wh"], p["b"], [N] * T, ws, kern)

    scores = ws.get("fx_scores", (M, model.vocab_size), dtype, xp)
    gemm.matmul(hidden, p["W_vocab"], scores)
    scores += p["b_vocab"]
    row_loss = ws.get("fx_row_loss", (M,), np.float64, xp)
    if hasattr(kern, "softmax_cross_entropy_masked"):
        kern.softmax_cross_entropy_masked(scores, batch.targets, batch.weights, normalizer,
                                          row_loss)
    else:
        _masked_softmax_xp(scores, batch.targets, batch.weights, normalizer, row_loss)
    loss = ws.get("fx_loss", (), np.float64, xp) if loss_out is None else loss_out
    row_loss.sum(out=loss)
    xp.divide(loss, normalizer, out=loss)

    gemm.matmul(hidden.T, scores, g["W_vocab"])
    scores.sum(axis=0, out=g["b_vocab"])
    dhidden = ws.get("fx_dhidden", (M, H), dtype, xp)
    gemm.matmul(scores, p["W_vocab"].T, dhidden)
    dx, dh0, *_ = cell.packed_backward(dhidden, cache, ws, kern, out=(g["Wx"], g["Wh"], g["b"]))
    gemm.matmul(features.T, dh0, g["W_proj"])
    dh0.sum(axis=0, out=g["b_proj"])

    rows = ws.get("fx_embed_rows", (M, model.wordvec_dim), dtype, xp)
    segments = (dx, batch.order, batch.seg_start, batch.ids, rows, g["W_embed"])
    if hasattr(kern, "embedding_grad_segments"):
        kern.embedding_grad_segments(*segments)
    else:
        _embedding_grad_segments_xp(*segments)
    return model.step_grads(loss, batch.num_tokens, batch.ids[: batch.num_ids],
                            rows[: batch.num_ids], dense=True)
