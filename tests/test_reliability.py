"""Nothing lost, nothing silently wrong: divergence, non-finite steps, signals, metrics, one-line
errors (real processes; the checkpoint, lock and flag checks have their own test files)."""

import json
import os
import signal
import subprocess

import numpy as np

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
    assert len(err) == 1 and "not applied" in err[0] and "step " in err[0] and "Traceback" not in p.stderr
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
                                          str(tmp_path), *SMALL, "--steps", "100000"], signal.SIGINT)
    assert rc == 75, err[-2000:]
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) >= 5


def test_sigterm_during_final_evaluation_stops_it(tiny_data, tmp_path):
    p = run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL, "--steps", 5,
                   env={"DTRAIN_FAULT": "signal@1:eval"}, check=False, timeout=120)
    assert p.returncode == 75, p.stderr[-2000:]
    assert "during the final evaluation" in p.stdout
    final = [r for r in records(tmp_path, "eval") if r["final"]]
    assert final and final[-1]["stopped"]
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) == 5


def test_metrics_mark_every_start_and_resume(tiny_data, tmp_path):
    run_dtrain(None, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL, "--steps", 5)
    run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *SMALL, "--steps", 10,
               "--resume", "latest")
    starts = records(tmp_path, "start")
    assert [s["world_size"] for s in starts] == [1, 2]
    assert starts[0]["resumed_from"] is None and starts[1]["resumed_from"].endswith("ckpt-00000005.h5")
    assert [s["step"] for s in starts] == [0, 5] and starts[0]["run_id"] != starts[1]["run_id"]


def test_user_error_is_exactly_one_line_every_time(tmp_path):
    """A user error prints its one line (per rank) and nothing else, run after run."""
    for _ in range(8):
        p = run_dtrain(2, "train", "--data", tmp_path / "missing", "--steps", 1, check=False, timeout=60)
        assert p.returncode == 2
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines and all(ln.startswith("dtrain: error:") and "missing" in ln for ln in lines), p.stderr
        assert "Traceback" not in p.stderr and "failed" not in p.stderr


def test_sample_and_evaluate_errors_name_their_flags(tmp_path):
    p = run_dtrain(None, "sample", "--checkpoint", tmp_path / "none.h5", check=False, timeout=60)
    assert p.returncode == 2 and "--checkpoint" in p.stderr and "--resume" not in p.stderr, p.stderr
    p = run_dtrain(None, "sample", "--checkpoint", "x", "-n", "-2", check=False, timeout=60)
    assert p.returncode == 2 and "-n" in p.stderr, p.stderr
    p = run_dtrain(None, "evaluate", "--checkpoint", "x", "--eval-images", "-1", check=False, timeout=60)
    assert p.returncode == 2 and "--eval-images" in p.stderr, p.stderr
