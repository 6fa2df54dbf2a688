"""KernelSet, the base of every kernel set: its GEMM seam, and the LSTM recurrence it owns.

A kernel set (``cpu.CpuKernels``, ``cuda.GpuKernels``) holds its ``gemm`` (the one
call site of the step's GEMMs, ``gemm.py``) and says what it can do in one
``Capabilities`` record; ``plan_lstm`` turns that and the shape into a
``RecurrencePlan`` once per shape, and ``KernelSet`` runs the packed time loop as
that plan says: the compiled whole loop, or a
Python loop over the set's fused step kernels with the recurrent GEMM accumulating
into the gate rows or apart, and the backward reading the recurrent GEMM's result
transposed or not. Every variant computes the same function; the variants that the
tests compare bit for bit are named in tests/test_pool.py. The plain xp reference
stays in ``nn/cells/lstm.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..nn.workspace import buffer, zeros_buffer
from .gemm import (
    PLAIN,
    TRANSPOSED_BACKWARD_ROWS,
    array_module,
    recurrent_backward,
    recurrent_backward_T,
    recurrent_scratch,
)


@dataclass(frozen=True)
class Capabilities:
    """What a kernel set offers the recurrence (none of it: the fused steps alone).

    ``step_writes_prev_h``: ``lstm_step_forward(..., h_next=)`` also writes the next
    step's prev_h rows. ``gemm_accumulates``: ``gemm.accumulate`` adds a product to its
    output in the GEMM (beta = 1), and ``lstm_step_forward`` takes ``r=None``.
    ``compiled_loops``: ``lstm_forward_loop`` / ``lstm_backward_loop`` run a whole loop.
    ``backward_in_place``: the backward step writes the gate gradients over the gates.
    ``backward_reads_transposed``: ``lstm_step_backward(..., dh_rec_T=)`` copies its dh_rec
    rows from the recurrent GEMM's (H, n) result itself.
    """

    step_writes_prev_h: bool = False
    gemm_accumulates: bool = False
    compiled_loops: bool = False
    backward_in_place: bool = False
    backward_reads_transposed: bool = False


@dataclass(frozen=True)
class RecurrencePlan:
    """How one LSTM recurrence runs. Invariants (checked): accumulating needs the prev_h
    rows written by the steps, the compiled forward needs accumulating, reading
    transposed needs the backward in place, the compiled backward needs reading
    transposed. ``parts``: threads a compiled loop splits a step's gate kernel over."""

    copies_prev_h: bool = False
    accumulate: bool = False
    compiled_forward: bool = False
    in_place: bool = False
    reads_transposed: bool = False
    compiled_backward: bool = False
    parts: int = 1

    def __post_init__(self):
        needs = (
            ("accumulate", "copies_prev_h"),
            ("compiled_forward", "accumulate"),
            ("reads_transposed", "in_place"),
            ("compiled_backward", "reads_transposed"),
        )
        for field, needed in needs:
            if getattr(self, field) and not getattr(self, needed):
                raise ValueError(f"RecurrencePlan: {field} needs {needed}")


def plan_lstm(capabilities, host, contiguous, parts=1):
    """The plan for a kernel set with ``capabilities``: ``host`` (NumPy arrays: the backward
    has its transposed-GEMM scratch), ``contiguous`` (h0 and Wh C-contiguous, as the
    accumulating GEMM takes them), ``parts`` (the shared pool's threads)."""
    caps = capabilities
    accumulate = caps.step_writes_prev_h and caps.gemm_accumulates and contiguous
    reads_T = caps.backward_in_place and host and caps.backward_reads_transposed
    return RecurrencePlan(
        copies_prev_h=caps.step_writes_prev_h,
        accumulate=accumulate,
        compiled_forward=accumulate and caps.compiled_loops,
        in_place=caps.backward_in_place,
        reads_transposed=reads_T,
        compiled_backward=reads_T and caps.compiled_loops,
        parts=max(1, int(parts)),
    )


class KernelSet:
    """The base of a kernel set: ``gemm``, ``capabilities`` and the LSTM's packed time loop.

    A kernel set offers ``lstm_step_forward`` / ``lstm_step_backward`` and, as its
    ``capabilities`` say, ``lstm_forward_loop`` / ``lstm_backward_loop``.
    """

    capabilities = Capabilities()
    gemm = PLAIN
    _fixed_plan = None

    def threads(self):
        """Threads a compiled loop may split over (1 unless the kernel set has a pool)."""
        return 1

    def copy_transposed(self, src, out):
        """``out[...] = src.T``."""
        out[...] = src.T
        return out

    def lstm_plan(self, h0, Wh):
        """The plan for this shape (one per kernel set and layout; or the one fixed by
        ``with_plan``)."""
        if self._fixed_plan is not None:
            return self._fixed_plan
        key = (
            isinstance(h0, np.ndarray),
            h0.flags.c_contiguous and Wh.flags.c_contiguous,
            self.threads(),
        )
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = plan_lstm(self.capabilities, *key)
        return plan

    def with_plan(self, plan):
        """This kernel set (its buffers shared) running every recurrence as ``plan`` says."""
        other = copy.copy(self)
        other._fixed_plan = plan
        return other

    def lstm_recurrence_forward(self, gates, C, TC, Hp, h0, Wh, b, batch_sizes, offsets, ws=None):
        """The packed forward time loop: ``gates`` holds x Wx (b not added) and receives the
        activated gates; C, tanh(C) and H into ``C``, ``TC``, ``Hp``. Returns the stacked
        prev_h rows (dWh's GEMM operand) when the steps wrote them, else None."""
        plan = self.lstm_plan(h0, Wh)
        xp = array_module(gates)
        total, H = Hp.shape
        n0 = batch_sizes[0] if batch_sizes else 0
        PH = None
        if plan.copies_prev_h:
            PH = buffer(ws, "lstm_prev_h", (total, H), Hp.dtype, xp)
            PH[:n0] = h0[:n0]
        zero_c = zeros_buffer(ws, "lstm_c0", (n0, H), Hp.dtype, xp)
        if plan.compiled_forward:
            self.lstm_forward_loop(
                gates, C, TC, Hp, PH, h0, zero_c, Wh, b, batch_sizes, offsets, plan.parts
            )
            return PH
        rec = None if plan.accumulate else buffer(ws, "lstm_rec", (n0, 4 * H), Hp.dtype, xp)
        # A Gemm that rounds its operands (bf16) gets H's and prev_h's roundings from the
        # step kernel that writes them (twins), not from a pass of its own per GEMM.
        h_bits = self.gemm.twin(Hp, "lstm_h")
        ph_bits = None if PH is None or h_bits is None else self.gemm.twin(PH, "lstm_prev_h")
        if ph_bits is not None:
            self.gemm.round_into(PH[:n0], ph_bits[:n0])  # h0's rows: the one rounding here
        prev_h, prev_c, T = h0, zero_c, len(batch_sizes)
        for t, n in enumerate(batch_sizes):
            s = offsets[t]
            a, c, tc, h = gates[s : s + n], C[s : s + n], TC[s : s + n], Hp[s : s + n]
            if plan.accumulate:
                self.gemm.accumulate(prev_h[:n], Wh, a)
                r = None
            else:
                r = rec[:n]
                self.gemm.matmul(prev_h[:n], Wh, r)
            h_next = PH[s + n : s + n + batch_sizes[t + 1]] if PH is not None and t + 1 < T \
                else None
            if h_bits is not None:
                hn_bits = None if h_next is None else ph_bits[s + n : s + n + len(h_next)]
                self.lstm_step_forward(a, r, prev_c, c, tc, h, b, h_next=h_next,
                                       bits=(h_bits[s : s + n], hn_bits))
            elif PH is None:
                self.lstm_step_forward(a, r, prev_c, c, tc, h, b)
            else:
                self.lstm_step_forward(a, r, prev_c, c, tc, h, b, h_next=h_next)
            prev_h, prev_c = h, c
        return PH

    def lstm_recurrence_backward(
        self, dH, gates, C, TC, h0, Wh, dh0, batch_sizes, offsets, ws=None
    ):
        """The packed backward time loop: the gradient of every step's pre-activations
        (returned: ``gates`` itself when the plan works in place), dh0's first n0 rows
        written. ``gates``, ``C``, ``TC`` as the forward left them."""
        plan = self.lstm_plan(h0, Wh)
        xp = array_module(gates)
        total, H = TC.shape
        dtype, host = TC.dtype, xp is np
        n0 = batch_sizes[0] if batch_sizes else 0
        da = gates if plan.in_place else buffer(ws, "lstm_da", (total, 4 * H), dtype, xp)
        dh_rec = buffer(ws, "lstm_dh_rec", (n0, H), dtype, xp)
        # On the host, no zeroing pass over the carried gradients: a step reads dh_rec and
        # dc_rec only in the rows the step after it wrote (the step kernel zeroes the
        # others itself), and dh0's first n0 rows are written by step 0.
        dc_rec = buffer(ws, "lstm_dc_rec", (n0, H), dtype, xp, zero=not host)
        zero_c = zeros_buffer(ws, "lstm_c0", (n0, H), dtype, xp)
        scratch = recurrent_scratch(ws, n0, H, dtype, xp)
        if plan.compiled_backward:
            self.lstm_backward_loop(
                gates,
                dH,
                dh_rec,
                dc_rec,
                C,
                zero_c,
                TC,
                Wh,
                dh0,
                scratch,
                batch_sizes,
                offsets,
                TRANSPOSED_BACKWARD_ROWS,
                plan.parts,
            )
            return da
        # a rounding Gemm (bf16) gets the gate gradients' rounding from the step kernel
        d_bits = self.gemm.twin(da, "lstm_da")
        extra = {}
        pending_T = None  # step t+1's dh_rec, transposed
        for t in range(len(batch_sizes) - 1, -1, -1):
            n, s = batch_sizes[t], offsets[t]
            n_next = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
            prev_c = C[offsets[t - 1] : offsets[t - 1] + n] if t > 0 else zero_c[:n]
            a = gates[s : s + n]
            d = a if plan.in_place else da[s : s + n]
            if d_bits is not None:
                extra["bits"] = d_bits[s : s + n]
            if plan.reads_transposed:
                self.lstm_step_backward(
                    d,
                    dH[s : s + n],
                    dh_rec,
                    dc_rec,
                    n_next,
                    a,
                    prev_c,
                    TC[s : s + n],
                    dh_rec_T=pending_T,
                    **extra,
                )
            else:
                self.lstm_step_backward(
                    d, dH[s : s + n], dh_rec, dc_rec, n_next, a, prev_c, TC[s : s + n], **extra
                )
            if plan.reads_transposed and t > 0 and n <= TRANSPOSED_BACKWARD_ROWS:
                pending_T = recurrent_backward_T(d, Wh, scratch, self)
            else:
                pending_T = None
                recurrent_backward(
                    d, Wh, (dh_rec if t > 0 else dh0)[:n], scratch=scratch, kernels=self
                )
        return da
