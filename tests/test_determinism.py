"""--deterministic: bitwise identical training for any number of ranks (real mpiexec)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dtrain_run import run_dtrain
from helpers import final_state

BASE = ["--batch-size", "48", "--micro-batch", "4", "--deterministic", "--hidden-dim", "12",
        "--wordvec-dim", "8", "--eval-images", "8", "--eval-captions", "16", "--max-length", "6",
        "--lr", "5e-3", "--quiet"]


OLD_CHECKPOINT = Path(__file__).parent / "data" / "ckpt-pre-runstate-00000004.h5"


def train(data, out, ranks, *extra, timeout=180):
    return run_dtrain(ranks, "train", "--data", data, "--checkpoint-dir", out, *BASE, *extra,
                      timeout=timeout)


def assert_bitwise_equal(a_dir, b_dir):
    step_a, pa, ca = final_state(a_dir)
    step_b, pb, cb = final_state(b_dir)
    assert step_a == step_b
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), (k, float(np.abs(pa[k] - pb[k]).max()))
    for k in ("m", "v"):
        assert np.array_equal(np.asarray(ca["adam"][k]), np.asarray(cb["adam"][k])), k
    assert int(ca["adam"]["t"]) == int(cb["adam"]["t"])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_float32_bitwise_identical_on_1_to_4_ranks(tiny_data, tmp_path, cell):
    """16 float32 steps: parameters and Adam state array_equal on 1, 2, 3 and 4 ranks,
    with the embedding gradient reduced sparse and dense."""
    train(tiny_data, tmp_path / "p1", None, "--steps", 16, "--cell", cell)
    step, params, _ = final_state(tmp_path / "p1")
    assert step == 16 and all(np.all(np.isfinite(v)) for v in params.values())
    for ranks in (2, 3, 4):
        for mode in ("sparse", "dense"):
            out = tmp_path / f"p{ranks}-{mode}"
            train(tiny_data, out, ranks, "--steps", 16, "--cell", cell, "--embed-reduce", mode)
            assert_bitwise_equal(tmp_path / "p1", out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_on_other_world_size_bitwise(tiny_data, tmp_path, dtype):
    """Checkpointed on 2 ranks after 8 steps, resumed on 3 to step 16 == 16 steps on 1 rank.
    float32: also resumed from a checkpoint the code before RunState wrote (4 steps on 2 ranks,
    see test_step.py), on 3 ranks: the same bits (the on-disk format did not change)."""
    train(tiny_data, tmp_path / "full", None, "--steps", 16, "--dtype", dtype)
    train(tiny_data, tmp_path / "split", 2, "--steps", 8, "--dtype", dtype)
    train(tiny_data, tmp_path / "split", 3, "--steps", 16, "--dtype", dtype, "--resume", "latest")
    assert_bitwise_equal(tmp_path / "full", tmp_path / "split")
    if dtype == "float32":
        (tmp_path / "old").mkdir()
        shutil.copy(OLD_CHECKPOINT, tmp_path / "old" / "ckpt-00000004.h5")
        train(tiny_data, tmp_path / "old", 3, "--steps", 16, "--resume", "latest")
        starts = [json.loads(line) for line in open(tmp_path / "old" / "metrics.jsonl")]
        starts = [r for r in starts if r["kind"] == "start"]
        assert len(starts) == 1 and starts[0]["step"] == 4 and starts[0]["resumed_from"].endswith(
            "ckpt-00000004.h5")
        assert_bitwise_equal(tmp_path / "full", tmp_path / "old")


def test_non_finite_gradient_names_its_rank(tiny_data, tmp_path):
    """A NaN on rank 1 is never rounded into the integer sums: the step is not applied and
    the error names rank 1 alone."""
    p = run_dtrain(2, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *BASE,
                   "--steps", 4, env={"DTRAIN_FAULT": "nan@1:3"}, check=False, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "step 3:" in p.stderr and "rank(s) [1]" in p.stderr and "Traceback" not in p.stderr


def test_float64_bitwise_identical(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "p1", None, "--steps", 8, "--dtype", "float64", "--cell", "gru")
    train(tiny_data, tmp_path / "p4", 4, "--steps", 8, "--dtype", "float64", "--cell", "gru")
    assert_bitwise_equal(tmp_path / "p1", tmp_path / "p4")


def test_without_deterministic_world_sizes_differ(tiny_data, tmp_path):
    """The property is not free: plain float32 training on 1 and 2 ranks differs in the last
    bits."""
    plain = [a for a in BASE if a != "--deterministic"]
    for ranks, out in ((None, "a"), (2, "b")):
        run_dtrain(ranks, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path / out, *plain,
                   "--steps", 16, "--threads-per-rank", "1", timeout=180)
    _, pa, _ = final_state(tmp_path / "a")
    _, pb, _ = final_state(tmp_path / "b")
    assert any(not np.array_equal(pa[k], pb[k]) for k in pa)
    # close as a whole: Adam divides by the gradient's own scale, so a last-bit difference
    # in a rarely seen word's tiny gradient can move that one row by much more than its
    # last bit (measured: 1.2e-5 to 6.7e-5 at one W_embed entry, depending on the
    # kernels), while every parameter's difference stays near 1e-5 of its norm
    for k in pa:
        assert np.linalg.norm(pa[k] - pb[k]) <= 1e-3 * np.linalg.norm(pa[k]), k


def test_ranks_must_divide_micro_shards(tiny_data, tmp_path):
    p = run_dtrain(4, "train", "--data", tiny_data, "--checkpoint-dir", tmp_path, *BASE,
                   "--micro-batch", "8", "--steps", 1, check=False, timeout=60)
    assert p.returncode == 2, p.stderr[-500:]
    assert "--micro-batch 8" in p.stderr and "4 ranks" in p.stderr, p.stderr[-500:]
    assert "Traceback" not in p.stderr
