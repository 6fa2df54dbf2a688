"""CpuKernels: the Numba kernels with the call signatures the cells, the model and Adam use.

The plain xp code of the cells (``dtrain.nn.cells``), layers and optimizer is the
reference; these kernels do the same arithmetic in one pass over memory instead of
one pass per ufunc. Every kernel that has a split form goes through ``dispatch.run``.
"""

from __future__ import annotations

import time

import numpy as np

from ... import alloc
from ..base import Capabilities, KernelSet
from . import (
    adam,
    blas,
    cells,
    dispatch,
    embedding,
    fixedpoint,
    jit,
    loops,
    rounding,
    rows,
    softmax,
)
from .gemm import CpuGemm
from .jit import PARTIAL_ROWS

_LOOPS = None
_TICK_HZ = None  # the time-stamp counter's rate (CpuKernels.ticks_to_seconds)


def _loops():
    """The compiled time loops for this process's BLAS (``loops.build``), built once."""
    global _LOOPS
    if _LOOPS is None:
        _LOOPS = loops.build(blas.ffi())
    return _LOOPS


class CpuKernels(KernelSet):
    """Numba kernels with the call signatures the cells, the model and Adam use.

    float32 runs the one-pass kernels built on exp32 (vectorised; at most 1.1 ulp from
    the correctly rounded exp); float64 (the exactness checks) runs the one-pass
    kernels built on libm's tanh and exp. ``capabilities`` (what the LSTM's recurrence
    may use, ``recurrence.py``): its steps write prev_h and work in place always; the
    accumulating GEMM and the compiled loops in float32 where OpenBLAS's sgemm is found;
    the transposed reads where omatcopy is found for the dtype."""

    name = "numba"

    def __init__(self, dtype, gemm=None):
        self.dtype = np.dtype(dtype)
        self.fast32 = self.dtype == np.float32
        # the step's GEMMs (gemm.py: where another precision or library plugs in); its
        # recorder also hears of the GEMMs the compiled loops make
        self.gemm = CpuGemm(self.dtype) if gemm is None else gemm
        omatcopy = self.dtype in blas.ffi().addresses
        self.capabilities = Capabilities(
            step_writes_prev_h=True, gemm_accumulates=self.fast32 and self.gemm.accumulates,
            compiled_loops=self.fast32 and self.gemm.compiled_sgemm and omatcopy,
            backward_in_place=True, backward_reads_transposed=omatcopy)
        self._partials = np.empty(0, dtype=dtype)  # the softmax's per-block column sums
        self._no_log = np.empty((0, loops.LOG_FIELDS), dtype=np.int64)
        self._gemm_log = self._no_log
        self._order, self._starts = np.empty(0, dtype=np.int64), np.empty(1, dtype=np.int64)
        self._embed_partials = np.empty((0, 0), dtype=dtype)  # the embedding rows' per-block sums
        self._empty_rows = {}
        self._row_loss = np.empty(0, dtype=np.float64)
        self._zeros = np.empty(0, dtype=self.dtype)
        self._counts = np.empty(0, dtype=np.int64)  # embed_group's per-word counts
        self._ids = np.empty(0, dtype=np.int64)
        self._rows = np.empty((0, 0), dtype=self.dtype)

    # -- the cells' steps ---------------------------------------------------------------

    def lstm_step_forward(self, a, r, prev_c, c, tc, h, bias, h_next=None, bits=None):
        """One LSTM step in place; ``a`` holds x Wx (its bias ``bias`` not yet added) and
        ``r`` h Wh, or ``r`` is None and ``a`` holds both (``gemm.accumulate`` added the
        recurrent product to it: ``capabilities.gemm_accumulates``). ``h_next``, when given (k <= n
        rows), also receives h's first k rows: the next step's block of prev_h
        (``capabilities.step_writes_prev_h``). ``bits``, when given, is (h's twin rows,
        h_next's twin rows or None): h's bf16 rounding is written there too (``rounding.py``)."""
        n = a.shape[0]
        if bits is not None:
            self._lstm_step_forward_bf16(a, r, prev_c, c, tc, h, bias, h_next, *bits)
            return
        if not self.fast32:
            if r is None:
                raise ValueError("lstm_step_forward: r=None (a accumulated) is for float32 only")
            a += bias
            cells.lstm_fwd(a, r, prev_c[:n], c, tc, h)
            if h_next is not None:
                h_next[...] = h[: h_next.shape[0]]
            return
        if h_next is None:
            h_next = self._no_rows(h)
        if r is None:
            dispatch.run(a.size, cells.lstm_fwd32_acc, cells.lstm_fwd32_acc_split,
                         a, bias, prev_c[:n], c, tc, h, h_next, h_next.shape[0])
        else:
            dispatch.run(a.size, cells.lstm_fwd32, cells.lstm_fwd32_split, a, r, bias, prev_c[:n],
                         c, tc, h, h_next, h_next.shape[0], self._zero_bias(a.shape[1]))

    def _lstm_step_forward_bf16(self, a, r, prev_c, c, tc, h, bias, h_next, h_bits, hn_bits):
        if not self.fast32:
            raise ValueError("lstm_step_forward: bits (bf16 twin rows) need float32")
        if r is not None:  # the bf16 Gemm accumulates (no r): this order is for other Gemms
            self.lstm_step_forward(a, r, prev_c, c, tc, h, bias, h_next)
            self.round_into(h, h_bits)
            if h_next is not None:
                hn_bits[...] = h_bits[: h_next.shape[0]]
            return
        n = a.shape[0]
        if h_next is None:
            h_next, hn_bits = self._no_rows(h), self._no_rows(h_bits)
        dispatch.run(a.size, rounding.lstm_fwd32_acc_bf16, rounding.lstm_fwd32_acc_bf16_split,
                     a, bias, prev_c[:n], c, tc, h, h_next, h_next.shape[0], h_bits, hn_bits)

    def round_into(self, src, bits):
        """bits = src rounded to bf16 (src float32 2-D, unit column stride; bits uint16 of its
        shape): the fallback of the kernels below whose bf16 form does not cover a case."""
        dispatch.run(src.size, rounding.round_rows, rounding.round_rows_split, src, bits,
                     serial_tail=(0, src.shape[0]))
        return bits

    def _no_rows(self, like):
        """An empty (0, H) array of ``like``'s dtype (kept: the hot path allocates nothing)."""
        key = (like.shape[1], like.dtype)
        empty = self._empty_rows.get(key)
        if empty is None:
            empty = self._empty_rows[key] = np.empty((0, like.shape[1]), like.dtype)
        return empty

    def exp32(self, x, out=None):
        """The float32 kernels' exp of a 1-D float32 array, x in [-87, 88]."""
        out = np.empty_like(x) if out is None else out
        jit.exp32_into(x, out)
        return out

    def lstm_step_backward(self, d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc, dh_rec_T=None,
                           bits=None):
        """One LSTM step back into ``d``, which may be ``a`` itself (the training step's case:
        the gate gradients replace the gates); otherwise ``a`` is copied there first.
        ``dh_rec_T`` (H, n_next), when given, is the transpose of the dh_rec rows the step
        reads: each thread copies its own rows first
        (``capabilities.backward_reads_transposed``). ``bits``, when given (d's twin rows),
        receives the gate gradients' bf16 rounding too (``rounding.py``)."""
        if d is not a:
            np.copyto(d, a)
        if bits is not None:
            if not self.fast32:
                raise ValueError("lstm_step_backward: bits (bf16 twin rows) need float32")
            self._lstm_step_backward_bf16(d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, dh_rec_T,
                                          bits)
            return
        address = self._rows_from_T(dh_rec_T, dh_rec, n_next)
        if address is not None:
            compiled = _loops()
            dispatch.run(d.size, compiled.lstm_bwd_T, compiled.lstm_bwd_T_split, address,
                         dh_rec_T, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
            return
        dispatch.run(d.size, cells.lstm_bwd_in_place, cells.lstm_bwd_split, d, dh_up, dh_rec,
                     dc_rec, n_next, prev_c, tc)

    def _rows_from_T(self, dh_rec_T, dh_rec, n_next):
        """omatcopy's address when the step kernel can copy its dh_rec rows from ``dh_rec_T``
        itself; otherwise (no ``dh_rec_T``: None; a layout omatcopy cannot take: the rows
        copied here first) None."""
        if dh_rec_T is None:
            return None
        address = blas.ffi().addresses.get(dh_rec.dtype)
        if address is None or dh_rec_T.shape != (dh_rec.shape[1], n_next) \
                or not (dh_rec_T.flags.c_contiguous and dh_rec.flags.c_contiguous):
            dh_rec[:n_next] = dh_rec_T.T
            return None
        return address

    def _lstm_step_backward_bf16(self, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, dh_rec_T,
                                 bits):
        address = self._rows_from_T(dh_rec_T, dh_rec, n_next)
        if address is not None:
            compiled = _loops()
            dispatch.run(d.size, compiled.lstm_bwd_T_bf16, compiled.lstm_bwd_T_bf16_split,
                         address, dh_rec_T, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, bits)
            return
        dispatch.run(d.size, rounding.lstm_bwd_bf16, rounding.lstm_bwd_bf16_split, d, dh_up,
                     dh_rec, dc_rec, n_next, prev_c, tc, bits)

    # ``bits``, when given, receives the bf16 rounding of what the step writes for the GEMMs
    # to read (h forward; the pre-activation gradients backward, for the GRU a pair)
    def rnn_step_forward(self, a, r, bits=None):
        if bits is not None:
            self._bits_need_float32()
            rounding.rnn_fwd32_bf16(a, r, bits)
            return
        (cells.rnn_fwd32 if self.fast32 else cells.rnn_fwd)(a, r)

    def rnn_step_backward(self, d, dh_up, dh_rec, n_next, h, bits=None):
        if bits is not None:
            self._bits_need_float32()
            rounding.rnn_bwd_bf16(d, dh_up, dh_rec, n_next, h, bits)
            return
        cells.rnn_bwd(d, dh_up, dh_rec, n_next, h)

    def gru_step_forward(self, a, r, prev_h, hn, h, bits=None):
        if bits is not None:
            self._bits_need_float32()
            rounding.gru_fwd32_bf16(a, r, prev_h, hn, h, bits)
            return
        (cells.gru_fwd32 if self.fast32 else cells.gru_fwd)(a, r, prev_h, hn, h)

    def gru_step_backward(self, dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h,
                          bits=None):
        if bits is not None:
            self._bits_need_float32()
            rounding.gru_bwd_bf16(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h, *bits)
            return
        cells.gru_bwd(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h)

    def _bits_need_float32(self):
        if not self.fast32:
            raise ValueError("a step kernel's bits (bf16 twin rows) need float32")

    # -- loss, embedding, rows --------------------------------------------------------------

    def softmax_cross_entropy(self, scores, targets, normalizer, bias=None, bias_grad=None,
                              bits=None):
        """Loss (float) and, in place in ``scores``, its gradient; ``bias`` (V,), when
        given, is added to every row of ``scores`` first; ``bias_grad`` (V,), when given,
        receives the gradient's column sums (the gradient of ``bias``); ``bits``, when
        given (scores' twin), the gradient's bf16 rounding (``rounding.py``)."""
        if bits is not None and not self.fast32:
            raise ValueError("softmax_cross_entropy: bits (a bf16 twin) need float32")
        M = scores.shape[0]
        if self._row_loss.size < M:
            self._row_loss = alloc.empty(M, np.float64)
        row_loss = self._row_loss[:M]
        if not self.fast32:
            if bias is not None:
                scores += bias
            softmax.softmax_xent(scores, targets, 1.0 / normalizer, row_loss)
            if bias_grad is not None:
                scores.sum(axis=0, out=bias_grad)
            return float(row_loss.sum()) / normalizer
        V = scores.shape[1]
        if bias is None:
            bias = self._zero_bias(V)
        blocks = 0 if bias_grad is None else -(-M // PARTIAL_ROWS)
        if self._partials.size < blocks * V:
            self._partials = alloc.empty(blocks * V, self.dtype)
        partials = self._partials[: blocks * V].reshape(blocks, V)
        if bits is None:
            dispatch.run(scores.size, softmax.softmax_xent32, softmax.softmax_xent32_split,
                         scores, bias, targets, 1.0 / normalizer, row_loss, partials)
        else:
            dispatch.run(scores.size, rounding.softmax_xent32_bf16,
                         rounding.softmax_xent32_bf16_split, scores, bias, targets,
                         1.0 / normalizer, row_loss, partials, bits)
        if bias_grad is not None:
            softmax.sum_partials(partials, bias_grad)
        return float(row_loss.sum()) / normalizer

    def _zero_bias(self, V):
        if self._zeros.size < V:
            self._zeros = alloc.zeros(V, self.dtype)
        return self._zeros[:V]

    def embedding_grad_sparse(self, words, dx, vocab_size, col_sum=None):
        """(ids, rows) as ``layers.embedding_grad_sparse``, in this object's buffers (views);
        ``col_sum`` (W,), when given, receives dx's column sums from the same pass (as the
        sums of the rows, in blocks of PARTIAL_ROWS words)."""
        M, W = dx.shape
        if self._counts.size < vocab_size + 1:
            self._counts = alloc.empty(vocab_size + 1, np.int64)
        if self._ids.size < M or self._rows.shape[1] != W:
            self._ids = alloc.empty(max(M, 1), np.int64)
            self._rows = alloc.empty((max(M, 1), W), self.dtype)
        if self._order.size < M:
            self._order = alloc.empty(M, np.int64)
            self._starts = alloc.empty(M + 1, np.int64)
        count = embedding.embed_group(words, self._counts[: vocab_size + 1], self._ids,
                                      self._starts, self._order)
        blocks = -(-count // PARTIAL_ROWS) if col_sum is not None else 0
        if self._embed_partials.shape[0] < blocks or self._embed_partials.shape[1] != W:
            self._embed_partials = alloc.empty((max(blocks, 1), W), self.dtype)
        partials = self._embed_partials[:blocks]
        dispatch.run(dx.size, embedding.embed_rows, embedding.embed_rows_split, dx, self._order,
                     self._starts, self._rows, partials, serial_tail=(0, count),
                     split_tail=(count,))
        if col_sum is not None:
            softmax.sum_partials(partials, col_sum)
        return self._ids[:count], self._rows[:count]

    def all_finite(self, a):
        """True when no entry of the contiguous float array ``a`` is inf or nan."""
        if a.dtype == np.float32:
            bits, exponent = a.reshape(-1).view(np.int32), np.int32(0x7F800000)
        elif a.dtype == np.float64:
            bits, exponent = a.reshape(-1).view(np.int64), np.int64(0x7FF0000000000000)
        else:
            return bool(np.isfinite(a).all())
        bad = dispatch.run(bits.size, fixedpoint.count_nonfinite, fixedpoint.count_nonfinite_split,
                           bits, exponent)
        return bad == 0

    def gather_rows(self, src, idx, out, bits=None):
        """out[i] = src[idx[i]]: ``np.take(src, idx, axis=0, out=out)`` (2-D, C-contiguous);
        ``bits``, when given (out's twin), receives the rows' bf16 rounding too."""
        if bits is None:
            bad = dispatch.run(out.size, rows.gather_rows, rows.gather_rows_split, src, idx,
                               out, serial_tail=(0, out.shape[0]))
        elif out.dtype == np.float32:
            bad = dispatch.run(out.size, rounding.gather_rows_bf16,
                               rounding.gather_rows_bf16_split, src, idx, out, bits,
                               serial_tail=(0, out.shape[0]))
        else:
            raise ValueError("gather_rows: bits (a bf16 twin) need float32")
        if bad:
            wrong = idx[(idx < 0) | (idx >= src.shape[0])]
            raise IndexError(f"index {int(wrong[0])} is out of bounds for axis 0 with size "
                             f"{src.shape[0]}")
        return out

    def scatter_rows(self, src, pos, out):
        """``out.fill(0); out[pos] = src`` in one pass (``pos`` ascending, distinct)."""
        dispatch.run(out.size, rows.scatter_rows, rows.scatter_rows_split, src, pos, out,
                     serial_tail=(0, out.shape[0]))
        return out

    def pack_captions(self, captions, null_idx):
        """``model.pack_captions``'s (order, batch_sizes, words_in, targets, is_real, num_tokens)
        for (N, T+1) integer captions (host NumPy), in one compiled call."""
        captions = np.ascontiguousarray(captions)
        return rows.pack_captions(captions, captions.dtype.type(null_idx))

    def scatter_ids(self, rows_, ids, out):
        """``out.fill(0); out[ids] = rows_`` in one call (``ids`` distinct; 2-D, C-contiguous):
        the dense W_embed gradient from its sparse rows."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= out.shape[0]):
            wrong = ids[(ids < 0) | (ids >= out.shape[0])]
            raise IndexError(f"index {int(wrong[0])} is out of bounds for axis 0 with size "
                             f"{out.shape[0]}")
        dispatch.run(out.size, rows.scatter_ids, rows.scatter_ids_split, rows_, ids, out,
                     serial_tail=(0, out.shape[0]))
        return out

    def prev_h_rows(self, Hp, h0, offsets, out):
        """``layers.prev_h_packed`` in one pass: ``offsets`` the packed block starts (T+1)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        dispatch.run(out.size, rows.prev_h_rows, rows.prev_h_rows_split, Hp, h0, offsets, out,
                     serial_tail=(0, out.shape[0]))
        return out

    # -- the BLAS FFI and the compiled time loops ---------------------------------------------

    def copy_transposed(self, src, out):
        """``out[...] = src.T`` (2-D, C-contiguous): OpenBLAS's omatcopy where it is found."""
        ffi = blas.ffi()
        address = ffi.addresses.get(src.dtype)
        if address is None or out.dtype != src.dtype or out.shape != src.shape[::-1] \
                or not (src.flags.c_contiguous and out.flags.c_contiguous):
            out[...] = src.T
        else:
            ffi.omatcopy(address, src, out)
        return out

    def threads(self):
        """The shared pool's threads (a compiled loop splits a step's gate kernel over them)."""
        return dispatch.pool.threads()

    def _log(self, T):
        """The compiled loops' GEMM log for T steps while a recorder listens, else no rows."""
        if self.gemm.recorder is None:
            return self._no_log
        if self._gemm_log.shape[0] != T:
            self._gemm_log = np.zeros((T, loops.LOG_FIELDS), dtype=np.int64)
        return self._gemm_log

    def lstm_forward_loop(self, gates, C, TC, Hp, PH, h0, c0, Wh, b, batch_sizes, offsets, parts=1):
        """The LSTM's packed forward time loop in one compiled call (``compiled_loops``; PH[:n0]
        already holds h0's rows; a step's gate kernel split over ``parts`` threads when it is
        large enough): per step ``gemm.accumulate(prev_h, Wh, gate rows)``
        and ``lstm_step_forward(..., r=None, h_next=...)``, with no Python between them; its
        GEMMs told to ``gemm.recorder`` when there is one."""
        compiled = _loops()
        sizes = np.asarray(batch_sizes, dtype=np.int64)
        starts = np.asarray(offsets, dtype=np.int64)
        log = self._log(sizes.size)
        address = blas.ffi().gemm_addresses[np.dtype(np.float32)]
        if parts > 1:
            compiled.lstm_forward_loop_split(parts, dispatch.SPLIT_MIN_ELEMENTS, address, gates, C,
                                             TC, Hp, PH, h0, c0, Wh, b, sizes, starts, log)
        else:
            compiled.lstm_forward_loop(address, gates, C, TC, Hp, PH, h0, c0, Wh, b, sizes, starts,
                                       log)
        self.gemm.tell_recorder(log, gates.dtype, self.ticks_to_seconds)

    def lstm_backward_loop(self, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0, scratch,
                           batch_sizes, offsets, max_transposed_rows, parts=1):
        """The LSTM's packed backward time loop in one compiled call (float32, in place, with
        the transposed reads): the cell's loop over ``lstm_step_backward`` and the
        recurrent GEMMs (``gemm.transposed``; (Wh d^T) for at most ``max_transposed_rows``
        rows), with no Python per step; its GEMMs told to ``gemm.recorder`` when there is one."""
        compiled, ffi = _loops(), blas.ffi()
        sizes = np.asarray(batch_sizes, dtype=np.int64)
        starts = np.asarray(offsets, dtype=np.int64)
        log = self._log(sizes.size)
        fn, omat = ffi.gemm_addresses[np.dtype(np.float32)], ffi.addresses[np.dtype(np.float32)]
        rows_T = max_transposed_rows
        if parts > 1:
            compiled.lstm_backward_loop_split(parts, dispatch.SPLIT_MIN_ELEMENTS, fn, omat, gates,
                                              dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0, scratch,
                                              sizes, starts, rows_T, log)
        else:
            compiled.lstm_backward_loop(fn, omat, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0,
                                        scratch, sizes, starts, rows_T, log)
        self.gemm.tell_recorder(log, gates.dtype, self.ticks_to_seconds)

    @staticmethod
    def ticks_to_seconds(ticks):
        """Seconds of ``ticks`` of the time-stamp counter the compiled loops read (its rate
        measured once per process against ``time.perf_counter``, over 20 ms)."""
        global _TICK_HZ
        if _TICK_HZ is None:
            now = blas.ticks_now
            now()
            t0, k0 = time.perf_counter(), now()
            while time.perf_counter() - t0 < 0.02:
                pass
            _TICK_HZ = (now() - k0) / (time.perf_counter() - t0)
        return ticks / _TICK_HZ

    # -- optimizer and reducer ----------------------------------------------------------------

    def adam_update(self, p, g, m, v, lr, b1, b2, eps, bias1, bias2, bits=None):
        """Adam in place over the flat buffers; ``bits`` (uint16, p's size), when given,
        receives the updated parameters rounded to bf16 in the same pass."""
        if bits is None:
            dispatch.run(p.size, adam.adam, adam.adam_split, p, g, m, v, lr, b1, b2, eps, bias1,
                         bias2)
            return
        if p.dtype != np.float32 or bits.shape != p.shape or bits.dtype != np.uint16:
            raise ValueError("adam_update: bits must be uint16 of the float32 parameters' shape")
        dispatch.run(p.size, adam.adam_bf16, adam.adam_bf16_split, p, g, m, v, lr, b1, b2, eps,
                     bias1, bias2, bits)

    def quantize_add(self, acc, g, scale):
        """acc (int64) += rint(g * scale); returns max |g| (float)."""
        return float(fixedpoint.quantize_add(acc, g, scale))

    def quantize_add_rows(self, acc, ids, rows_, scale):
        """acc[ids[i]] (int64 rows) += rint(rows_[i] * scale), ids unique; returns max |rows_|."""
        return float(fixedpoint.quantize_add_rows(acc, ids, rows_, scale))
