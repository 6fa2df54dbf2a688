"""Data-parallel training end to end, with real mpiexec processes (oversubscribed on 2 cores)."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dtrain.checkpoint import latest_checkpoint, load_checkpoint
from dtrain_run import dtrain_cmd, run_dtrain, train_losses
from helpers import final_state

SMALL = ["--batch-size", "8", "--hidden-dim", "12", "--wordvec-dim", "8", "--dtype", "float64",
         "--log-every", "1", "--eval-images", "8", "--eval-captions", "16", "--max-length", "6",
         "--lr", "5e-3", "--quiet"]


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    return tiny_data


def final_params(ckpt_dir):
    _, params, ck = final_state(ckpt_dir)
    return params, ck


def assert_close(a, b, tol=1e-10):
    for k in a:
        err = np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-30)
        assert err < tol, (k, err)


def train(data_dir, out, ranks, *extra, env=None, timeout=120):
    return run_dtrain(ranks, "train", "--data", data_dir, "--checkpoint-dir", out, *SMALL, *extra,
                      env=env, timeout=timeout)


@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_equivalence_across_world_sizes(data_dir, tmp_path, cell):
    """20 float64 steps: same loss curve and parameters on 1, 2 and 4 ranks, dense and sparse
    (2 ranks, dense: each rank's 4 rows as 2 micro-shards summed in floating point)."""
    train(data_dir, tmp_path / "p1", None, "--steps", 20, "--cell", cell)
    ref_params, _ = final_params(tmp_path / "p1")
    ref_losses = train_losses(tmp_path / "p1")
    assert len(ref_losses) == 20
    for ranks in (2, 4):
        for mode in ("dense", "sparse"):
            out = tmp_path / f"p{ranks}-{mode}"
            micro = ["--micro-batch", 2] if (ranks, mode) == (2, "dense") else []
            train(data_dir, out, ranks, "--steps", 20, "--cell", cell, "--embed-reduce", mode,
                  *micro)
            params, _ = final_params(out)
            assert_close(ref_params, params)
            losses = train_losses(out)
            assert [s for s, _ in losses] == [s for s, _ in ref_losses]
            np.testing.assert_allclose([v for _, v in losses], [v for _, v in ref_losses],
                                       rtol=1e-10)
            rows = [line for line in open(out / "metrics.jsonl") if '"train"' in line]
            assert f'"embed_reduce": "{mode}"' in rows[-1]


def test_ranks_bitwise_identical(data_dir, tmp_path):
    dump = tmp_path / "dump"
    train(data_dir, tmp_path / "ck", 4, "--steps", 6, "--embed-reduce", "sparse",
          "--dtype", "float32", "--check-every", "1", env={"DTRAIN_DUMP_DIR": str(dump)})
    for name in ("params", "m", "v"):
        ref = np.load(dump / f"rank0-{name}.npy")
        assert np.any(ref != 0)
        for r in (1, 2, 3):
            assert np.array_equal(ref, np.load(dump / f"rank{r}-{name}.npy")), (name, r)


@pytest.mark.parametrize("first,second", [(4, 2), (2, None)])
def test_resume_on_other_world_size(data_dir, tmp_path, first, second):
    """10 steps, checkpoint, 10 more on another world size == 20 uninterrupted steps."""
    train(data_dir, tmp_path / "full", 2, "--steps", 20)
    train(data_dir, tmp_path / "split", first, "--steps", 10)
    train(data_dir, tmp_path / "split", second, "--steps", 20, "--resume", "latest")
    a, ck = final_params(tmp_path / "full")
    b, ck2 = final_params(tmp_path / "split")
    assert int(ck2["step"]) == 20
    assert_close(a, b)
    np.testing.assert_allclose(np.asarray(ck["adam"]["m"]), np.asarray(ck2["adam"]["m"]),
                               rtol=1e-9, atol=1e-14)
    la, lb = dict(train_losses(tmp_path / "full")), dict(train_losses(tmp_path / "split"))
    for s in range(11, 21):
        assert abs(la[s] - lb[s]) <= 1e-10 * abs(la[s])


def test_rank_failure_aborts_job(data_dir, tmp_path):
    t0 = time.monotonic()
    proc = run_dtrain(4, "train", "--data", data_dir, "--checkpoint-dir", tmp_path, *SMALL,
                      "--steps", 200, env={"DTRAIN_FAULT": "raise@2:3"}, timeout=60, check=False)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "rank 2/4" in proc.stderr and "injected fault" in proc.stderr


def test_signal_on_one_rank_checkpoints_all_and_resumes(data_dir, tmp_path):
    """SIGTERM on rank 1 only: every rank stops after the same step, one checkpoint, exit 75."""
    proc = run_dtrain(2, "train", "--data", data_dir, "--checkpoint-dir", tmp_path, *SMALL,
                      "--steps", 200, env={"DTRAIN_FAULT": "signal@1:5"}, timeout=60, check=False)
    assert proc.returncode == 75, proc.stderr[-2000:]
    path = latest_checkpoint(tmp_path)
    ck = load_checkpoint(path)
    assert int(ck["step"]) in (5, 6)
    stopped = int(ck["step"])
    train(data_dir, tmp_path, 2, "--steps", stopped + 3, "--resume", "latest")
    _, ck2 = final_params(tmp_path)
    assert int(ck2["step"]) == stopped + 3


def test_external_sigterm_single_process(data_dir, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["train", "--data", str(data_dir), "--checkpoint-dir", str(tmp_path), *SMALL,
            "--steps", "100000"]
    args.remove("--quiet")
    proc = subprocess.Popen(dtrain_cmd(None, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("step") and "/100000" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert int(ck["step"]) >= 1


def test_bad_flags_and_data_are_one_line_errors(data_dir, tmp_path):
    p = run_dtrain(None, "train", "--data", tmp_path / "nope", "--steps", 1, check=False,
                   timeout=60)
    assert p.returncode != 0 and "nope" in p.stderr and "Traceback" not in p.stderr
    p = run_dtrain(2, "train", "--data", data_dir, "--batch-size", 7, "--steps", 1,
                   "--checkpoint-dir", tmp_path, check=False, timeout=60)
    assert p.returncode != 0 and "--batch-size" in p.stderr
    p = run_dtrain(None, "train", "--lr", "-1", check=False, timeout=60)
    assert p.returncode == 2 and "--lr" in p.stderr


def test_checkpoint_mismatch_refused(data_dir, tmp_path):
    train(data_dir, tmp_path, None, "--steps", 2)
    p = run_dtrain(None, "train", "--data", data_dir, "--checkpoint-dir", tmp_path, *SMALL,
                   "--hidden-dim", "16", "--steps", 4, "--resume", "latest", check=False,
                   timeout=60)
    assert p.returncode != 0 and "W_proj" in p.stderr and "shape" in p.stderr


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sample_and_evaluate_any_ranks(data_dir, tmp_path, cell):
    train(data_dir, tmp_path, 2, "--steps", 4, "--cell", cell)
    ck = latest_checkpoint(tmp_path)
    outs = [run_dtrain(r, "evaluate", "--checkpoint", ck, "--eval-images", 8, "--eval-captions", 16,
                       "--max-length", 6).stdout for r in (None, 2)]
    import json

    r1, r2 = (json.loads(out.strip().splitlines()[-1]) for out in outs)
    assert abs(r1["val_loss"] - r2["val_loss"]) < 1e-9 * abs(r1["val_loss"])
    assert r1["bleu4"] == pytest.approx(r2["bleu4"], abs=1e-12)
    s = run_dtrain(2, "sample", "--checkpoint", ck, "-n", 3, "--max-length", 6).stdout
    assert s.count("sampled :") == 3


def test_debug_mode(data_dir, tmp_path):
    p = run_dtrain(2, "train", "--data", data_dir, "--checkpoint-dir", tmp_path, *SMALL,
                   "--steps", 2, "--debug")
    assert "finite-difference check" in p.stdout
    assert "[rank 1] step 2" in p.stdout
