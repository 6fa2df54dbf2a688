"""Helpers shared by the tests: numeric gradients, error measures, vocabularies, caption
batches, the final state of a run's checkpoints, and waiting for a Slurm job."""

import time
from pathlib import Path

import numpy as np

# Slurm job states after which a job runs no more
SLURM_FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}  # fmt: skip


def numeric_grad(f, x, df=None, h=1e-5):
    """d(sum(f() * df))/dx by centred differences, perturbing x in place."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        pos = f()
        x[ix] = old - h
        neg = f()
        x[ix] = old
        if df is None:
            grad[ix] = (pos - neg) / (2 * h)
        else:
            grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def eval_numerical_gradient(f, x, h=1e-5):
    """The CS231n notebooks' checker: f(x) is called with the array it perturbs in place."""
    return numeric_grad(lambda: f(x), x, h=h)


def rel_error(a, b):
    """CS231n's relative error: the largest |a - b| / (|a| + |b|) over entries."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def norm_error(num, ana):
    """Largest absolute difference relative to the largest entry of ``ana``."""
    num, ana = np.asarray(num, dtype=np.float64), np.asarray(ana, dtype=np.float64)
    return float(np.max(np.abs(num - ana)) / max(np.max(np.abs(ana)), 1e-12))


def small_vocab(V):
    """The special tokens and V - 4 made-up words."""
    w = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}
    for i in range(4, V):
        w[f"w{i}"] = i
    return w


def random_captions(rng, N, T, V, min_len=2):
    """(N, T+1) ids: <START> words <END> <NULL>... with varied lengths."""
    caps = np.zeros((N, T + 1), dtype=np.int32)
    for n in range(N):
        L = rng.integers(min_len, T)  # words before <END>
        caps[n, 0] = 1
        caps[n, 1 : L + 1] = rng.integers(3, V, size=L)
        caps[n, L + 1] = 2
    return caps


def final_state(ckpt_dir):
    """(step, params as NumPy arrays, the loaded checkpoint) of the newest checkpoint in
    ``ckpt_dir``."""
    from dtrain.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(ckpt_dir)
    assert path is not None, f"no checkpoint in {ckpt_dir}"
    ck = load_checkpoint(path)
    return int(ck["step"]), {k: np.asarray(v) for k, v in ck["params"].items()}, ck


def read_output(path: Path) -> str:
    """A job's output file, or a line saying it is missing (for assertion messages)."""
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def wait_slurm_job(cluster, job_id, out: Path, timeout) -> dict:
    """``cluster.job(job_id)`` once the job reached a final state; after ``timeout`` s the
    job is cancelled and the test fails with its output and the cluster's logs."""
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        if info.get("JobState") in SLURM_FINAL_STATES:
            return info
        time.sleep(0.5)
    cluster.run("scancel", job_id, check=False)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {info.get('JobState')} "
                         f"({info.get('Reason')})\n{read_output(out)}\n{cluster.logs()}")
