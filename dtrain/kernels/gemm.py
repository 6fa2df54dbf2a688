"""The one call site of a training step's GEMMs, where a precision or a BLAS plugs in.

Every GEMM of the step goes through a ``Gemm``: the input projection, the recurrent
GEMMs of every time step, the vocabulary projection, and the weight and input
gradients. A kernel set owns one (``kernel_set.gemm``); the plain xp path uses
``PLAIN``; ``gemm_of(kernels)`` gives the one in force. Three forms, each writing
into ``out`` (operands 2-D, any strides NumPy's matmul takes):

- ``matmul(a, b, out)``: out = a @ b;
- ``accumulate(a, b, out)``: out += a @ b (one GEMM with beta = 1 where the library
  offers it: the LSTM's recurrent GEMM adding h Wh to the step's gate rows);
- ``transposed(a, b, out)``: out = a @ b.T.

**Plugging in** a precision (bf16 operands accumulated in fp32, e.g. MKL's
cblas_gemm_bf16bf16f32) or another library (MKL, oneDNN, cuBLAS): subclass ``Gemm``,
override ``_matmul``, ``_accumulate`` and ``_transposed``, and give the kernel set an
instance (``CpuKernels(dtype, gemm=...)``). The CPU kernels' compiled LSTM loops call
OpenBLAS's sgemm through its address from inside Numba (``cpu/loops.py``); they run
only while the kernel set's Gemm says ``compiled_sgemm`` (the recurrence plan asks),
so a Gemm of another arithmetic sets it False and the plan falls back to the Python
loop over the fused steps, whose recurrent GEMMs come here.

**Recording.** ``recorder``, when set (the floor profiler, ``dtrain/bench/floor.py``),
is called as ``recorder(kind, a, b, out, seconds)`` after every GEMM, kind "matmul",
"accumulate" or "transposed", each operand an array or an (address, shape, byte
strides, dtype string) layout; with no recorder nothing is timed.

This module also holds the recurrent backward's GEMM helpers, which every cell uses.
"""

from __future__ import annotations

import contextlib
import importlib
import time

import numpy as np

from ..nn.workspace import buffer

# Up to this many rows, recurrent_backward computes (Wh @ d.T).T (the crossover measured
# between 128 and 192 rows, H=512, OpenBLAS SkylakeX, 2 threads; above it the extra
# transposing copy costs what the GEMM gains).
TRANSPOSED_BACKWARD_ROWS = 128


def array_module(a):
    """NumPy for host arrays, else the module that owns ``a`` (CuPy). Found from the array
    itself: the kernels import nothing that imports them back (dtrain.backend does)."""
    if isinstance(a, np.ndarray):
        return np
    return importlib.import_module(type(a).__module__.split(".")[0])


class Gemm:
    """fp32 (or the operands' dtype) GEMMs by the arrays' own matmul (NumPy, CuPy)."""

    recorder = None
    # True when ``accumulate`` is one GEMM with beta = 1 (not a product, then an add)
    accumulates = False
    # True when the compiled loops' sgemm (called by address) is this Gemm's arithmetic
    compiled_sgemm = False

    def matmul(self, a, b, out):
        if self.recorder is None:
            return self._matmul(a, b, out)
        return self._recorded("matmul", self._matmul, a, b, out)

    def accumulate(self, a, b, out):
        if self.recorder is None:
            return self._accumulate(a, b, out)
        return self._recorded("accumulate", self._accumulate, a, b, out)

    def transposed(self, a, b, out):
        if self.recorder is None:
            return self._transposed(a, b, out)
        return self._recorded("transposed", self._transposed, a, b, out)

    def operands_fixed(self, *arrays, converted=None):
        """A block (``with``, may nest) in which ``arrays`` do not change: a Gemm that converts
        its operands (bf16, ``cpu/gemm_bf16.py``) converts each of those once for the block
        instead of at every GEMM that reads it. ``converted``, when given, is (buffer, its
        ``param_twin`` already written by the optimizer): arrays lying in that buffer are
        taken from there, not converted. Here nothing to do."""
        return contextlib.nullcontext()

    def param_twin(self, buffer):
        """A buffer the optimizer may fill with ``buffer``'s (the flat parameters') operand
        form as it updates them (``Adam.step(bits=)``), for ``operands_fixed(converted=)``;
        None when this Gemm reads its operands as they are (here)."""
        return None

    def twin(self, x, slot):
        """Where a kernel that writes ``x`` may also write the operand form this Gemm would
        otherwise make of it at every GEMM that reads it (bf16: ``cpu/gemm_bf16.py``), or
        None: nothing to write (here, and outside an ``operands_fixed`` block)."""
        return None

    def _recorded(self, kind, fn, a, b, out):
        t0 = time.perf_counter()
        result = fn(a, b, out)
        self.recorder(kind, a, b, out, time.perf_counter() - t0)
        return result

    def _matmul(self, a, b, out):
        # the module is looked up at every call: a captured CUDA graph swaps cupy.matmul
        return array_module(a).matmul(a, b, out=out)

    def _accumulate(self, a, b, out):
        out += a @ b
        return out

    def _transposed(self, a, b, out):
        return array_module(a).matmul(a, b.T, out=out)


PLAIN = Gemm()


def gemm_of(kernels):
    """The Gemm in force: the kernel set's, or ``PLAIN`` for the plain xp path."""
    return PLAIN if kernels is None else kernels.gemm


def recurrent_scratch(ws, rows, H, dtype, xp):
    """The scratch buffer of ``recurrent_backward`` for up to ``rows`` rows (None on a GPU).

    A packed backward pass takes it once, before its time loop: every Python call
    inside the loop runs once per time step, on caches the GEMMs have just filled.
    """
    if xp is not np:
        return None
    return buffer(
        ws, "recurrent_backward_T", (H * max(min(rows, TRANSPOSED_BACKWARD_ROWS), 1),), dtype, xp
    )


def recurrent_backward(d, Wh, out, ws=None, scratch=None, kernels=None):
    """out = d @ Wh.T: a step's gradient back to the previous hidden state.

    On NumPy, for at most TRANSPOSED_BACKWARD_ROWS rows, this is computed as
    (Wh @ d.T).T into a scratch buffer (``scratch`` from ``recurrent_scratch``,
    else one from ``ws``) and copied (by ``kernels.copy_transposed`` when given):
    OpenBLAS runs that form faster for the few rows of a short caption batch's step.
    The same products; tests/test_layers.py checks the results against the plain
    product.
    """
    n, H = out.shape
    if not isinstance(d, np.ndarray) or n > TRANSPOSED_BACKWARD_ROWS:
        return gemm_of(kernels).transposed(d, Wh, out)
    if scratch is None:
        scratch = buffer(ws, "recurrent_backward_T", (H * max(n, 1),), d.dtype, np)
    out_T = recurrent_backward_T(d, Wh, scratch, kernels)
    if kernels is not None:
        return kernels.copy_transposed(out_T, out)
    out[...] = out_T.T
    return out


def recurrent_backward_T(d, Wh, scratch, kernels=None):
    """(d @ Wh.T).T = Wh @ d.T, (H, n), in ``scratch`` (NumPy): ``recurrent_backward``'s
    GEMM, for kernels whose backward step reads the result transposed."""
    n, H = d.shape[0], Wh.shape[0]
    return gemm_of(kernels).transposed(Wh, d, scratch[: H * n].reshape(H, n))
