"""Lowering the communication cost (issue 23, item 5): the W_vocab/b_vocab reduction started
during BPTT (--overlap-reduce) and bf16 transport of the dense gradient (--reduce-dtype bf16).

The numbers are compared on real ranks (tests/mpi_workers/comm_overlap.py under mpiexec -n 2
and -n 3): the overlapped reduction equals today's bit for bit; bf16 stays within the stated
bound of the exact sum. The flags are checked here, without MPI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.config import TrainConfig

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
WORKER = Path(__file__).parent / "mpi_workers" / "comm_overlap.py"


@pytest.mark.parametrize("ranks", [2, 3])
def test_overlap_bitwise_and_bf16_bound_on_real_ranks(ranks):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(WORKER)],
                       capture_output=True, text=True, timeout=240, env=env)
    out = p.stdout.strip().splitlines()
    assert p.returncode == 0 and out and out[-1] == "OK", p.stdout[-2000:] + p.stderr[-3000:]


@pytest.mark.parametrize("settings, message", [
    (dict(deterministic=True, reduce_dtype="bf16"),
     "--reduce-dtype bf16: not with --deterministic"),
    (dict(deterministic=True, overlap_reduce=True), "--overlap-reduce: not with --deterministic"),
    (dict(reduce_dtype="fp16"), "--reduce-dtype: expected fp32 or bf16, got 'fp16'"),
    (dict(reduce_dtype="bf16", dtype="float64"), "--reduce-dtype bf16: expected --dtype float32"),
])
def test_reduce_flags_refused_with_one_line(settings, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**settings).validate()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_reduce_flags_accepted_alone():
    TrainConfig(reduce_dtype="bf16", overlap_reduce=True).validate()
    TrainConfig(deterministic=True).validate()


def test_bf16_with_deterministic_refused_by_the_cli(tmp_path):
    """One line naming the flag, non-zero exit, before any work (no checkpoint written)."""
    ckpt = tmp_path / "ckpt"
    p = subprocess.run([sys.executable, "-m", "dtrain", "train", "--deterministic",
                        "--reduce-dtype", "bf16", "--checkpoint-dir", str(ckpt), "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert "--reduce-dtype bf16" in lines[0] and "--deterministic" in lines[0]
    assert not list(ckpt.glob("*.h5"))


def _commmodel():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slurm" / "local-cluster"))
    try:
        import commmodel
    finally:
        sys.path.pop(0)
    return commmodel


@pytest.mark.parametrize("p", [2, 3, 4, 8, 9, 32, 128])
def test_model_bytes_are_the_reducers_count(p):
    """slurm/local-cluster/commmodel.py counts the bytes dtrain's reducer counts
    (ring_bytes, embedding_bytes, the sparse/dense choice), at the CS231n sizes."""
    from dtrain.parallel.reducer import choose_embedding_mode, embedding_bytes, ring_bytes

    m = _commmodel()
    rows = m.ROWS_PER_RANK * p
    mode = choose_embedding_mode(p, [m.ROWS_PER_RANK] * p, m.VOCAB, m.WORDVEC, 4)
    dense = ring_bytes(p, 4 * m.DENSE_FLOATS, 2)
    want = dense + embedding_bytes(p, rows, m.VOCAB, m.WORDVEC, 4)[mode]
    got = m.step_bytes(p)
    assert got["embed"] == mode and abs(got["bytes"] - want) <= 2
    half = ring_bytes(p, 2 * m.DENSE_FLOATS, 2)  # bf16: the dense part halves
    embed16 = embedding_bytes(p, rows, m.VOCAB, m.WORDVEC, 2 if mode == "dense" else 4)[mode]
    assert abs(m.step_bytes(p, "bf16")["bytes"] - half - embed16) <= 2


def test_model_fit_recovers_its_constants():
    m = _commmodel()
    B, L = 1.1e9, 3e-4
    pts = [(m.step_bytes(p)["bytes"], m.rounds(p), m.comm_seconds(p, B, L)) for p in (2, 3, 4, 8)]
    f = m.fit_link(pts)
    assert abs(f["B"] / B - 1) < 1e-6 and abs(f["L"] / L - 1) < 1e-6
    assert max(abs(r) for r in f["residuals"]) < 1e-9
