"""Adam over one flat parameter buffer.

The model's parameters are views into one contiguous buffer and its
gradients views into another, so one vectorised update covers every
parameter: no Python loop over parameters, and the same arithmetic on every
rank keeps data-parallel replicas identical.
"""

from __future__ import annotations

import numpy as np

from .. import alloc


class Adam:
    """Adam (Kingma & Ba) with bias correction, over flat buffers.

    Update, with t counted from 1:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, num_params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, xp=np,
                 dtype=np.float32, kernels=None):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.xp = xp
        self.m = alloc.zeros(num_params, dtype, xp)
        self.v = alloc.zeros(num_params, dtype, xp)
        self.t = 0
        self.kernels = kernels
        self._scratch = None

    def advance(self, lr=None):
        """Count one more step; its (step size lr / (1 - b1^t), 1 / (1 - b2^t)).

        Every path asks this for its step's hyperparameters: ``step`` below, and
        the GPU graph, which runs the update inside its captured step.
        """
        lr = self.lr if lr is None else lr
        self.t += 1
        return lr / (1.0 - self.beta1**self.t), 1.0 / (1.0 - self.beta2**self.t)

    def step(self, params, grads, lr=None, bits=None):
        """One in-place update of ``params`` from ``grads`` (both flat). ``bits`` (the CPU
        kernels only), when given, receives the updated parameters rounded to bf16 by the
        same pass (``Gemm.param_twin``: the next step's bf16 GEMMs read the weights there)."""
        lr = self.lr if lr is None else lr
        if bits is not None and self.kernels is None:
            raise ValueError("Adam.step: bits (bf16 weights) need the CPU kernels")
        self.advance(lr)
        bias1 = 1.0 - self.beta1**self.t
        bias2 = 1.0 - self.beta2**self.t
        if self.kernels is not None:
            extra = {} if bits is None else {"bits": bits}
            self.kernels.adam_update(params, grads, self.m, self.v, lr, self.beta1, self.beta2,
                                     self.eps, bias1, bias2, **extra)
            return
        xp = self.xp
        if self._scratch is None or self._scratch.shape != params.shape:
            self._scratch = xp.empty_like(params)
        w = self._scratch
        m, v = self.m, self.v
        m *= self.beta1
        xp.multiply(grads, 1.0 - self.beta1, out=w)
        m += w
        v *= self.beta2
        xp.multiply(grads, grads, out=w)
        w *= 1.0 - self.beta2
        v += w
        # denominator sqrt(v / bias2) + eps, step size lr / bias1
        xp.multiply(v, 1.0 / bias2, out=w)
        xp.sqrt(w, out=w)
        w += self.eps
        xp.divide(m, w, out=w)
        w *= lr / bias1
        params -= w

    def state_dict(self):
        """The state a checkpoint keeps: moments (this optimizer's arrays) and step count."""
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state):
        self.m[...] = self.xp.asarray(state["m"])
        self.v[...] = self.xp.asarray(state["v"])
        self.t = int(state["t"])


