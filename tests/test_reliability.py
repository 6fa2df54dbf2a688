"""Nothing lost, nothing silently wrong: divergence, non-finite steps, signals, metrics, one-line
errors (real processes; the checkpoint, lock and flag checks have their own test files)."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from dtrain.checkpoint import latest_checkpoint, load_checkpoint
from dtrain_run import dtrain_cmd, run_dtrain

SMALL = ["--batch-size", "8", "--hidden-dim", "12", "--wordvec-dim", "8", "--eval-images", "8",
         "--eval-captions", "16", "--max-length", "6", "--log-every", "5"]


def records(ckpt_dir, kind):
    return [r for r in map(json.loads, open(ckpt_dir / "metrics.jsonl")) if r["kind"] == kind]


def test_divergence_warns(tiny_data, tmp_path):
    p = run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 30, "--lr", "1e3", timeout=120)
    assert "warning: loss" in p.stdout and "diverging" in p.stdout, p.stdout[-2000:]
    assert len(records(tmp_path, "warning")) == 1


def test_normal_run_does_not_warn(tiny_data, tmp_path):
    p = run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 30, timeout=120)
    assert "warning" not in p.stdout and not records(tmp_path, "warning")


def test_non_finite_step_is_not_applied(tiny_data, tmp_path):
    """--lr 1e18 blows the parameters up: the first non-finite step stops the run in one
    line naming the step; no checkpoint holds non-finite values."""
    p = run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 60, "--checkpoint-every", 1, "--lr", "1e18", check=False, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("dtrain:")]
    assert len(err) == 1 and "not applied" in err[0] and "step " in err[0]
    assert "Traceback" not in p.stderr
    last = latest_checkpoint(tmp_path)
    assert last is not None and str(last) in err[0]  # the last good checkpoint is named
    for path in tmp_path.glob("ckpt-*.h5"):
        ck = load_checkpoint(path)
        assert all(np.all(np.isfinite(np.asarray(v))) for v in ck["params"].values()), path


def test_non_finite_on_one_rank_names_it(tiny_data, tmp_path):
    p = run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 10, env={"DTRAIN_FAULT": "nan@1:4"}, check=False, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "step 4:" in p.stderr and "rank(s) [1]" in p.stderr and "Traceback" not in p.stderr


def _run_until_first_step(args, sig, env=None):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(dtrain_cmd(None, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)
    try:
        for line in proc.stdout:
            if line.startswith("step ") and "/" in line:
                break
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_sigint_checkpoints_like_sigterm(tiny_data, tmp_path):
    rc, out, err = _run_until_first_step(["train", "--data", str(tiny_data), "--checkpoint-dir",
                                          str(tmp_path), *SMALL, "--steps", "100000"],
                                         signal.SIGINT)
    assert rc == 75, err[-2000:]
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) >= 5


def test_sigterm_during_final_evaluation_stops_it(tiny_data, tmp_path):
    p = run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 5, env={"DTRAIN_FAULT": "signal@1:eval"}, check=False, timeout=120)
    assert p.returncode == 75, p.stderr[-2000:]
    assert "during the final evaluation" in p.stderr
    final = [r for r in records(tmp_path, "eval") if r["final"]]
    assert final and final[-1]["stopped"]
    assert "val_loss" not in final[-1] and "val_loss_per_token" not in final[-1]  # a partial sum
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) == 5


def test_metrics_mark_every_start_and_resume(tiny_data, tmp_path):
    run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
               "--steps", 5)
    run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
               "--steps", 10, "--resume", "latest")
    starts = records(tmp_path, "start")
    assert [s["world_size"] for s in starts] == [1, 2]
    assert starts[0]["resumed_from"] is None
    assert starts[1]["resumed_from"].endswith("ckpt-00000005.h5")
    assert [s["step"] for s in starts] == [0, 5] and starts[0]["run_id"] != starts[1]["run_id"]


def test_user_error_is_exactly_one_line_every_time(tmp_path):
    """A user error prints its one line (per rank) and nothing else, run after run."""
    for _ in range(8):
        p = run_dtrain(2, "train", "--data", tmp_path / "missing", "--steps", 1, check=False,
                       timeout=60)
        assert p.returncode == 2
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines and all(ln.startswith("dtrain: error:") and "missing" in ln
                             for ln in lines), p.stderr
        assert "Traceback" not in p.stderr and "failed" not in p.stderr


def test_sample_and_evaluate_errors_name_their_flags(tmp_path):
    p = run_dtrain(None, "sample", "--checkpoint", tmp_path / "none.h5", check=False, timeout=60)
    assert p.returncode == 2 and "--checkpoint" in p.stderr and "--resume" not in p.stderr, p.stderr
    p = run_dtrain(None, "sample", "--checkpoint", "x", "-n", "-2", check=False, timeout=60)
    assert p.returncode == 2 and "-n" in p.stderr, p.stderr
    p = run_dtrain(None, "evaluate", "--checkpoint", "x", "--eval-images", "-1", check=False,
                   timeout=60)
    assert p.returncode == 2 and "--eval-images" in p.stderr, p.stderr


def test_unwritable_checkpoint_dir_fails_before_training(tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", blocker / "ckpt", *SMALL,
                   "--steps", 1000, check=False, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--checkpoint-dir" in p.stderr and "Traceback" not in p.stderr
    assert "step " not in p.stdout  # nothing trained


def test_one_run_per_checkpoint_dir(tiny_data, tmp_path):
    args = ["train", "--data", str(tiny_data), "--checkpoint-dir", str(tmp_path), *SMALL,
            "--steps", "100000"]
    first = subprocess.Popen(dtrain_cmd(None, *args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in first.stdout:
            if line.startswith("step ") and "/" in line:
                break
        second = run_dtrain(None, *args[1:], check=False, timeout=60)
        assert second.returncode == 2, second.stderr[-2000:]
        assert str(tmp_path) in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    third = run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                       "--steps", 2, timeout=120)
    assert "stale lock" in third.stdout and str(first.pid) in third.stdout, third.stdout[-2000:]


def test_resume_refuses_other_data_and_init_from_fine_tunes(tiny_data, tmp_path):
    from dtrain.data.synthetic import write_synthetic

    other = write_synthetic(tmp_path / "other", train_images=60, val_images=8, seed=4)
    ck = tmp_path / "ck"
    run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", ck, *SMALL, "--steps", 3)
    p = run_dtrain(None, "train", "--data", other, "--checkpoint-dir", ck, *SMALL, "--steps", 6,
                   "--resume", "latest", check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "another data set" in p.stderr and "--init-from" in p.stderr, p.stderr
    src = latest_checkpoint(ck)
    ft = tmp_path / "ft"
    p = run_dtrain(2, "train", "--data", other, "--checkpoint-dir", ft, *SMALL, "--steps", 2,
                   "--init-from", src, timeout=120)
    assert "--init-from" in p.stdout
    tuned = load_checkpoint(latest_checkpoint(ft))
    # a new run: fresh Adam, step 0 + 2
    assert int(tuned["step"]) == 2 and int(tuned["adam"]["t"]) == 2
    start = [r for r in records(ft, "start")][0]
    assert start["step"] == 0


def test_resume_latest_skips_damaged_checkpoint(tiny_data, tmp_path):
    run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
               "--steps", 4, "--checkpoint-every", 2)
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "ckpt-00000004.h5"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    p = run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 6, "--resume", "latest", timeout=120)
    assert f"skipped {newest}" in p.stdout and "resumed from" in p.stdout
    assert "ckpt-00000002.h5" in p.stdout
    assert (tmp_path / "ckpt-00000004.h5.damaged").exists()
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) == 6


def test_disk_full_while_checkpointing_is_one_line(tiny_data, tmp_path):
    """A real full disk (a small tmpfs): one line naming the file, the previous checkpoint kept."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        import pytest

        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        p = run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", mnt, *SMALL,
                       "--steps", 40, "--checkpoint-every", 1, "--keep-checkpoints", 100,
                       check=False, timeout=120)
        assert p.returncode != 0, p.stdout[-1000:]
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines and all(ln.startswith("dtrain: error: no space left on device writing")
                             for ln in lines), p.stderr[-2000:]
        assert "kept" in lines[0] and "Traceback" not in p.stderr
        kept = latest_checkpoint(mnt)
        assert kept is not None and int(load_checkpoint(kept)["step"]) >= 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------ stop signals at any moment
def _rank_pids(launcher_pid, n, deadline):
    """{rank: pid} of this mpiexec job's ranks: the launcher's grandchildren, by PMI_RANK."""
    found = {}
    while len(found) < n and time.monotonic() < deadline:
        parents = {}
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        proxies = {p for p, pp in parents.items() if pp == launcher_pid}
        for pid in (p for p, pp in parents.items() if pp in proxies):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            ranks = [e[9:] for e in env if e.startswith(b"PMI_RANK=")]
            if ranks:
                found[int(ranks[0])] = pid
        time.sleep(0.01)
    return found


def _stop_at(tmp_path, ranks, delay, sig, to_rank=None, steps=100000):
    """Start a run, send ``sig`` ``delay`` s after start (to mpiexec, or to rank ``to_rank``),
    return (returncode, stdout, stderr)."""
    args = ["train", "--data", str(tmp_path.parent / "data"), "--checkpoint-dir",
            str(tmp_path / "ck"), *SMALL, "--steps", str(steps)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(dtrain_cmd(ranks, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        t0 = time.monotonic()
        target = proc.pid
        if to_rank is not None:
            target = _rank_pids(proc.pid, ranks, t0 + 30)[to_rank]
        time.sleep(max(0.0, delay - (time.monotonic() - t0)))
        os.kill(target, sig)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def sig_data(tmp_path_factory):
    from dtrain.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("sig")
    write_synthetic(root / "data", train_images=60, val_images=8, seed=3)
    return root


# (ranks, seconds after the start, signal, sent to: None = the launched process, or a rank)
# The early offsets fall before MPI_Init (imports), in it, and in data loading or the first
# step's compilation; the late ones in training.
STOP_CASES = [
    (None, 0.2, signal.SIGUSR1, None), (None, 0.5, signal.SIGHUP, None),
    (None, 0.9, signal.SIGTERM, None), (None, 1.6, signal.SIGUSR1, None),
    (None, 3.0, signal.SIGHUP, None),
    (2, 0.3, signal.SIGUSR1, 1), (2, 0.7, signal.SIGHUP, 0), (2, 1.2, signal.SIGUSR1, 0),
    (2, 2.6, signal.SIGHUP, 1),
    (2, 2.0, signal.SIGTERM, None), (2, 3.5, signal.SIGUSR1, 1),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks,delay,sig,to_rank", STOP_CASES,
                         ids=[f"{r or 1}r-{d}s-{s.name}-to{'' if t is None else t}"
                              for r, d, s, t in STOP_CASES])
def test_stop_signal_at_any_moment_checkpoints_and_exits_75(sig_data, tmp_path, ranks, delay, sig,
                                                            to_rank):
    """SIGUSR1/SIGTERM/SIGHUP at any moment, MPI_Init and data loading included: exit 75, one
    line, and a checkpoint that loads (a signal before the first step: after step 1)."""
    tmp = sig_data / f"case-{ranks}-{delay}-{sig.name}-{to_rank}"
    tmp.mkdir()
    rc, out, err = _stop_at(tmp, ranks, delay, sig, to_rank)
    assert rc == 75, (rc, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dtrain: received "), err
    assert "exiting with code 75" in lines[0], err
    if to_rank in (None, 0):
        assert f"received {sig.name}:" in lines[0], lines
    ck = load_checkpoint(latest_checkpoint(tmp / "ck"))
    assert int(ck["step"]) >= 1 and f"ckpt-{int(ck['step']):08d}.h5" in lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks", [None, 2], ids=["1-rank", "2-ranks"])
def test_closed_stdout_does_not_stop_training(sig_data, tmp_path, ranks):
    """`dtrain train ... | head -1`: training runs to its end, the same as without the pipe (on
    2 ranks, mpiexec itself must not die of SIGPIPE: its proxy would kill the ranks)."""
    import shlex

    argv = dtrain_cmd(ranks, "train", "--data", sig_data / "data", "--checkpoint-dir", tmp_path,
                      *SMALL, "--steps", 60, "--log-every", 1)
    cmd = f"set -o pipefail; {shlex.join(map(str, argv))} | head -1"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(p.stdout.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "standard output was closed" in p.stderr
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) == 60
    assert [r["step"] for r in records(tmp_path, "train")][-1] == 60
    assert [r for r in records(tmp_path, "eval") if r["final"]]


@pytest.mark.timeout(400)
def test_scancel_signal_term_checkpoints_and_ends_without_requeue(slurm_cluster, synth_data,
                                                                  tmp_path):
    """The README's `scancel --signal=TERM <id>` (it signals the job step, not the batch
    script): the ranks checkpoint and exit 75, and train.sbatch does not requeue."""
    from test_slurm import _submit, _wait_job

    from helpers import read_output as _read

    ckpt = tmp_path / "ck"
    job_id, out = _submit(slurm_cluster, tmp_path, synth_data, ckpt, 100000,
                          extra=["--checkpoint-every", "20"])
    deadline = time.monotonic() + 120
    while not list(ckpt.glob("ckpt-*.h5")):
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), _read(out)
        assert time.monotonic() < deadline, f"no checkpoint after 120 s\n{_read(out)}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=TERM", job_id)
    info = _wait_job(slurm_cluster, job_id, out, timeout=120)
    text = _read(out)
    assert info["Restarts"] == "0" and "requeueing job" not in text, text
    assert "not requeueing after SIGTERM" in text, text
    m = re.search(r"received SIGTERM: checkpoint \S+ written at step (\d+); exiting with code 75",
                  text)
    assert m, text
    assert int(load_checkpoint(latest_checkpoint(ckpt))["step"]) == int(m.group(1))


# ------------------------------------------------------------------ misleading or degenerate data
def _variant(src, dst, features=None, train_captions=None, val_rows=None):
    """A copy of the data set ``src`` with one thing changed."""
    import shutil

    import h5py

    shutil.copytree(src, dst)
    if features is not None:
        for split in ("train", "val"):
            with h5py.File(dst / f"{split}2014_vgg16_fc7_pca.h5", "r+") as f:
                old = f["features"][...]
                del f["features"]
                f["features"] = features(old)
    with h5py.File(dst / "coco2014_captions.h5", "r+") as f:
        if train_captions is not None:
            caps = f["train_captions"][...]
            f["train_captions"][...] = train_captions(caps)
        if val_rows is not None:
            for key in ("val_captions", "val_image_idxs"):
                kept = f[key][...][:val_rows]
                del f[key]
                f[key] = kept
    return dst


def _beyond_float32(old):
    new = old.astype(np.float64)
    new[3, 5] = 1e300
    return new


def test_features_beyond_float32_are_refused_by_data_check_and_train(tiny_data, tmp_path):
    data = _variant(tiny_data, tmp_path / "big", features=_beyond_float32)
    where = (f"{data / 'train2014_vgg16_fc7_pca.h5'}: features: expected finite values, "
             "got 1e+300 at row 3, column 5")
    train = ["train", "--data", data, "--checkpoint-dir", tmp_path / "ck", *SMALL, "--steps", 3]
    for argv in (["data", "check", data], train):
        p = run_dtrain(None, *argv, check=False, timeout=60)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
        assert where in lines[0] and "float32" in lines[0], lines
    assert not list((tmp_path / "ck").glob("ckpt-*"))


def test_non_finite_first_step_blames_the_data_not_the_lr(tiny_data, tmp_path):
    """Features of 3e38 are float32, but overflow in the first step: "check the data"."""
    data = _variant(tiny_data, tmp_path / "huge", features=lambda old: np.full_like(old, 3e38))
    p = run_dtrain(None, "train", "--data", data, "--checkpoint-dir", tmp_path / "ck", *SMALL,
                   "--steps", 3, check=False, timeout=60)
    assert p.returncode == 2 and "step 1:" in p.stderr, p.stderr[-2000:]
    assert "check the data" in p.stderr and "--lr" not in p.stderr, p.stderr


def _no_words(caps):
    caps[:, 1:] = 0  # <START> then <NULL>: nothing to predict
    return caps


@pytest.mark.parametrize("change,key", [
    (dict(train_captions=_no_words), "train_captions: expected captions with words"),
    (dict(val_rows=0), "val_captions: expected at least one validation caption"),
    (dict(features=lambda old: old[:, :0]), "features: expected at least one feature per image"),
], ids=["no-training-tokens", "no-val-captions", "zero-width-features"])
def test_degenerate_data_is_refused_in_one_line(tiny_data, tmp_path, change, key):
    from dtrain.data.coco import CocoData, DataError

    data = _variant(tiny_data, tmp_path / "d", **change)
    with pytest.raises(DataError) as err:
        CocoData(data)
    assert key in str(err.value) and "\n" not in str(err.value), err.value
    p = run_dtrain(None, "data", "check", data, check=False, timeout=60)
    assert p.returncode == 2 and key in p.stderr and "ok" not in p.stdout, (p.stdout, p.stderr)


def test_val_loss_over_no_captions_is_not_available_never_zero(tiny_data, tmp_path):
    p = run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 2, "--eval-captions", 0, "--eval-images", 0, timeout=120)
    assert "val loss n/a" in p.stdout and "val loss 0.0000" not in p.stdout, p.stdout[-2000:]
    final = records(tmp_path, "eval")[-1]
    assert final["final"] and "val_loss" not in final


# ------------------------------------------------------------------ checkpoint readers
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_data):
    ck = tmp_path_factory.mktemp("readers") / "ck"
    run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", ck, *SMALL, "--steps", 4,
               "--checkpoint-every", 2, "--eval-images", 0, "--eval-captions", 0)
    return ck


def test_sample_and_evaluate_latest_skip_a_damaged_newest_checkpoint(two_checkpoints, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(two_checkpoints, ck)
    newest = ck / "ckpt-00000004.h5"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    for argv in (["sample", "-n", 2], ["evaluate", "--eval-images", 2, "--eval-captions", 8]):
        p = run_dtrain(None, *argv, "--checkpoint", "latest", "--checkpoint-dir", ck, timeout=120)
        assert f"--checkpoint latest: skipped {newest}" in p.stderr, p.stderr
        assert "ckpt-00000002.h5" in p.stdout, p.stdout
    assert newest.exists()  # a reader names it, and leaves the training's directory alone


def test_checkpoint_deleted_while_read_is_chosen_again_not_called_damaged(two_checkpoints, tmp_path,
                                                                          monkeypatch):
    """The race of `sample --checkpoint latest` beside a training with --keep-checkpoints 1: the
    newest file is pruned (and a newer one written) while it is read."""
    import shutil

    import dtrain.checkpoint.choose as choose

    ck = tmp_path / "ck"
    shutil.copytree(two_checkpoints, ck)
    (ck / "ckpt-00000002.h5").unlink()
    real = choose.load_checkpoint
    seen = []

    def pruned_during_load(path, required=()):
        seen.append(path.name)
        if path.name == "ckpt-00000004.h5":
            shutil.copy(path, ck / "ckpt-00000006.h5")  # the training's next checkpoint
            path.unlink()  # and its retention
        return real(path, required)

    monkeypatch.setattr(choose, "load_checkpoint", pruned_during_load)
    path, state = choose.choose_checkpoint("latest", ck, "--checkpoint", say=print,
                                           required=("params",))
    assert path.name == "ckpt-00000006.h5" and seen == ["ckpt-00000004.h5", "ckpt-00000006.h5"]
    assert "params" in state


# ------------------------------------------------------------------ resume compares every setting
def test_resume_with_result_changing_settings_is_refused_or_warned_once(two_checkpoints, tiny_data,
                                                                         tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(two_checkpoints, ck)
    base = ["train", "--data", tiny_data, "--checkpoint-dir", ck, *SMALL, "--steps", 6, "--resume",
            "latest", "--eval-images", 0, "--eval-captions", 0]
    p = run_dtrain(None, *base, "--seed", 5, "--replacement", check=False, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "--seed 0 -> 5, --replacement False -> True" in lines[0], lines
    assert "--allow-changed-settings" in lines[0]
    p = run_dtrain(None, *base, "--seed", 5, "--allow-changed-settings", timeout=120)
    warned = [ln for ln in p.stdout.splitlines() if "changed settings" in ln]
    assert len(warned) == 1 and "--seed 0 -> 5" in warned[0], p.stdout[-2000:]
    assert int(load_checkpoint(latest_checkpoint(ck))["step"]) == 6


def test_deterministic_resume_compares_micro_batch_and_threads():
    from dtrain.config import TrainConfig
    from dtrain.resume_settings import changed_settings

    saved = TrainConfig(deterministic=True, batch_size=16).to_dict()
    same = TrainConfig(deterministic=True, batch_size=16, steps=9)
    assert changed_settings(saved, same.to_dict()) == []
    assert changed_settings(saved, TrainConfig(deterministic=True, batch_size=16, micro_batch=8,
                                               threads_per_rank=1).to_dict()) == []  # the defaults
    assert changed_settings(saved, TrainConfig(deterministic=True, batch_size=16,
                                               micro_batch=4).to_dict()) == ["--micro-batch 8 -> 4"]
    two = TrainConfig(deterministic=True, batch_size=16, threads_per_rank=2)
    assert changed_settings(saved, two.to_dict()) == ["--threads-per-rank 1 -> 2"]
    # without --deterministic, a micro-batch or thread count changes only the rounding
    other = TrainConfig(micro_batch=8, threads_per_rank=2)
    assert changed_settings(TrainConfig().to_dict(), other.to_dict()) == []
    # bf16 transport of the gradient changes every step's sum; the overlapped reduce does not
    bf16 = TrainConfig(reduce_dtype="bf16", overlap_reduce=True)
    assert changed_settings(TrainConfig().to_dict(), bf16.to_dict()) == [
        "--reduce-dtype fp32 -> bf16"]


def test_resume_resolves_defaults_by_the_trainers_policy():
    """The settings compared on resume resolve --deterministic's defaults through dtrain/step's
    own micro_batch_rows and requested_threads (one policy)."""
    from dtrain.config import TrainConfig
    from dtrain.resume_settings import effective
    from dtrain.step import micro_batch_rows, requested_threads

    for batch in (12, 16, 7):
        cfg = TrainConfig(deterministic=True, batch_size=batch)
        got = effective(cfg.to_dict())
        assert (got["micro_batch"], got["threads_per_rank"]) == (
            micro_batch_rows(cfg), requested_threads(cfg)) == ({12: 4, 16: 8, 7: 1}[batch], 1)
    loose = TrainConfig(batch_size=12).to_dict()
    assert effective(loose) == loose  # without --deterministic nothing is resolved
