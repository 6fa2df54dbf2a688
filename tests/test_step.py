"""The one training step on one process: the accumulation protocol, the finite check, RunState.

Multi-rank behaviour (the reducers, --deterministic across world sizes, naming the rank
with a non-finite gradient, resuming a pre-RunState checkpoint) is tested with real
mpiexec in test_determinism.py and test_train.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtrain.checkpoint import CheckpointError, RunState, load_checkpoint, save_checkpoint
from dtrain.nn.model import CaptioningModel
from dtrain.nn.optim import Adam
from dtrain.parallel.accumulate import FloatAccumulator, PassThrough
from dtrain.parallel.reducer import LocalReducer
from dtrain.step import NonFiniteError, TrainStep
from helpers import random_captions, small_vocab

OLD_CHECKPOINT = Path(__file__).parent / "data" / "ckpt-pre-runstate-00000004.h5"
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _step(accumulator_cls, micro_batch=None, dtype=np.float64):
    model = CaptioningModel(small_vocab(30), 12, 8, 16, "lstm", dtype=dtype, seed=0)
    adam = Adam(model.num_params, dtype=dtype, xp=np)
    acc = accumulator_cls(LocalReducer(None))
    return model, TrainStep(model, adam, acc, micro_batch=micro_batch)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return random_captions(rng, n, 8, 30), rng.standard_normal((n, 12))


def test_float_accumulation_equals_one_pass():
    """Four micro-shards summed in float64 give one pass's loss, tokens and gradient
    (to rounding), and Adam then moves the parameters alike."""
    caps, feats = _batch()
    one_model, one = _step(PassThrough)
    acc_model, acc = _step(FloatAccumulator, micro_batch=2)
    seen = []
    r1 = one(feats, caps, 8, 1e-3)
    r4 = acc(feats, caps, 8, 1e-3, check=lambda g: seen.append(g.tokens))
    assert len(seen) == 4 and sum(seen) == r4.tokens == r1.tokens  # one check per micro-shard
    assert r4.loss == pytest.approx(r1.loss, rel=1e-13)
    np.testing.assert_allclose(acc_model.grad_buffer, one_model.grad_buffer, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(acc_model.param_buffer, one_model.param_buffer, rtol=1e-11,
                               atol=1e-15)
    assert r4.marks["forward_end"] == 0.0 and r1.marks["start"] < r1.marks["forward_end"]


def test_pass_through_takes_one_micro_shard():
    model, step = _step(PassThrough)
    acc = step.accumulator
    caps, feats = _batch()
    grads = step.step_pass.forward_backward(feats, caps, 8, 1e-3)
    acc.start()
    acc.add(grads)
    with pytest.raises(ValueError, match="one micro-shard"):
        acc.add(grads)


@pytest.mark.parametrize("accumulator_cls,micro", [(PassThrough, None), (FloatAccumulator, 4)])
def test_non_finite_step_is_not_applied(accumulator_cls, micro):
    model, step = _step(accumulator_cls, micro_batch=micro)
    caps, feats = _batch()
    before = model.param_buffer.copy()
    feats[5] = np.nan
    with pytest.raises(NonFiniteError) as err:
        step(feats, caps, 8, 1e-3)
    assert err.value.ranks == [0] and "rank(s) [0]" in str(err.value)
    assert np.array_equal(model.param_buffer, before) and step.optimizer.t == 0


def test_build_step_policy_on_two_ranks():
    """build_step on a real 2-rank communicator: the accumulator and micro-shards each setting
    gets, the one-line errors, and the bench's flags giving the trainer's step
    (tests/mpi_workers/step_policy.py asserts on every rank)."""
    worker = Path(__file__).parent / "mpi_workers" / "step_policy.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(worker)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stdout[-2000:] + p.stderr[-2000:]


# ------------------------------------------------------------------ RunState


def _state(**changes):
    rng = np.random.default_rng(1)
    state = RunState(step=7, params={"W": rng.standard_normal((3, 2)), "b": np.zeros(2)},
                     adam_m=rng.standard_normal(8), adam_v=rng.random(8), adam_t=7,
                     sampler={"epoch": 1, "step_in_epoch": 2}, config={"batch_size": 4, "lr": 0.1},
                     idx_to_word=["<NULL>", "<START>", "a"], seed=3, world_size=2,
                     data_fingerprint="train=4x3:00ff", accumulator={"exps": [40, 41]})
    for key, value in changes.items():
        setattr(state, key, value)
    return state


def test_run_state_round_trip(tmp_path):
    state = _state()
    path = state.write(tmp_path / "ckpt-00000007.h5")
    back = RunState.read(path)
    assert back.path == path and back.step == 7 and back.adam_t == 7 and back.seed == 3
    assert back.sampler == state.sampler and back.config == state.config
    assert back.idx_to_word == state.idx_to_word and back.world_size == 2
    assert back.data_fingerprint == state.data_fingerprint and back.accumulator == state.accumulator
    for name in state.params:
        assert np.array_equal(back.params[name], state.params[name])
    assert np.array_equal(back.adam_m, state.adam_m) and np.array_equal(back.adam_v, state.adam_v)
    # what the other ranks receive: JSON, without the arrays
    small = json.loads(json.dumps(back.without_arrays()))
    again = RunState.from_dict(small)
    assert again.params is None and again.path == path and again.accumulator == state.accumulator
    # no accumulator state (no --deterministic): no "extra" key on disk, as before
    plain = load_checkpoint(_state(accumulator=None).write(tmp_path / "plain.h5"))
    assert "extra" not in plain and RunState.from_checkpoint(plain).accumulator is None


def test_run_state_refuses_what_does_not_continue_the_run(tmp_path):
    path = _state().write(tmp_path / "ckpt-00000007.h5")
    state = RunState.read(path)
    shapes, vocab, fp = {"W": (3, 2), "b": (2,)}, ["<NULL>", "<START>", "a"], "train=4x3:00ff"
    state.check_resumable(shapes, vocab, fp, 4)
    with pytest.raises(CheckpointError, match="trained with --batch-size 4, now 8"):
        state.check_resumable(shapes, vocab, fp, 8)
    with pytest.raises(CheckpointError, match="parameter 'W' has shape"):
        state.check_resumable({"W": (2, 2), "b": (2,)}, vocab, fp, 4)
    with pytest.raises(CheckpointError, match="vocabulary differs from the data's at index 2"):
        state.check_resumable(shapes, ["<NULL>", "<START>", "b"], fp, 4)
    with pytest.raises(CheckpointError, match="trained on another data set"):
        state.check_resumable(shapes, vocab, "train=4x3:0000", 4)
    bare = _state().to_checkpoint()
    del bare["sampler"]
    save_checkpoint(tmp_path / "bare.h5", bare)
    with pytest.raises(CheckpointError, match="missing key 'sampler'"):
        RunState.read(tmp_path / "bare.h5")


def test_checkpoint_written_before_run_state_loads():
    """tests/data/ckpt-pre-runstate-00000004.h5 was written by the code of commit 331b205
    (before RunState: Trainer._checkpoint_state), 4 steps on 2 ranks of
    ``dtrain train --batch-size 48 --micro-batch 4 --deterministic --hidden-dim 12
    --wordvec-dim 8`` on tests' tiny data (write_synthetic(60 train, 8 val, seed 3))."""
    state = RunState.read(OLD_CHECKPOINT)
    assert state.step == 4 and state.adam_t == 4 and state.world_size == 2 and state.seed == 0
    assert state.sampler == {"epoch": 0, "step_in_epoch": 4}
    assert state.config["batch_size"] == 48 and state.config["micro_batch"] == 4
    assert len(state.idx_to_word) == 1004 and state.idx_to_word[0] == "<NULL>"
    assert state.data_fingerprint.startswith("train=300x17,val=40x17:")
    assert len(state.accumulator["exps"]) == len(state.params) == 8
    assert state.params["Wh"].shape == (12, 48) and state.adam_m.shape == state.adam_v.shape
    assert all(np.all(np.isfinite(v)) for v in state.params.values())
