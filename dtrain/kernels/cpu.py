"""Fused CPU kernels (Numba) for the hot elementwise work of a training step.

The plain xp code of the cells (``dtrain.nn.cells``), layers and optimizer is
the reference; these kernels do the same arithmetic in one pass over memory
instead of one pass per ufunc:

* each cell's step forward and backward (LSTM gates and c/h update, the RNN
  tanh, the GRU gates and h update), named as the cells ask for them
  (``lstm_step_forward`` ...),
* the softmax cross-entropy loss and its gradient, in place over the scores,
* Adam over the flat parameter buffer.

Numba compiles them on first use and caches them on disk. In float32 the LSTM
forward and the softmax hand their exp pass to NumPy's SIMD exp (see
``CpuKernels``); in float64 (the exactness checks) one-pass kernels run.
"""

from __future__ import annotations

import math

import numpy as np

_CPU = None


def _build_cpu():
    from numba import njit

    # error_model="numpy": a division by zero gives inf/nan instead of raising, so LLVM
    # may vectorise loops with divisions (with "python" every division is a branch).
    # Serial kernels: Numba's OpenMP threads spin after a parallel region and fight
    # OpenBLAS's threads for the cores (measured: 7x slower steps with parallel=True).
    # The hot loops run over one row at a time through 1-D views (ar = a[row]), which
    # LLVM vectorises; 2-D indexing a[row, H + j] with a runtime H stays scalar.
    opts = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}

    @njit(inline="always")
    def sigm(x):
        # logistic through tanh: stable for any finite x (no exp overflow)
        return 0.5 * (1.0 + math.tanh(0.5 * x))

    @njit(**opts)
    def lstm_fwd(a, r, prev_c, c, tc, h):
        n, G = a.shape
        H = G // 4
        for row in range(n):
            for j in range(H):
                i = sigm(a[row, j] + r[row, j])
                f = sigm(a[row, H + j] + r[row, H + j])
                o = sigm(a[row, 2 * H + j] + r[row, 2 * H + j])
                g = math.tanh(a[row, 3 * H + j] + r[row, 3 * H + j])
                a[row, j] = i
                a[row, H + j] = f
                a[row, 2 * H + j] = o
                a[row, 3 * H + j] = g
                cc = f * prev_c[row, j] + i * g
                c[row, j] = cc
                t = math.tanh(cc)
                tc[row, j] = t
                h[row, j] = o * t

    @njit(**opts)
    def lstm_bwd(d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc):
        n, G = a.shape
        H = G // 4
        dt = a.dtype.type
        one = dt(1.0)
        # rows n_next..n end their caption here: nothing carried from step t+1
        dh_rec[n_next:n] = 0
        dc_rec[n_next:n] = 0
        for row in range(n):
            ar, dr = a[row], d[row]
            i, f, o, g = ar[:H], ar[H : 2 * H], ar[2 * H : 3 * H], ar[3 * H :]
            di, df, do, dg = dr[:H], dr[H : 2 * H], dr[2 * H : 3 * H], dr[3 * H :]
            tcr, pcr, dhu, dhr, dcr = tc[row], prev_c[row], dh_up[row], dh_rec[row], dc_rec[row]
            for j in range(H):
                dh = dhu[j] + dhr[j]
                t = tcr[j]
                dc = dcr[j] + dh * o[j] * (one - t * t)
                di[j] = dc * g[j] * i[j] * (one - i[j])
                df[j] = dc * pcr[j] * f[j] * (one - f[j])
                do[j] = dh * t * o[j] * (one - o[j])
                dg[j] = dc * i[j] * (one - g[j] * g[j])
                dcr[j] = dc * f[j]

    @njit(**opts)
    def rnn_fwd(a, r):
        n, H = a.shape
        for row in range(n):
            for j in range(H):
                a[row, j] = math.tanh(a[row, j] + r[row, j])

    @njit(**opts)
    def rnn_bwd(d, dh_up, dh_rec, n_next, h):
        n, H = h.shape
        for row in range(n):
            carried = row < n_next
            for j in range(H):
                dh = dh_up[row, j]
                if carried:
                    dh += dh_rec[row, j]
                hv = h[row, j]
                d[row, j] = dh * (1.0 - hv * hv)

    @njit(**opts)
    def softmax_xent(scores, targets, inv_norm, row_loss):
        M, V = scores.shape
        for row in range(M):
            m = scores[row, 0]
            for k in range(1, V):
                if scores[row, k] > m:
                    m = scores[row, k]
            y = targets[row]
            shifted_y = scores[row, y] - m
            s = 0.0
            for k in range(V):
                e = math.exp(scores[row, k] - m)
                scores[row, k] = e
                s += e
            row_loss[row] = math.log(s) - shifted_y
            scale = inv_norm / s
            for k in range(V):
                scores[row, k] *= scale
            scores[row, y] -= inv_norm

    # Adam is memory-bound: keep its arithmetic in the buffer's dtype (no float64
    # promotion); with error_model="numpy" LLVM vectorises the sqrt and division
    # (IEEE, no fastmath: the same bits as the scalar loop).
    @njit(**opts)
    def adam(p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        dt = p.dtype.type
        step = dt(lr / bias1)
        inv_b2 = dt(1.0 / bias2)
        c1, c1m = dt(b1), dt(1.0 - b1)
        c2, c2m = dt(b2), dt(1.0 - b2)
        e = dt(eps)
        for k in range(p.size):
            gk = g[k]
            mk = c1 * m[k] + c1m * gk
            vk = c2 * v[k] + c2m * gk * gk
            m[k] = mk
            v[k] = vk
            p[k] -= step * mk / (np.sqrt(vk * inv_b2) + e)

    @njit(**opts)
    def lstm_preact(a, b, r):
        # a = -(a + b + r) for i, f, o and -2(a + b + r) for g, clamped to [-80, 80], so
        # that one vectorised exp pass gives every gate: sigmoid(z) = 1 / (1 + e^-z) and
        # tanh(z) = 2 / (1 + e^-2z) - 1, with no overflow anywhere. (a + b) + r is the
        # order of the plain path (x Wx + b first), so folding b in here changes no bit.
        n, G = a.shape
        H = G // 4
        dt = a.dtype.type
        lim, two = dt(80.0), dt(2.0)
        for row in range(n):
            ar, rr = a[row], r[row]
            for j in range(3 * H):
                z = -((ar[j] + b[j]) + rr[j])
                ar[j] = min(max(z, -lim), lim)
            for j in range(3 * H, G):
                z = -two * ((ar[j] + b[j]) + rr[j])
                ar[j] = min(max(z, -lim), lim)

    @njit(**opts)
    def lstm_cell(a, prev_c, c, tc):
        # a holds the exps; finish the gates, update c, and leave -2c (clamped) in tc
        n, G = a.shape
        H = G // 4
        dt = a.dtype.type
        one, two, lim = dt(1.0), dt(2.0), dt(80.0)
        for row in range(n):
            ar = a[row]
            i, f, g = ar[:H], ar[H : 2 * H], ar[3 * H :]
            for j in range(3 * H):
                ar[j] = one / (one + ar[j])
            for j in range(H):
                g[j] = two / (one + g[j]) - one
            pcr, cr, tcr = prev_c[row], c[row], tc[row]
            for j in range(H):
                cc = f[j] * pcr[j] + i[j] * g[j]
                cr[j] = cc
                tcr[j] = min(max(-two * cc, -lim), lim)

    @njit(**opts)
    def lstm_out(a, tc, h):
        # tc holds exp(-2c): tanh(c) = 2 / (1 + exp(-2c)) - 1; h = o * tanh(c)
        n, H = h.shape
        dt = h.dtype.type
        one, two = dt(1.0), dt(2.0)
        for row in range(n):
            o, tcr, hr = a[row, 2 * H : 3 * H], tc[row], h[row]
            for j in range(H):
                t = two / (one + tcr[j]) - one
                tcr[j] = t
                hr[j] = o[j] * t

    @njit(**opts)
    def softmax_shift(scores, b, targets, shifted_target):
        # scores + b (the vocabulary bias, added here rather than in a pass of its own),
        # minus each row's max (so exp cannot overflow); remember the target's shifted
        # logit. The max runs in 8 independent chains (a max is the same in any order).
        M, V = scores.shape
        for row in range(M):
            s = scores[row]
            m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = s[0] + b[0]
            k = 0
            while k + 8 <= V:
                m0, m1 = max(m0, s[k] + b[k]), max(m1, s[k + 1] + b[k + 1])
                m2, m3 = max(m2, s[k + 2] + b[k + 2]), max(m3, s[k + 3] + b[k + 3])
                m4, m5 = max(m4, s[k + 4] + b[k + 4]), max(m5, s[k + 5] + b[k + 5])
                m6, m7 = max(m6, s[k + 6] + b[k + 6]), max(m7, s[k + 7] + b[k + 7])
                k += 8
            m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
            for j in range(k, V):
                m = max(m, s[j] + b[j])
            for j in range(V):
                s[j] = (s[j] + b[j]) - m
            shifted_target[row] = s[targets[row]]

    @njit(**opts)
    def softmax_finish(probs, targets, shifted_target, inv_norm, row_loss, col_sum):
        # probs holds exp(shifted scores): normalise into the gradient, in place. The row
        # sum is float64 in 8 interleaved partial sums (lane k % 8), added pairwise.
        # col_sum (V,), unless empty, gets the gradient's column sums (the vocabulary
        # bias gradient), rows added in order as NumPy's sum(axis=0) does: the same bits.
        M, V = probs.shape
        dt = probs.dtype.type
        with_sum = col_sum.size > 0
        if with_sum:
            col_sum[:] = 0
        for row in range(M):
            p = probs[row]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
            k = 0
            while k + 8 <= V:
                s0, s1, s2, s3 = s0 + p[k], s1 + p[k + 1], s2 + p[k + 2], s3 + p[k + 3]
                s4, s5, s6, s7 = s4 + p[k + 4], s5 + p[k + 5], s6 + p[k + 6], s7 + p[k + 7]
                k += 8
            total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            for j in range(k, V):
                total += p[j]
            row_loss[row] = math.log(total) - shifted_target[row]
            scale = dt(inv_norm / total)
            for j in range(V):
                p[j] *= scale
            p[targets[row]] -= dt(inv_norm)
            if with_sum:
                for j in range(V):
                    col_sum[j] += p[j]

    @njit(**opts)
    def gru_fwd(a, r, prev_h, hn, h):
        # a: x Wx + b (r, z, n blocks), r: h Wh; leaves the activated r, z, n in a
        n, G = a.shape
        H = G // 3
        dt = a.dtype.type
        half, one = dt(0.5), dt(1.0)
        for row in range(n):
            for j in range(H):
                rg = half * (one + math.tanh(half * (a[row, j] + r[row, j])))
                z = half * (one + math.tanh(half * (a[row, H + j] + r[row, H + j])))
                hv = r[row, 2 * H + j]
                ng = math.tanh(a[row, 2 * H + j] + rg * hv)
                a[row, j] = rg
                a[row, H + j] = z
                a[row, 2 * H + j] = ng
                hn[row, j] = hv
                h[row, j] = ng + z * (prev_h[row, j] - ng)

    @njit(**opts)
    def gru_bwd(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, ph):
        n, G = a.shape
        H = G // 3
        dt = a.dtype.type
        one = dt(1.0)
        for row in range(n):
            carried = row < n_next
            for j in range(H):
                dh = dh_up[row, j]
                if carried:
                    dh += dh_rec[row, j]
                    dh += carry[row, j]
                rg = a[row, j]
                z = a[row, H + j]
                ng = a[row, 2 * H + j]
                dan = (one - z) * (one - ng * ng) * dh
                dar = dan * ((one - rg) * rg * hn[row, j])
                daz = (ph[row, j] - ng) * ((one - z) * z) * dh
                dax[row, j] = dar
                dax[row, H + j] = daz
                dax[row, 2 * H + j] = dan
                dah[row, j] = dar
                dah[row, H + j] = daz
                dah[row, 2 * H + j] = dan * rg
                carry[row, j] = dh * z

    @njit(**opts)
    def embed_grad_rows(words, dx, slot, ids, rows, col_sum):
        # the row-sparse embedding gradient: ids = the distinct words, ascending; rows[i] =
        # the sum of dx over the positions of ids[i], in position order. slot (V,) is -1
        # on entry and on exit; rows are summed in place (no gathered copy of dx).
        # col_sum, unless empty, gets the column sums of dx in row order (the same bits as
        # NumPy's dx.sum(axis=0)) from the same pass.
        M = words.size
        with_sum = col_sum.size > 0
        if with_sum:
            col_sum[:] = 0
        for k in range(M):
            slot[words[k]] = -2
        count = 0
        for w in range(slot.size):
            if slot[w] == -2:
                slot[w] = count
                ids[count] = w
                count += 1
        rows[:count] = 0
        for k in range(M):
            acc, src = rows[slot[words[k]]], dx[k]
            for j in range(acc.size):
                acc[j] += src[j]
            if with_sum:
                for j in range(acc.size):
                    col_sum[j] += src[j]
        for i in range(count):
            slot[ids[i]] = -1
        return count

    # --deterministic: fixed-point accumulation, one pass (see parallel/reducer.py)
    @njit(**opts)
    def quantize_add(acc, g, scale):
        m = 0.0
        for k in range(g.size):
            v = np.float64(g[k])
            a = abs(v)
            if a > m:
                m = a
            acc[k] += np.int64(np.rint(v * scale))
        return m

    @njit(**opts)
    def quantize_add_rows(acc, ids, rows, scale):
        m = 0.0
        n, W = rows.shape
        for i in range(n):
            r = ids[i]
            for j in range(W):
                v = np.float64(rows[i, j])
                a = abs(v)
                if a > m:
                    m = a
                acc[r, j] += np.int64(np.rint(v * scale))
        return m

    return (lstm_fwd, lstm_bwd, rnn_fwd, rnn_bwd, softmax_xent, adam,
            lstm_preact, lstm_cell, lstm_out, softmax_shift, softmax_finish, gru_fwd, gru_bwd,
            quantize_add, quantize_add_rows, embed_grad_rows)


class CpuKernels:
    """Numba kernels with the call signatures the cells, the model and Adam use."""

    name = "numba"

    def __init__(self, dtype):
        global _CPU
        if _CPU is None:
            _CPU = _build_cpu()
        (self._lstm_fwd, self._lstm_bwd, self._rnn_fwd, self._rnn_bwd,
         self._softmax_xent, self._adam, self._lstm_preact, self._lstm_cell, self._lstm_out,
         self._softmax_shift, self._softmax_finish, self._gru_fwd, self._gru_bwd,
         self._quantize_add, self._quantize_add_rows, self._embed_grad_rows) = _CPU
        self.dtype = np.dtype(dtype)
        self._row_loss = np.empty(0, dtype=np.float64)
        self._shifted = np.empty(0, dtype=self.dtype)
        self._zeros = np.empty(0, dtype=self.dtype)
        self._slot = np.empty(0, dtype=np.int64)  # word -> row of the sparse gradient; -1 between calls
        self._ids = np.empty(0, dtype=np.int64)
        self._rows = np.empty((0, 0), dtype=self.dtype)
        # Numba's tanh and exp are scalar libm calls; NumPy's float32 exp is SIMD
        # (about 4x faster than a scalar loop, 2x faster than its own tanh). In
        # float32 the gate and softmax kernels therefore hand one exp pass to
        # NumPy and fuse everything around it; in float64 (the exactness
        # checks) the one-pass kernels are used.
        self.hybrid = self.dtype == np.float32

    def lstm_step_forward(self, a, r, prev_c, c, tc, h, bias):
        """One LSTM step in place; ``a`` holds x Wx (its bias ``bias`` not yet added)."""
        n = a.shape[0]
        if not self.hybrid:
            a += bias
            self._lstm_fwd(a, r, prev_c[:n], c, tc, h)
            return
        self._lstm_preact(a, bias, r)
        np.exp(a, out=a)
        self._lstm_cell(a, prev_c[:n], c, tc)
        np.exp(tc, out=tc)
        self._lstm_out(a, tc, h)

    def lstm_step_backward(self, d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc):
        self._lstm_bwd(d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc)

    def rnn_step_forward(self, a, r):
        if self.hybrid:
            np.add(a, r, out=a)
            np.tanh(a, out=a)
        else:
            self._rnn_fwd(a, r)

    def rnn_step_backward(self, d, dh_up, dh_rec, n_next, h):
        self._rnn_bwd(d, dh_up, dh_rec, n_next, h)

    def gru_step_forward(self, a, r, prev_h, hn, h):
        self._gru_fwd(a, r, prev_h, hn, h)

    def gru_step_backward(self, dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h):
        self._gru_bwd(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h)

    def softmax_cross_entropy(self, scores, targets, normalizer, bias=None, bias_grad=None):
        """Loss (float) and, in place in ``scores``, its gradient; ``bias`` (V,), when
        given, is added to every row of ``scores`` first; ``bias_grad`` (V,), when given,
        receives the gradient's column sums (the gradient of ``bias``)."""
        M = scores.shape[0]
        if self._row_loss.size < M:
            self._row_loss = np.empty(M, dtype=np.float64)
        row_loss = self._row_loss[:M]
        if self.hybrid:
            if self._shifted.size < M:
                self._shifted = np.empty(M, dtype=self.dtype)
            shifted = self._shifted[:M]
            if bias is None:
                bias = self._zero_bias(scores.shape[1])
            self._softmax_shift(scores, bias, targets, shifted)
            np.exp(scores, out=scores)
            col_sum = self._zero_bias(0) if bias_grad is None else bias_grad
            self._softmax_finish(scores, targets, shifted, 1.0 / normalizer, row_loss, col_sum)
        else:
            if bias is not None:
                scores += bias
            self._softmax_xent(scores, targets, 1.0 / normalizer, row_loss)
            if bias_grad is not None:
                scores.sum(axis=0, out=bias_grad)
        return float(row_loss.sum()) / normalizer

    def _zero_bias(self, V):
        if self._zeros.size < V:
            self._zeros = np.zeros(V, dtype=self.dtype)
        return self._zeros[:V]

    def embedding_grad_sparse(self, words, dx, vocab_size, col_sum=None):
        """(ids, rows) as ``layers.embedding_grad_sparse``, in this object's buffers (views);
        ``col_sum`` (W,), when given, receives dx.sum(axis=0) from the same pass."""
        M, W = dx.shape
        if self._slot.size < vocab_size:
            self._slot = np.full(vocab_size, -1, dtype=np.int64)
        if self._ids.size < M or self._rows.shape[1] != W:
            self._ids = np.empty(max(M, 1), dtype=np.int64)
            self._rows = np.empty((max(M, 1), W), dtype=self.dtype)
        col_sum = self._zero_bias(0) if col_sum is None else col_sum
        count = self._embed_grad_rows(words, dx, self._slot[:vocab_size], self._ids, self._rows, col_sum)
        return self._ids[:count], self._rows[:count]

    def adam_update(self, p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        self._adam(p, g, m, v, lr, b1, b2, eps, bias1, bias2)

    def quantize_add(self, acc, g, scale):
        """acc (int64) += rint(g * scale); returns max |g| (float)."""
        return float(self._quantize_add(acc, g, scale))

    def quantize_add_rows(self, acc, ids, rows, scale):
        """acc[ids[i]] (int64 rows) += rint(rows[i] * scale), ids unique; returns max |rows|."""
        return float(self._quantize_add_rows(acc, ids, rows, scale))
