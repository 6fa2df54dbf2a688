"""The GPU path: CuPy backend, fused CUDA kernels, the fixed-shape mode, CUDA graphs.

Tests marked ``gpu`` need CuPy and a CUDA device and skip with that reason
elsewhere (CI has no GPU); tests/gpu_check.sh runs them with the benchmark.
The fixed-shape mode itself is plain xp code and is checked on the CPU too,
as is the one-line error of ``--device gpu`` on a machine without a GPU.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from dtrain.backend import gpu_available
from dtrain.nn import layers
from dtrain.nn.cells import lstm, rnn
from dtrain.nn.model import (
    CaptioningModel,
    _embedding_grad_segments_xp,
    _masked_softmax_xp,
    fixed_batch,
)
from dtrain.nn.optim import Adam
from helpers import norm_error, small_vocab

HAVE_GPU = gpu_available()
NO_GPU_REASON = "needs CuPy and a CUDA device (none found here)"


def gpu_test(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU_REASON)(fn))


V = 50
W2I = small_vocab(V)
DIMS = {"input_dim": 16, "wordvec_dim": 12, "hidden_dim": 20}


def make_batch(rng, N=11, slots=12, max_len=10):
    """Captions (N, slots+1) of random lengths up to max_len words (row 0 the
    longest), one empty, one with a <NULL> inside."""
    caps = np.zeros((N, slots + 1), np.int32)
    for n in range(N):
        L = max_len if n == 0 else int(rng.integers(1, max_len + 1))
        caps[n, 0], caps[n, 1 : L + 1] = 1, rng.integers(3, V, L)
        if L + 1 <= slots:
            caps[n, L + 1] = 2
    caps[3 % N, 2] = 0
    caps[5 % N, 1:] = 0
    return rng.standard_normal((N, DIMS["input_dim"])), caps


def rel_err(a, b):
    return norm_error(a, b)


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ---------------------------------------------------------------------------
# CPU: the fixed-shape mode and the device error


def test_fixed_batch_layout():
    rng = np.random.default_rng(0)
    _, caps = make_batch(rng)
    fb = fixed_batch(caps, 0)
    N = caps.shape[0]
    mask = caps[:, 1:] != 0
    lengths = [int(np.flatnonzero(m)[-1]) + 1 if m.any() else 0 for m in mask]
    assert fb.N == N and fb.T == max(lengths)
    M = fb.N * fb.T
    for a in (fb.words, fb.targets, fb.weights, fb.order, fb.ids):
        assert a.shape == (M,)
    assert fb.seg_start.shape == (M + 1,)
    # time-major: position t*N + n
    assert fb.words[1 * N + 4] == caps[4, 1] and fb.targets[2 * N + 7] == caps[7, 3]
    assert fb.weights.sum() == mask.sum() == fb.num_tokens
    # the segments cover exactly the positions inside a caption, grouped by word
    inside = sorted(t * N + n for n in range(N) for t in range(lengths[n]))
    S = fb.num_ids
    covered = fb.order[: fb.seg_start[S]]
    assert sorted(covered.tolist()) == inside
    for s in range(S):
        seg = fb.order[fb.seg_start[s] : fb.seg_start[s + 1]]
        assert len(seg) > 0 and np.all(fb.words[seg] == fb.ids[s])
        assert np.all(np.diff(seg) > 0)  # stable: summed in position order
    assert np.all(np.diff(fb.ids[:S]) > 0) and np.all(fb.ids[S:] == -1)
    assert np.all(fb.seg_start[S:] == fb.seg_start[S])


@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_fixed_mode_matches_packed_on_cpu(cell, use_kernels):
    """forward_backward_fixed (all rows all steps, masked) == the packed pass, float64."""
    rng = np.random.default_rng(1)
    model = CaptioningModel(W2I, **DIMS, cell_type=cell, dtype=np.float64, seed=2,
                            use_kernels=use_kernels)
    feats, caps = make_batch(rng)
    lp, gp = model.loss(feats, caps, normalizer=7)
    packed = model.forward_backward(feats, model.pack(caps), 7)
    ids_p, rows_p = packed.embed_ids.copy(), packed.embed_rows.copy()
    fixed = model.forward_backward_fixed(feats, fixed_batch(caps, 0, np.float64), 7)
    lf, gf = fixed.loss, model.grads
    assert fixed.embed_dense
    assert abs(float(lf) - lp) <= 1e-12 * abs(lp)
    for k in gp:
        assert rel_err(gf[k], gp[k]) < 1e-12, k
    ids_f, rows_f = fixed.embed_ids, fixed.embed_rows
    assert np.array_equal(ids_f, ids_p)
    assert rel_err(rows_f, rows_p) < 1e-12


@pytest.mark.skipif(HAVE_GPU, reason="a GPU is present: the error path needs a machine without one")
@pytest.mark.parametrize("argv", [["train", "--steps", "1"], ["bench", "--steps", "1"]])
def test_device_gpu_without_gpu_is_a_one_line_error(argv):
    proc = subprocess.run([sys.executable, "-m", "dtrain", *argv, "--device", "gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--device gpu" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------
# GPU: kernels against the plain xp reference


def _gk(dtype):
    from dtrain.kernels.cuda import GpuKernels

    return GpuKernels(dtype)


TOL = {np.float64: 1e-12, np.float32: 2e-5}


@gpu_test
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_recurrence_kernels_match_plain_xp(cell, dtype):
    import cupy as cp

    rng = np.random.default_rng(3)
    D, H = 9, 33
    G = 4 * H if cell == "lstm" else H
    batch_sizes = [7, 7, 5, 3, 3, 1]  # rows leave the batch: exercises n_next < n
    total = sum(batch_sizes)
    x = cp.asarray(rng.standard_normal((total, D)), dtype=dtype)
    h0 = cp.asarray(rng.standard_normal((7, H)), dtype=dtype)
    Wx = cp.asarray(rng.standard_normal((D, G)) / 3, dtype=dtype)
    Wh = cp.asarray(rng.standard_normal((H, G)) / 5, dtype=dtype)
    b = cp.asarray(rng.standard_normal(G), dtype=dtype)
    dH = cp.asarray(rng.standard_normal((total, H)), dtype=dtype)
    fwd = lstm.lstm_packed_forward if cell == "lstm" else rnn.rnn_packed_forward
    bwd = lstm.lstm_packed_backward if cell == "lstm" else rnn.rnn_packed_backward
    outs = []
    for kern in (None, _gk(dtype)):
        Hp, cache = fwd(x, h0, Wx, Wh, b, batch_sizes, None, kern)
        grads = bwd(dH, cache, None, kern)
        outs.append([host(Hp)] + [host(g) for g in grads])
    for ref, got in zip(*outs):
        assert rel_err(got, ref) < TOL[dtype]


@gpu_test
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_kernels_match_plain_xp(dtype):
    import cupy as cp

    rng = np.random.default_rng(4)
    M, Vs = 37, 1004
    s0 = rng.standard_normal((M, Vs)) * 3
    s0[0, :3] = [1e4, -1e4, 0.0]  # extreme logits stay finite
    targets = rng.integers(0, Vs, M).astype(np.int32)
    weights = (rng.random(M) < 0.7).astype(dtype)
    k = _gk(dtype)
    # unmasked (packed path): loss returned as a float
    ref_loss, ref_d = layers.softmax_cross_entropy(cp.asarray(s0, dtype), cp.asarray(targets), 5.0)
    s = cp.asarray(s0, dtype)
    loss = k.softmax_cross_entropy(s, cp.asarray(targets), 5.0)
    assert abs(loss - ref_loss) <= TOL[dtype] * 10 * abs(ref_loss)
    assert rel_err(host(s), host(ref_d)) < TOL[dtype] * 10 and np.all(np.isfinite(host(s)))
    # masked (fixed-shape path): per-row losses on the device
    sr, rl_ref = cp.asarray(s0, dtype), cp.zeros(M, np.float64)
    _masked_softmax_xp(sr, cp.asarray(targets), cp.asarray(weights), 5.0, rl_ref)
    sk, rl = cp.asarray(s0, dtype), cp.zeros(M, np.float64)
    k.softmax_cross_entropy_masked(sk, cp.asarray(targets), cp.asarray(weights), 5.0, rl)
    assert rel_err(host(rl), host(rl_ref)) < TOL[dtype] * 10
    assert rel_err(host(sk), host(sr)) < TOL[dtype] * 10
    assert np.all(host(sk)[weights == 0] == 0)


@gpu_test
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_kernels_match_plain_xp(dtype):
    import cupy as cp

    rng = np.random.default_rng(5)
    n = 100_003
    p0 = rng.standard_normal(n)
    fused = Adam(n, lr=3e-3, xp=cp, dtype=dtype, kernels=_gk(dtype))
    plain = Adam(n, lr=3e-3, xp=cp, dtype=dtype)
    p1, p2 = cp.asarray(p0, dtype), cp.asarray(p0, dtype)
    p3, m3, v3 = cp.asarray(p0, dtype), cp.zeros(n, dtype), cp.zeros(n, dtype)
    k = _gk(dtype)
    for t in range(1, 5):
        g = cp.asarray(rng.standard_normal(n), dtype)
        fused.step(p1, g)
        plain.step(p2, g)
        hyper = cp.asarray([3e-3 / (1 - 0.9**t), 1 / (1 - 0.999**t)])
        k.adam_update_device(p3, g, m3, v3, hyper, 0.9, 0.999, 1e-8)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert rel_err(host(p1), host(p2)) < tol and rel_err(host(fused.m), host(plain.m)) < tol
    # the device-scalar variant (inside graphs) is the same arithmetic, bit for bit
    assert cp.array_equal(p1, p3) and cp.array_equal(fused.m, m3) and cp.array_equal(fused.v, v3)


@gpu_test
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_kernel_matches_plain_xp(dtype):
    import cupy as cp

    rng = np.random.default_rng(6)
    _, caps = make_batch(rng, N=13)
    fb = fixed_batch(caps, 0, dtype)
    M, Wd = fb.N * fb.T, 12
    dx = cp.asarray(rng.standard_normal((M, Wd)), dtype)
    args = [cp.asarray(a) for a in (fb.order, fb.seg_start, fb.ids)]
    rows_r, dense_r = cp.zeros((M, Wd), dtype), cp.zeros((V, Wd), dtype)
    _embedding_grad_segments_xp(dx, *args, rows_r, dense_r)
    rows_k, dense_k = cp.full((M, Wd), np.nan, dtype), cp.full((V, Wd), np.nan, dtype)
    _gk(dtype).embedding_grad_segments(dx, *args, rows_k, dense_k)
    S = fb.num_ids
    assert rel_err(host(rows_k)[:S], host(rows_r)[:S]) < TOL[dtype]
    assert rel_err(host(dense_k), host(dense_r)) < TOL[dtype]


# ---------------------------------------------------------------------------
# GPU: the model against the CPU, graphs against eager, training


def _pair(cell, dtype, seed=2):
    import cupy as cp

    cpu = CaptioningModel(W2I, **DIMS, cell_type=cell, dtype=dtype, seed=seed, use_kernels=False)
    gpu = CaptioningModel(W2I, **DIMS, cell_type=cell, dtype=dtype, seed=seed, xp=cp)
    assert gpu.kernels is not None and gpu.kernels.name == "cuda"
    return cpu, gpu


@gpu_test
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_gpu_loss_and_gradients_match_cpu(cell, dtype, tol):
    import cupy as cp

    rng = np.random.default_rng(7)
    cpu, gpu = _pair(cell, dtype)
    feats, caps = make_batch(rng, N=24)
    lc, gc = cpu.loss(feats, caps, normalizer=24)
    gc = {k: v.copy() for k, v in gc.items()}
    # packed path on the GPU (what evaluation uses)
    lg, gg = gpu.loss(cp.asarray(feats), caps, normalizer=24)
    assert abs(lg - lc) <= tol * abs(lc)
    for k in gc:
        assert rel_err(host(gg[k]), gc[k]) < tol, ("packed", k)
    # fixed-shape path on the GPU (what training uses)
    fb = fixed_batch(caps, 0, dtype)
    dev = {f: cp.asarray(getattr(fb, f))
           for f in ("words", "targets", "weights", "order", "seg_start", "ids")}
    fbd = type(fb)(**{**fb.__dict__, **dev})
    lf, gf = gpu.forward_backward_fixed(cp.asarray(feats, dtype), fbd, 24).loss, gpu.grads
    assert isinstance(lf, cp.ndarray) and lf.shape == ()
    assert abs(float(lf) - lc) <= tol * abs(lc)
    for k in gc:
        assert rel_err(host(gf[k]), gc[k]) < tol, ("fixed", k)


def _batches(rng, n, N=16):
    """n batches of N captions; the longest caption alternates (12 or 8 targets),
    so two shapes (N, T) recur."""
    out = []
    for i in range(n):
        feats, caps = make_batch(rng, N=N, slots=12, max_len=7 if i % 2 else 11)
        out.append((feats.astype(np.float32), caps))
    return out


@gpu_test
@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_graph_step_identical_to_eager(cell):
    """Captured-and-replayed steps give bit-for-bit the eager steps' results."""
    import cupy as cp

    from dtrain.kernels.cuda import GpuKernels
    from dtrain.step.gpu_graph import GpuTrainStep

    runs = []
    for graphs in (True, False):
        model = CaptioningModel(W2I, **DIMS, cell_type=cell, dtype=np.float32, seed=4, xp=cp)
        adam = Adam(model.num_params, lr=1e-2, xp=cp, dtype=np.float32,
                    kernels=GpuKernels(np.float32))
        step = GpuTrainStep(model, adam, graphs=graphs)
        losses = []
        for feats, caps in _batches(np.random.default_rng(8), 8):
            loss = step.forward_backward(feats, caps, 16, lr=1e-2, fuse_adam=True)
            losses.append(float(loss))
        runs.append((step, model, adam, losses))
    (gs, gm, ga, gl), (es, em, ea, el) = runs
    assert gs.use_graphs, gs.fallback_reason
    assert gs.captures == 2 and gs.replays == 6 and es.replays == 0
    assert gl == el, [a - b for a, b in zip(gl, el)]
    for name, a, b in (("params", gm.param_buffer, em.param_buffer), ("m", ga.m, ea.m),
                       ("v", ga.v, ea.v)):
        assert cp.array_equal(a, b), (name, float(cp.max(cp.abs(a - b))))
    assert ga.t == ea.t == 8


@gpu_test
@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_graphed_training_matches_cpu_training(cell):
    """Six float64 steps: GPU graphs (Adam inside) == CPU packed path + CPU Adam."""
    import cupy as cp

    from dtrain.kernels.cuda import GpuKernels
    from dtrain.step.gpu_graph import GpuTrainStep

    cpu, gpu = _pair(cell, np.float64, seed=5)
    cpu_adam = Adam(cpu.num_params, lr=1e-2, dtype=np.float64)
    gpu_adam = Adam(gpu.num_params, lr=1e-2, xp=cp, dtype=np.float64,
                    kernels=GpuKernels(np.float64))
    step = GpuTrainStep(gpu, gpu_adam)
    for feats, caps in _batches(np.random.default_rng(9), 6):
        lc, _ = cpu.loss(feats, caps, normalizer=16)
        cpu_adam.step(cpu.param_buffer, cpu.grad_buffer)
        lg = float(step.forward_backward(feats, caps, 16, lr=1e-2, fuse_adam=True))
        assert abs(lg - lc) <= 1e-10 * abs(lc)
    assert step.replays == 4
    assert rel_err(host(gpu.param_buffer), cpu.param_buffer) < 1e-10


@gpu_test
@pytest.mark.timeout(180)
def test_two_ranks_sharing_one_gpu_match_one_rank(tmp_path):
    """2 ranks on one GPU (host-staged reduce, dense and sparse embedding) == 1 rank, float64."""
    from dtrain.checkpoint import latest_checkpoint, load_checkpoint
    from dtrain.data.synthetic import write_synthetic
    from dtrain_run import dtrain_cmd

    data = write_synthetic(tmp_path / "data", train_images=60, val_images=8, seed=3)
    common = ["train", "--data", data, "--device", "gpu", "--batch-size", "8", "--hidden-dim", "12",
              "--wordvec-dim", "8", "--dtype", "float64", "--log-every", "1", "--eval-images", "8",
              "--eval-captions", "16", "--max-length", "6", "--lr", "5e-3", "--steps", "8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = {"p1": (None, []), "p2-dense": (2, ["--embed-reduce", "dense"]),
            "p2-sparse": (2, ["--embed-reduce", "sparse"])}
    procs = {name: subprocess.Popen(
                 dtrain_cmd(r, *common, "--checkpoint-dir", tmp_path / name, *extra),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for name, (r, extra) in runs.items()}  # concurrently: they share the GPU anyway
    out = {name: p.communicate(timeout=170)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, out[name][-3000:])
    assert "gradient reduce: host-staged" in out["p2-dense"] or "CUDA-aware" in out["p2-dense"]
    print(next(ln for ln in out["p2-dense"].splitlines() if ln.startswith("step:")))

    def params(name):
        ck = load_checkpoint(latest_checkpoint(tmp_path / name))
        return {k: np.asarray(v) for k, v in ck["params"].items()}

    ref = params("p1")
    for name in ("p2-dense", "p2-sparse"):
        got = params(name)
        for k in ref:
            assert rel_err(got[k], ref[k]) < 1e-10, (name, k)


@gpu_test
@pytest.mark.timeout(240)
def test_deterministic_two_ranks_sharing_one_gpu_bitwise(tmp_path):
    """--deterministic on the GPU: 1 rank and 2 ranks sharing the GPU give the same bits
    (float32)."""
    from dtrain.data.synthetic import write_synthetic
    from dtrain_run import run_dtrain
    from helpers import final_state

    data = write_synthetic(tmp_path / "data", train_images=60, val_images=8, seed=3)
    common = ["train", "--data", data, "--device", "gpu", "--batch-size", "16",
              "--micro-batch", "4", "--deterministic", "--hidden-dim", "12", "--wordvec-dim", "8",
              "--eval-images", "8", "--eval-captions", "16", "--max-length", "6", "--lr", "5e-3",
              "--steps", "8", "--quiet"]
    for ranks, name in ((None, "p1"), (2, "p2")):
        run_dtrain(ranks, *common, "--checkpoint-dir", tmp_path / name, timeout=200)
    _, a, ca = final_state(tmp_path / "p1")
    _, b, cb = final_state(tmp_path / "p2")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for k in ("m", "v"):
        assert np.array_equal(np.asarray(ca["adam"][k]), np.asarray(cb["adam"][k])), k
