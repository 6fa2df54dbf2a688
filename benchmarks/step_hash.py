"""Hash of one training step's gradients: the "same bits" check for refactors.

    python benchmarks/step_hash.py            # float32 and float64, LSTM, N=128
    python benchmarks/step_hash.py --cell gru --threads 1

Builds one synthetic batch (COCO-like caption lengths, seed 0) with its own
NumPy generator, so the batch does not depend on dtrain's code, runs the
model's training hot path (``forward_backward`` into the flat gradient buffer,
the fused kernels included) and prints the first 12 hex digits of the SHA-256
of the loss, the dense gradient buffer and the sparse embedding rows.
Equal hashes before and after a change mean the step computes the same bits.
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np


def batch(N, T, V, D, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 16, size=N)
    captions = np.zeros((N, T + 1), dtype=np.int32)
    captions[:, 0] = 1
    for n, length in enumerate(np.minimum(lengths, T - 1)):
        captions[n, 1 : length + 1] = rng.integers(4, V, size=length)
        captions[n, length + 1] = 2
    features = np.maximum(rng.standard_normal((N, D)), 0).astype(np.float32)
    return features, captions


def step_hash(dtype, cell, N=128, T=16, V=1004, D=512, W=256, H=512):
    from dtrain.nn.model import CaptioningModel

    word_to_idx = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}
    word_to_idx.update({f"w{i}": i for i in range(4, V)})
    features, captions = batch(N, T, V, D)
    model = CaptioningModel(word_to_idx, input_dim=D, wordvec_dim=W, hidden_dim=H, cell_type=cell,
                            dtype=dtype, seed=0)
    grads = model.forward_backward(features.astype(dtype), model.pack(captions), N)
    order = np.argsort(np.asarray(grads.embed_ids), kind="stable")
    digest = hashlib.sha256()
    digest.update(np.asarray(float(grads.loss)).tobytes())
    digest.update(np.ascontiguousarray(model.grad_buffer[: model.embed_offset]).tobytes())
    digest.update(np.asarray(grads.embed_ids)[order].astype(np.int64).tobytes())
    digest.update(np.ascontiguousarray(np.asarray(grads.embed_rows)[order]).tobytes())
    return digest.hexdigest()[:12]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS/kernel threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    for dtype in (np.float32, np.float64):
        print(f"{args.cell} {np.dtype(dtype).name}: {step_hash(dtype, args.cell)}")


if __name__ == "__main__":
    main()
