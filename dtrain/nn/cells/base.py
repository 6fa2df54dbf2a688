"""What a recurrent cell is, to the model: one small record per cell module.

A cell module (``rnn.py``, ``lstm.py``, ``gru.py``) writes its mathematics
once, as CS231n-style functions (step forward/backward for reading and
testing, packed-sequence forward/backward for training), and describes itself
with a :class:`Cell`. The model asks the cell for its parameter shapes, its
initial values, its sequence functions and one sampling step; it has no
branch on the cell's name. Adding a cell is one new module plus one line in
``cells/__init__.py`` (and, for speed, its fused kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cell:
    """A recurrent cell, registered by ``name``.

    ``gates``: blocks of width H in Wx (W, gates*H), Wh (H, gates*H), b (gates*H,).
    ``packed_forward(x_packed, h0, Wx, Wh, b, batch_sizes, ws, kernels) -> (H_packed, cache)``
    ``packed_backward(dH_packed, cache, ws, kernels, out, input_grad=True)
    -> (dx_packed, dh0, dWx, dWh, db)``;
    with ``input_grad=False``, the gradient of x Wx + b (total, gates*H) in dx_packed's place
    and db not written (the caller sums it).
    ``sample_step(x, state, Wx, Wh, b) -> (h, state)``: one step of greedy sampling;
    ``state`` starts as ``init_state(h0)``.
    ``forward`` / ``backward``: the CS231n full-sequence signatures.
    ``kernels``: names of the fused kernels its packed functions use when the
    kernel set offers them (the plain xp code runs otherwise).
    """

    name: str
    gates: int
    packed_forward: Callable
    packed_backward: Callable
    forward: Callable
    backward: Callable
    sample_step: Callable
    init_state: Callable = lambda h0: (h0,)
    kernels: tuple = ()

    def param_shapes(self, wordvec_dim: int, hidden_dim: int) -> dict:
        G = self.gates * hidden_dim
        return {"Wx": (wordvec_dim, G), "Wh": (hidden_dim, G), "b": (G,)}

    def init_params(self, rng: np.random.Generator, wordvec_dim: int, hidden_dim: int) -> dict:
        """CS231n's initialisation (float64, from ``rng``): Wx ~ N(0, 1/W), Wh ~ N(0, 1/H),
        b = 0."""
        G = self.gates * hidden_dim
        return {
            "Wx": rng.standard_normal((wordvec_dim, G)) / np.sqrt(wordvec_dim),
            "Wh": rng.standard_normal((hidden_dim, G)) / np.sqrt(hidden_dim),
        }

    def kernel(self, kernels, name):
        """The fused kernel ``name`` of the set ``kernels``, or None (plain xp path)."""
        return None if kernels is None else getattr(kernels, name, None)


def single_state_sampler(step_forward):
    """``sample_step`` of a cell whose state is h alone:
    ``step_forward(x, h, Wx, Wh, b) -> (h, cache)``."""

    def sample_step(x, state, Wx, Wh, b):
        h, _ = step_forward(x, state[0], Wx, Wh, b)
        return h, (h,)

    return sample_step
