"""StepGrads: what one forward/backward pass of the model's hot path computed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepGrads:
    """What one forward/backward pass of the hot path computed (owned by the model).

    ``grad_buffer`` holds the gradient of every parameter, flat, in the model's
    layout; W_embed's block (``grad_buffer[embed_offset:]``, shaped
    ``embed_shape``) is filled only when ``embed_dense``. The embedding
    gradient is always also given row-sparse: ``embed_ids`` (unique word ids)
    and ``embed_rows`` (their summed gradient rows). ``loss`` is the summed
    token loss / normalizer (a float, or a 0-d device array on the GPU path);
    ``tokens`` the number of real target tokens. The arrays are views of
    buffers the next pass overwrites.
    """

    loss: object
    tokens: int
    grad_buffer: object
    embed_offset: int
    embed_shape: tuple
    embed_ids: object
    embed_rows: object
    embed_dense: bool
    forward_end: float = 0.0  # time.perf_counter() when the forward pass ended (for traces)
    kernels: object = None  # the model's kernels (their scatter_ids fills W_embed's block)

    @property
    def embed_grad(self):
        """W_embed's (V, W) block of ``grad_buffer`` (a view)."""
        return self.grad_buffer[self.embed_offset :].reshape(self.embed_shape)

    def scatter_embedding(self):
        """Fill W_embed's dense block from the sparse rows (once)."""
        if not self.embed_dense:
            g = self.embed_grad
            scatter = getattr(self.kernels, "scatter_ids", None)
            if scatter is not None and isinstance(g, np.ndarray):
                scatter(self.embed_rows, self.embed_ids, g)
            else:
                g.fill(0)
                g[self.embed_ids] = self.embed_rows
            self.embed_dense = True
        return self
