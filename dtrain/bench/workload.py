"""The bench's synthetic workload: COCO-like caption lengths, and the GEMM work of a step."""

from __future__ import annotations

import numpy as np

# COCO-like caption lengths (words before <END>), 8 to 15 words: with <END>
# about 70% of the 16 target slots hold a real token.
LENGTH_PROBS = {8: 0.15, 9: 0.25, 10: 0.20, 11: 0.13, 12: 0.10, 13: 0.07, 14: 0.05, 15: 0.05}


def synthetic_batch(N, T, V, D, rng, null=0, start=1, end=2):
    lengths = rng.choice(list(LENGTH_PROBS), size=N, p=list(LENGTH_PROBS.values()))
    lengths = np.minimum(lengths, T - 1)
    captions = np.full((N, T + 1), null, dtype=np.int32)
    captions[:, 0] = start
    for n, L in enumerate(lengths):
        captions[n, 1 : L + 1] = rng.integers(4, V, size=L)
        captions[n, L + 1] = end
    features = np.maximum(rng.standard_normal((N, D)), 0).astype(np.float32)
    return features, captions


def step_flops(packed, N, D, W, H, V, gates):
    """GEMM FLOPs of one packed training step (forward + backward)."""
    P = int(sum(packed.batch_sizes))
    M = P if packed.score_pos is None else len(packed.score_pos)
    G = gates * H
    fwd = 2 * P * W * G + 2 * P * H * G + 2 * M * H * V + 2 * N * D * H
    return 3 * fwd  # backward: a gradient w.r.t. weights and one w.r.t. inputs per GEMM


def mean_step_flops(model, captions_list, gates):
    """Mean GEMM FLOPs of the steps over these (n, T+1) caption batches of one rank."""
    from ..nn.model import pack_captions

    return float(np.mean([step_flops(pack_captions(c, model.null_idx), c.shape[0], model.input_dim,
                                     model.wordvec_dim, model.hidden_dim, model.vocab_size, gates)
                          for c in captions_list]))


def vocab(V):
    w = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}
    for i in range(4, V):
        w[f"w{i}"] = i
    return w
