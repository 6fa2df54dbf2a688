"""Helpers shared by the tests: numeric gradients, error measures, vocabularies, caption
batches, and the final state of a run's checkpoints."""

import numpy as np


def numeric_grad(f, x, df=None, h=1e-5):
    """d(sum(f() * df))/dx by centred differences, perturbing x in place."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        pos = f()
        x[ix] = old - h
        neg = f()
        x[ix] = old
        if df is None:
            grad[ix] = (pos - neg) / (2 * h)
        else:
            grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def eval_numerical_gradient(f, x, h=1e-5):
    """The CS231n notebooks' checker: f(x) is called with the array it perturbs in place."""
    return numeric_grad(lambda: f(x), x, h=h)


def rel_error(a, b):
    """CS231n's relative error: the largest |a - b| / (|a| + |b|) over entries."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def norm_error(num, ana):
    """Largest absolute difference relative to the largest entry of ``ana``."""
    num, ana = np.asarray(num, dtype=np.float64), np.asarray(ana, dtype=np.float64)
    return float(np.max(np.abs(num - ana)) / max(np.max(np.abs(ana)), 1e-12))


def small_vocab(V):
    """The special tokens and V - 4 made-up words."""
    w = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}
    for i in range(4, V):
        w[f"w{i}"] = i
    return w


def random_captions(rng, N, T, V, min_len=2):
    """(N, T+1) ids: <START> words <END> <NULL>... with varied lengths."""
    caps = np.zeros((N, T + 1), dtype=np.int32)
    for n in range(N):
        L = rng.integers(min_len, T)  # words before <END>
        caps[n, 0] = 1
        caps[n, 1 : L + 1] = rng.integers(3, V, size=L)
        caps[n, L + 1] = 2
    return caps


def final_state(ckpt_dir):
    """(step, params as NumPy arrays, the loaded checkpoint) of the newest checkpoint in
    ``ckpt_dir``."""
    from dtrain.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(ckpt_dir)
    assert path is not None, f"no checkpoint in {ckpt_dir}"
    ck = load_checkpoint(path)
    return int(ck["step"]), {k: np.asarray(v) for k, v in ck["params"].items()}, ck
