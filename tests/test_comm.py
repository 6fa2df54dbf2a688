"""Communicator tests: real mpiexec jobs (oversubscribed on 2 cores), each with a timeout.

The collectives are checked inside the worker scripts in tests/mpi_workers/,
which assert on every rank and abort the job (non-zero exit) on any failure.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "mpi_workers"
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # Harmless for the MPICH wheel; what the Open MPI wheel needs as root on 2 cores.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    return env


def run_job(nprocs, script, *args, timeout=60, env=None):
    """Run a worker under `mpiexec -n nprocs`, or plainly (a world of one) when nprocs is None."""
    cmd = [sys.executable, str(WORKERS / script), *map(str, args)]
    if nprocs is not None:
        cmd = [MPIEXEC, "-n", str(nprocs), *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=WORKERS
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_collectives_under_mpiexec(nprocs):
    res = run_job(nprocs, "comm_suite.py")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"OK size={nprocs}" in res.stdout


@pytest.mark.timeout(60)
def test_world_of_one_without_launcher():
    res = run_job(None, "comm_suite.py")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK size=1" in res.stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nprocs,bad,where", [(2, 1, "allreduce"), (4, 2, "barrier")])
def test_raising_rank_aborts_whole_job(nprocs, bad, where):
    t0 = time.monotonic()
    res = run_job(nprocs, "raise_worker.py", bad, where, timeout=45)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f} s to end"
    assert f"dtrain: rank {bad}/{nprocs} failed: ValueError: deliberate failure" in res.stderr
    assert "Traceback" in res.stderr
    assert "UNREACHABLE" not in res.stdout


@pytest.mark.timeout(60)
def test_raising_world_of_one_exits_nonzero():
    res = run_job(None, "raise_worker.py", 0)
    assert res.returncode == 1
    assert "dtrain: rank 0/1 failed: ValueError: deliberate failure on rank 0" in res.stderr


@pytest.mark.timeout(60)
def test_missing_mpi_library_gives_one_line_hint():
    env = _env()
    env["MPI4PY_LIBMPI"] = "/nonexistent/libmpi.so.12"
    code = (
        "from dtrain.parallel.comm import Communicator\n"
        "try:\n    Communicator()\n"
        "except RuntimeError as e:\n    print('HINT', e)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    hint = [ln for ln in res.stdout.splitlines() if ln.startswith("HINT")]
    assert hint and "pip install mpich" in hint[0], res.stdout + res.stderr


def _gpu_available():
    try:
        from dtrain.backend import gpu_available

        return gpu_available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not _gpu_available(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("nprocs", [1, 2])
def test_cupy_collectives(nprocs):
    res = run_job(nprocs, "cupy_suite.py", timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"OK cupy size={nprocs}" in res.stdout
