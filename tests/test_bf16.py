"""bf16 rounding and MKL's bf16 GEMM (dtrain/kernels/bf16.py) against float64 references.

The rounding is compared bit for bit with a float64 reference that picks the nearer of the
two bf16 neighbours (ties to the even one); the GEMM with the error bound of
docs/precision.md. The extra (pip ``mkl``) is part of the test extra, so these run wherever
the tests do; on a CPU without bf16 instructions the GEMM tests still run (MKL converts in
software) and ``available()`` refuses, which the capped-dispatch tests below show here too.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from dtrain.kernels import bf16

U_BF16 = 2.0**-8  # unit roundoff of bf16 (8-bit significand, the leading bit included)
U_F32 = 2.0**-24


def bf16_value(bits) -> np.ndarray:
    """float64 values of bf16 bit patterns, decoded from sign, exponent and fraction; the
    pattern of infinity decodes to 2^128, where the next binade would start, so that the
    nearest-neighbour reference below rounds overflow as IEEE does."""
    bits = np.asarray(bits, dtype=np.int64)
    sign = np.where(bits & 0x8000, -1.0, 1.0)
    exp, frac = (bits >> 7) & 0xFF, bits & 0x7F
    normal = np.ldexp(1.0 + frac / 128.0, exp - 127)
    subnormal = np.ldexp(frac / 128.0, -126)
    return sign * np.where(exp == 0, subnormal, normal)


def reference_round(x32: np.ndarray) -> np.ndarray:
    """bf16 bits of float32 values (no NaN) by float64 arithmetic: the nearer of the two bf16
    values that bracket x (the one whose pattern is x's upper half, and the next one away
    from zero), the one with the even pattern on a tie."""
    x = x32.astype(np.float64)
    low = (x32.view(np.uint32) >> 16).astype(np.int64)  # truncation: |low| <= |x|
    high = low + 1
    d_low, d_high = np.abs(x - bf16_value(low)), np.abs(bf16_value(high) - x)
    pick_high = (d_high < d_low) | ((d_high == d_low) & (low % 2 == 1))
    return np.where(pick_high, high, low).astype(np.uint16)


def special_bits() -> np.ndarray:
    f = [0x00000000, 0x80000000,  # signed zeros
         0x00000001, 0x00007FFF, 0x00008000, 0x00018000, 0x00008001,  # subnormal ties and not
         0x007F7FFF, 0x007F8000, 0x007FFFFF, 0x00800000,  # up to the smallest normal
         0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties to even: down, up; off tie
         0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,  # at bf16's largest: up to inf
         0x7F800000, 0xFF800000]  # infinities
    return np.array(f, dtype=np.uint32)


def test_rounding_matches_float64_reference_bit_for_bit():
    rng = np.random.default_rng(24)
    bits = np.concatenate([special_bits(), rng.integers(0, 2**32, 200_000, dtype=np.uint32)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    got = bf16.to_bf16(x)
    want = reference_round(x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(x[i:i + 1].view(np.uint32)[0]), hex(got[i]), hex(want[i]))
                           for i in bad[:5]]
    # the named cases: ties go to the even pattern, overflow to inf, subnormals stay subnormal
    named = bf16.to_bf16(special_bits().view(np.float32))
    assert list(named[11:15]) == [0x3F80, 0x3F82, 0x3F80, 0x3F81]
    assert list(named[15:19]) == [0x7F7F, 0x7F80, 0x7F80, 0xFF80]
    assert list(named[2:7]) == [0x0000, 0x0000, 0x0000, 0x0002, 0x0001]


def test_nan_stays_nan_with_its_sign_and_inf_stays_inf():
    # NaNs whose payload lies only in the bits that rounding drops (truncation would make
    # the first two infinities), quiet and signalling, both signs
    nan_bits = np.array([0x7F800001, 0xFF80FFFF, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF],
                        dtype=np.uint32)
    got = bf16.to_bf16(nan_bits.view(np.float32))
    assert np.isnan(bf16.from_bf16(got)).all()
    assert list(got >> 15) == list(nan_bits >> 31)
    inf = bf16.to_bf16(np.array([np.inf, -np.inf], np.float32))
    assert list(inf) == [0x7F80, 0xFF80]


def test_every_bf16_value_converts_back_to_itself():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = bf16.from_bf16(bits)
    finite = ~np.isnan(values)
    assert np.array_equal(bf16.to_bf16(values)[finite], bits[finite])
    real = np.isfinite(values)  # (bf16_value reads inf's pattern as 2^128)
    assert np.array_equal(values[real].astype(np.float64), bf16_value(bits[real]))


def test_scalar_and_row_kernels_agree_with_the_array_helper():
    @njit
    def fused(x, out):  # a kernel that computes a float32 value and stores it as bf16
        for i in range(x.shape[0]):
            out[i] = bf16.round_value(x[i] * np.float32(1.0))

    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, 4096, dtype=np.uint32).view(np.float32)
    x = x[~np.isnan(x)]
    want = bf16.to_bf16(x)
    scalar, row = np.empty_like(want), np.empty((2, x.size), np.uint16)
    fused(x, scalar)
    bf16.round_row(x[::-1], row[1, ::-1])  # strided source and destination
    assert np.array_equal(scalar, want) and np.array_equal(row[1], want)


def gemm_bound(a64, b64, c0, alpha, beta, k):
    """Per-element bound of docs/precision.md on |C - (alpha op(a) op(b) + beta C0)| with a,
    b the float32 inputs before rounding to bf16: operand rounding (2u + u^2) |alpha| S, with
    S = sum |a||b|, plus float32 accumulation and the alpha/beta updates
    gamma_{k+2} (|alpha| (1 + u)^2 S + |beta| |C0|)."""
    s = np.abs(a64) @ np.abs(b64)
    gamma = (k + 2) * U_F32 / (1 - (k + 2) * U_F32)
    return (abs(alpha) * (2 * U_BF16 + U_BF16**2) * s
            + gamma * (abs(alpha) * (1 + U_BF16) ** 2 * s + abs(beta) * np.abs(c0)))


def run_gemm(m, k, n, trans_a, trans_b, alpha, beta, rng, rows=None):
    """(result, float64 exact result of the float32 inputs, bound), a and b rounded by to_bf16."""
    a32 = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
    b32 = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
    c0 = rng.standard_normal((m, n), dtype=np.float32)
    out = c0.copy()
    a, b = bf16.to_bf16(a32), bf16.to_bf16(b32)
    if rows is None:
        bf16.gemm(a, b, out, trans_a, trans_b, alpha, beta)
    else:  # the compiled form, a block of rows at a time (as a pool's threads would)
        fn = bf16.library().gemm_address
        bf16.check_operands(a, b, out, trans_a, trans_b)
        for lo, hi in zip(rows[:-1], rows[1:]):
            bf16.gemm_rows(fn, a, b, out, trans_a, trans_b, alpha, beta, lo, hi)
    a64 = (a32.T if trans_a else a32).astype(np.float64)
    b64 = (b32.T if trans_b else b32).astype(np.float64)
    exact = alpha * (a64 @ b64) + beta * c0.astype(np.float64)
    return out, exact, gemm_bound(a64, b64, c0, alpha, beta, k)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (1.0, 1.0), (-0.5, 2.0)])
def test_gemm_within_the_bf16_bound_of_float64(trans_a, trans_b, alpha, beta):
    rng = np.random.default_rng(7)
    out, exact, bound = run_gemm(67, 515, 131, trans_a, trans_b, alpha, beta, rng)
    err = np.abs(out - exact)
    assert (err <= bound).all(), float((err / bound).max())
    # the bound is not vacuous: bf16 operands are visibly coarser than float32's would be
    assert err.max() > 64 * U_F32 * np.abs(exact).max()


def test_gemm_rows_in_blocks_match_the_bound_in_every_layout():
    rng = np.random.default_rng(8)
    for trans_a in (False, True):
        for trans_b in (False, True):
            out, exact, bound = run_gemm(128, 512, 96, trans_a, trans_b, 1.0, 1.0, rng,
                                         rows=[0, 37, 64, 64, 128])
            assert (np.abs(out - exact) <= bound).all(), (trans_a, trans_b)


def test_row_blocks_give_the_bits_of_the_whole_gemm():
    # sequential MKL sums each row of out over k in an order that does not depend on how
    # the rows are blocked: the bits of a row are the same whichever rank or thread computes
    # it with whatever neighbours (what --deterministic --precision bf16 can build on)
    fn = bf16.library().gemm_address
    rng = np.random.default_rng(12)
    for m, k, n, trans_a in ((128, 512, 2048, False), (100, 512, 1004, False),
                             (512, 640, 256, True)):
        a = bf16.to_bf16(rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32))
        b = bf16.to_bf16(rng.standard_normal((k, n), dtype=np.float32))
        whole = np.zeros((m, n), np.float32)
        bf16.gemm_arrays(fn, a, b, whole, trans_a, False, 1.0, 0.0)
        for parts in (2, 3, 4):
            blocks = np.zeros((m, n), np.float32)
            for p in range(parts):
                bf16.gemm_rows(fn, a, b, blocks, trans_a, False, 1.0, 0.0, p * m // parts,
                               (p + 1) * m // parts)
            assert np.array_equal(blocks, whole), (m, k, n, trans_a, parts)


def test_gemm_rows_from_the_threads_of_a_parallel_loop():
    # the way the kernels' pool would split one GEMM: each thread its block of rows, MKL
    # sequential on every thread at once
    from numba import prange

    @njit(parallel=True)
    def split(fn, a, b, out, parts):
        m = out.shape[0]
        for p in prange(parts):
            bf16.gemm_rows(fn, a, b, out, True, False, 1.0, 0.0, p * m // parts,
                           (p + 1) * m // parts)

    rng = np.random.default_rng(11)
    a32 = rng.standard_normal((256, 200), dtype=np.float32)  # op(a) = a.T, 200 x 256
    b32 = rng.standard_normal((256, 96), dtype=np.float32)
    out = np.full((200, 96), np.nan, np.float32)
    split(bf16.library().gemm_address, bf16.to_bf16(a32), bf16.to_bf16(b32), out, 4)
    a64, b64 = a32.T.astype(np.float64), b32.astype(np.float64)
    bound = gemm_bound(a64, b64, out * 0, 1.0, 0.0, 256)
    assert (np.abs(out - a64 @ b64) <= bound).all()


def test_gemm_on_row_views_and_from_compiled_code():
    rng = np.random.default_rng(9)
    big_a = bf16.to_bf16(rng.standard_normal((40, 80), dtype=np.float32))
    big_b = bf16.to_bf16(rng.standard_normal((80, 50), dtype=np.float32))
    a, b = big_a[5:25, 10:43], big_b[3:36, 7:30]  # rows farther apart than their length
    out = np.full((40, 60), np.nan, np.float32)
    view = out[10:30, 20:43]
    bf16.gemm(a, b, view)  # beta = 0: the NaNs it overwrites are never read
    fa, fb = bf16.from_bf16(a).astype(np.float64), bf16.from_bf16(b).astype(np.float64)
    exact, s = fa @ fb, np.abs(fa) @ np.abs(fb)
    # the operands are bf16 already: only float32 accumulation, gamma_k S with k = 33
    assert (np.abs(view - exact) <= 34 * U_F32 * s).all()
    assert np.isnan(out[:10]).all() and np.isnan(out[10:30, :20]).all()

    @njit
    def twice(fn, a, b, out):  # a compiled loop calling the GEMM twice, adding the second
        bf16.gemm_arrays(fn, a, b, out, False, False, 1.0, 0.0)
        bf16.gemm_arrays(fn, a, b, out, False, False, 1.0, 1.0)

    out2 = np.empty((20, 23), np.float32)
    twice(bf16.library().gemm_address, np.ascontiguousarray(a), np.ascontiguousarray(b), out2)
    assert (np.abs(out2 - 2 * exact) <= 2 * 35 * U_F32 * s).all()


@pytest.mark.parametrize("args,fragment", [
    (lambda: (np.zeros((2, 3), np.float32), np.zeros((3, 4), np.uint16),
              np.zeros((2, 4), np.float32)), "a must be a NumPy uint16"),
    (lambda: (np.zeros((2, 3), np.uint16), np.zeros((4, 4), np.uint16),
              np.zeros((2, 4), np.float32)), "does not give out"),
    (lambda: (np.zeros((2, 3), np.uint16), np.zeros((3, 4), np.uint16),
              np.zeros((4, 2), np.float32).T), "out needs unit column stride"),
])
def test_gemm_refuses_bad_operands_by_name(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        bf16.gemm(*args())


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_available_on_this_cpu_names_the_code_path():
    ok, reason = bf16.available()
    assert "\n" not in reason
    if "amx_bf16" in cpu_flags():
        assert ok and "code path amx" in reason, reason
    else:
        assert not ok and "slower than float32" in reason, reason


CHILD = """
import sys
import numpy as np
from dtrain.kernels import bf16
if sys.argv[1] == "missing":
    bf16.find_mkl_rt = lambda: None
ok, reason = bf16.available()
print(ok, bf16.library().code_path if ok or sys.argv[1] != "missing" else "-")
print(reason)
if sys.argv[1] != "missing":  # the GEMM still computes: one small product, checked
    a = bf16.to_bf16(np.arange(12, dtype=np.float32).reshape(3, 4))
    out = np.zeros((3, 3), np.float32)
    bf16.gemm(a, a, out, trans_b=True)
    f = bf16.from_bf16(a).astype(np.float64)
    print(np.array_equal(out, f @ f.T))
"""


def child(mode, **env):
    import os

    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_without_the_extra_available_says_how_to_install_it():
    lines = child("missing")
    assert lines[0] == "False -"
    assert "pip install -e '.[bf16]'" in lines[1]


@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="capping needs a CPU with bf16")
def test_as_on_cpus_without_amx_or_without_bf16():
    # MKL_ENABLE_INSTRUCTIONS caps MKL's dispatch below this CPU: AVX512-BF16 without AMX,
    # and AVX-512 without BF16 (MKL converts in software). Both are refused as slower than
    # float32, each naming what MKL dispatches to, and the product is still right
    lines = child("cap", MKL_ENABLE_INSTRUCTIONS="AVX512_E3")
    assert lines[0] == "False avx512_bf16" and "AVX512-BF16 without AMX" in lines[1], lines
    assert lines[2] == "True", lines
    lines = child("cap", MKL_ENABLE_INSTRUCTIONS="AVX512")
    assert lines[0] == "False none" and "no bf16 unit" in lines[1], lines
    assert lines[2] == "True", lines


def test_subnormal_operands_stay_within_the_absolute_term():
    # AMX and AVX512-BF16 treat subnormal bf16 inputs and float32 results as zero: the bound
    # gains an absolute term, (k + 2) 2^-126 per element for |alpha| <= 1 and |b| <= 1
    rng = np.random.default_rng(10)
    k = 64
    a32 = (rng.standard_normal((16, k)) * 2.0**-128).astype(np.float32)  # mostly subnormal
    b32 = rng.uniform(-1, 1, (k, 8)).astype(np.float32)
    out = np.zeros((16, 8), np.float32)
    bf16.gemm(bf16.to_bf16(a32), bf16.to_bf16(b32), out)
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    bound = gemm_bound(a64, b64, out * 0, 1.0, 0.0, k) + (k + 2) * 2.0**-126
    assert (np.abs(out - a64 @ b64) <= bound).all()
