"""Centred finite differences in float64 against the model's analytic gradient (``--debug``)."""

from __future__ import annotations

import numpy as np

from ..backend import to_host
from .model import CaptioningModel


def finite_difference_check(model, features, captions, normalizer, seed=0, per_param=3, h=1e-5):
    """Largest error (relative to each gradient's largest entry) over a few entries
    of every parameter, and how many were checked. A float64 plain-xp copy of
    ``model`` on the host is checked, at ``model``'s current parameters."""
    m64 = CaptioningModel(model.word_to_idx, model.input_dim, model.wordvec_dim, model.hidden_dim,
                          model.cell_type, dtype=np.float64, seed=0, xp=np, use_kernels=False)
    m64.param_buffer[...] = to_host(model.param_buffer)
    _, grads = m64.loss(features, captions, normalizer=normalizer)
    rng = np.random.default_rng(seed)
    worst, n = 0.0, 0
    for name, p in m64.params.items():
        flat = p.reshape(-1)
        g = grads[name].reshape(-1)
        picks = list(rng.choice(flat.size, size=min(per_param, flat.size), replace=False))
        if np.any(g != 0):
            picks.append(int(np.argmax(np.abs(g))))  # the largest entry is always checked
        scale = max(float(np.max(np.abs(g))), 1e-12)
        for k in picks:
            old = flat[k]
            flat[k] = old + h
            lp = m64.forward_loss(features, captions, normalizer)
            flat[k] = old - h
            lm = m64.forward_loss(features, captions, normalizer)
            flat[k] = old
            worst = max(worst, abs((lp - lm) / (2 * h) - g[k]) / scale)
            n += 1
    return worst, n
