"""slurm/train.sbatch on a real local Slurm cluster, one-node jobs.

The session fixture ``slurm_cluster`` (tests/conftest.py, tests/local_cluster.py)
installs the Debian Slurm packages when they are missing and apt-get exists (CI
runs as root), starts slurm/local-cluster/start.sh once per session (namespace
hosts node1..node3 where namespaces can be made, else one node on localhost) and
always stops it again. Without apt-get the tests are skipped with the reason; in
CI (CI set) they fail instead. Jobs across hosts: tests/test_multinode.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from helpers import read_output, wait_slurm_job

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO / "slurm" / "train.sbatch"
BIN = Path(sys.executable).parent  # the venv's bin: python3 and mpiexec for the jobs
MPIEXEC = BIN / "mpiexec"
PREEMPTED_EXIT = 75

# A small LSTM on the built-in data, float64 so runs compare to 1e-10.
COMMON = [
    "--cell", "lstm", "--batch-size", "16", "--dtype", "float64", "--seed", "7",
    "--hidden-dim", "32", "--wordvec-dim", "16", "--eval-every", "0",
    "--eval-images", "10", "--threads-per-rank", "1",
]  # fmt: skip


# ---------------------------------------------------------------- helpers


def _train_args(data, ckpt_dir, steps, extra=()):
    return [
        "--data", str(data), "--checkpoint-dir", str(ckpt_dir), "--steps", str(steps),
        *COMMON, *extra,
    ]  # fmt: skip


def _start_mpiexec_run(data, ckpt_dir, steps, extra=(), np_=2):
    """The same training under plain mpiexec, started in the background."""
    cmd = [str(MPIEXEC), "-n", str(np_), sys.executable, "-m", "dtrain", "train"]
    cmd += _train_args(data, ckpt_dir, steps, extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen(
        cmd, cwd=ckpt_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"mpiexec run timed out:\n{out}") from None
    assert proc.returncode == 0, f"mpiexec run failed ({proc.returncode}):\n{out}"
    return out


def _submit(cluster, workdir: Path, data, ckpt_dir, steps, extra=(), ntasks=2, env=None):
    out = workdir / "job.out"
    env = dict(cluster.env, DATA_DIR=str(data), CKPT_DIR=str(ckpt_dir), **(env or {}))
    env["EXTRA_FLAGS"] = " ".join(["--steps", str(steps), *COMMON, *extra])
    r = cluster.run(
        "sbatch", "--parsable", "--job-name=dtrain-test", "--nodes=1",
        f"--ntasks-per-node={ntasks}", "--cpus-per-task=1", "--time=10", f"--output={out}",
        f"--chdir={workdir}", str(SBATCH_SCRIPT), env=env,
    )  # fmt: skip
    return r.stdout.strip().split(";")[0], out


def _wait_job(cluster, job_id, out: Path, timeout=180) -> dict:
    return wait_slurm_job(cluster, job_id, out, timeout)


def _final_params(ckpt_dir):
    from dtrain.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(ckpt_dir)
    assert path is not None, f"no checkpoint in {ckpt_dir}"
    state = load_checkpoint(path)
    return int(state["step"]), {k: np.asarray(v) for k, v in state["params"].items()}


def _assert_same_params(a_dir, b_dir, steps):
    step_a, a = _final_params(a_dir)
    step_b, b = _final_params(b_dir)
    assert step_a == step_b == steps
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == np.float64
        diff = float(np.max(np.abs(a[name] - b[name])))
        assert diff < 1e-10, f"{name}: max |difference| {diff:.3g}"


# ---------------------------------------------------------------- tests


def test_sbatch_two_tasks_matches_mpiexec(slurm_cluster, synth_data, tmp_path):
    steps = 6
    (tmp_path / "ref").mkdir()
    ref = _start_mpiexec_run(synth_data, tmp_path / "ref" / "ckpt", steps)
    job_id, out = _submit(slurm_cluster, tmp_path, synth_data, tmp_path / "job-ckpt", steps)
    info = _wait_job(slurm_cluster, job_id, out)
    _finish(ref)
    text = read_output(out)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", text
    assert "srun --mpi=pmi2" in text, text  # MPICH: the script picked pmi2
    assert "2 rank(s)" in text, text  # one MPI job of 2 ranks, not 2 singletons
    _assert_same_params(tmp_path / "job-ckpt", tmp_path / "ref" / "ckpt", steps)


def test_preempted_job_requeues_resumes_and_matches(slurm_cluster, synth_data, tmp_path):
    steps = 400
    ckpt, gates = tmp_path / "job-ckpt", tmp_path / "gates"
    gates.mkdir()
    # Rank 1 holds after step 40 until a stop signal reaches it (DTRAIN_FAULT=hold,
    # dtrain/testhooks.py): USR1 lands mid-run however fast the steps are, at step 41.
    job_id, out = _submit(
        slurm_cluster, tmp_path, synth_data, ckpt, steps, extra=["--checkpoint-every", "20"],
        env={"DTRAIN_FAULT": f"hold@1:40:{gates}"},
    )
    deadline = time.monotonic() + 120
    while not (gates / "held-40").exists():
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info}\n{read_output(out)}"
        assert time.monotonic() < deadline, f"not at step 40 after 120 s\n{read_output(out)}"
        time.sleep(0.2)
    # What Slurm does at --signal=B:USR1@T: signal the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    # The uninterrupted reference runs meanwhile (the requeued job waits ~10 s).
    (tmp_path / "ref").mkdir()
    ref = _start_mpiexec_run(synth_data, tmp_path / "ref" / "ckpt", steps)
    info = _wait_job(slurm_cluster, job_id, out, timeout=240)
    _finish(ref)
    text = read_output(out)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert info["ExitCode"] == "0:0", text
    assert info["Restarts"] == "1", text  # requeued once, and not again once finished
    m = re.search(r"checkpoint \S+ written at step (\d+); exiting with code 75", text)
    assert m, f"no preemption checkpoint in the job output:\n{text}"
    preempted_at = int(m.group(1))
    assert preempted_at == 41, text
    assert "training step exited with code 75" in text and "requeueing job" in text, text
    assert re.search(rf"resumed from \S+ at step {preempted_at}\b", text), text
    assert f"training done: {steps} steps" in text, text
    _assert_same_params(ckpt, tmp_path / "ref" / "ckpt", steps)


# ------------------------------------------------- the README command, plain


def _sbatch_plain(cluster, workdir: Path, extra_flags: str, **env_vars):
    """`sbatch slurm/train.sbatch` as the README has it: run from ``workdir``, no
    DATA_DIR, no CKPT_DIR, no sbatch options (the script's own defaults)."""
    env = {k: v for k, v in cluster.env.items() if k not in ("DATA_DIR", "CKPT_DIR")}
    env["DTRAIN_CACHE"] = os.environ.get("DTRAIN_CACHE", str(REPO / "tests" / ".cache"))
    env["EXTRA_FLAGS"] = extra_flags
    env.update(env_vars)
    r = subprocess.run(
        ["sbatch", "--parsable", str(SBATCH_SCRIPT)], cwd=workdir, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    return job_id, workdir / f"dtrain-{job_id}.out"  # the script's --output=%x-%j.out


def test_sbatch_without_data_dir_trains_on_builtin_data(slurm_cluster, tmp_path):
    job_id, out = _sbatch_plain(slurm_cluster, tmp_path, " ".join(["--steps", "4", *COMMON]))
    info = _wait_job(slurm_cluster, job_id, out, timeout=300)
    text = read_output(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    launch = next(line for line in text.splitlines() if "launch: " in line)
    assert " --data " not in launch, launch
    assert re.search(r"^data: \S*synthetic-\S+ ", text, re.M), text  # the built-in data set
    assert "training done: 4 steps" in text, text
    assert "training step exited with code 0" in text, text
    ckpt_dir = tmp_path / "checkpoints" / f"dtrain-{job_id}"
    step, _ = _final_params(ckpt_dir)
    assert step == 4


def test_sbatch_user_errors_exit_2_not_137(slurm_cluster, tmp_path):
    """A user error, caught before MPI starts or by one rank after it (which
    MPI-aborts, so srun kills the other rank and reports 137), is exit code 2."""
    cases = {
        "bad-flag": dict(extra_flags="--batch-size 0", expect="dtrain: error: --batch-size"),
        "bad-resume": dict(
            extra_flags=f"--steps 4 --resume {tmp_path / 'missing.h5'}",
            expect=f"dtrain: error: --resume {tmp_path / 'missing.h5'}: no such checkpoint file",
        ),
        "bad-data-dir": dict(
            extra_flags="--steps 4", env={"DATA_DIR": str(tmp_path / "no-data")},
            expect=f"DATA_DIR {tmp_path / 'no-data'}: no such directory",
        ),
    }  # fmt: skip
    jobs = {}
    for name, case in cases.items():  # all at once: the node has room for them
        workdir = tmp_path / name
        workdir.mkdir()
        jobs[name] = _sbatch_plain(slurm_cluster, workdir, case["extra_flags"],
                                   **case.get("env", {}))
    for name, (job_id, out) in jobs.items():
        info = _wait_job(slurm_cluster, job_id, out, timeout=180)
        text = read_output(out)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{name}: {info}\n{text}"
        assert cases[name]["expect"] in text, f"{name}:\n{text}"
        assert info["Restarts"] == "0", f"{name}: {info}"
    text = read_output(jobs["bad-resume"][1])
    assert "training step exited with code" in text, text
    if "training step exited with code 137" in text:  # srun killed the other rank
        assert "a rank reported a user error (dtrain exit code 2" in text, text
