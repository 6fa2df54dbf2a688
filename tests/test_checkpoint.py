"""Checkpoint tests: round trip, naming, refusal of bad files, and crash safety."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dtrain.checkpoint import (
    CheckpointError,
    check_compatible,
    checkpoint_path,
    choose_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)

WORKERS = Path(__file__).parent / "mpi_workers"
VOCAB = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "cat"]


def full_state():
    rng = np.random.default_rng(3)
    params = {
        "W_embed": rng.standard_normal((6, 4)).astype(np.float32),
        "W_vocab": rng.standard_normal((5, 6)).astype(np.float32),
        "b_vocab": np.zeros(6, np.float32),
        "scalar_array": np.array(2.5, np.float64),
    }
    flat = rng.standard_normal(77)
    return {
        "step": 1234,
        "params": params,
        "adam": {"m": flat, "v": flat**2, "t": 1234},
        "sampler": {"epoch": 3, "step_in_epoch": 17},
        "rng": {"numpy": np.random.default_rng(5).bit_generator.state, "seed": 5},
        "config": {"cell_type": "lstm", "lr": 5e-3, "hidden_dim": 512, "buckets": [1, 2]},
        "vocab": {"idx_to_word": VOCAB, "word_to_idx": {w: i for i, w in enumerate(VOCAB)}},
        "extra": {"best_bleu": 0.25, "notes": None},
        "world_size": 4,
        "lr": 0.001,
        "finished": False,
        "name": "run-α",
        "count": np.int32(7),
        "nothing": None,
    }


def test_round_trip(tmp_path):
    state = full_state()
    path = save_checkpoint(checkpoint_path(tmp_path, 1234), state)
    assert path == tmp_path / "ckpt-00001234.h5"
    got = load_checkpoint(path)
    for name, arr in state["params"].items():
        assert got["params"][name].dtype == arr.dtype
        assert got["params"][name].shape == arr.shape
        assert got["params"][name].tobytes() == arr.tobytes()
    assert got["adam"]["m"].tobytes() == state["adam"]["m"].tobytes()
    assert got["adam"]["v"].tobytes() == state["adam"]["v"].tobytes()
    for key in ("step", "sampler", "rng", "config", "vocab", "extra", "world_size", "lr"):
        assert got[key] == state[key], key
    assert type(got["step"]) is int and type(got["lr"]) is float
    assert got["finished"] is False and got["nothing"] is None and got["name"] == "run-α"
    assert got["count"].dtype == np.int32 and got["count"] == 7
    rng = np.random.default_rng()
    rng.bit_generator.state = got["rng"]["numpy"]
    assert rng.random() == np.random.default_rng(5).random()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    with h5py.File(path, "r") as f:  # plain HDF5: JSON strings, no pickles
        assert f["config"].dtype.kind == "S" and f.attrs["dtrain_checkpoint_version"] == 2
        assert json.loads(f["config"][()]) == state["config"]
    assert path.read_bytes().startswith(b"DTRAIN-CHECKPOINT version=2 ")


def test_missing_key_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path / "c.h5", {"step": 1, "adam": {"t": 1}})
    got = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"c\.h5: missing key 'adam/m'"):
        got["adam"]["m"]
    with pytest.raises(CheckpointError, match="missing key 'params/W'"):
        load_checkpoint(path, required=("step", "params/W"))


def test_unsupported_value_refused_and_no_temp_left(tmp_path):
    with pytest.raises(ValueError, match="params/bad"):
        save_checkpoint(tmp_path / "c.h5", {"params": {"bad": np.array([object()])}})
    assert list(tmp_path.iterdir()) == []


def test_latest_prune_resolve(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nope") is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        choose_checkpoint("latest", tmp_path, "--init-from", say=print)
    # the run that owns the directory starts fresh in an empty one
    assert choose_checkpoint("latest", tmp_path, "--resume", say=print, owner=True) == (None, None)
    for step in (5, 20, 100):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    # a temp file from a live writer (this process) and one from a dead pid
    live = tmp_path / f"ckpt-00000200.h5.tmp-{os.getpid()}"
    live.write_bytes(b"partial")
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    dead = tmp_path / f"ckpt-00000300.h5.tmp-{dead_pid.pid}"
    dead.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    def chosen(arg, directory):
        path, state = choose_checkpoint(arg, directory, "--resume", say=print)
        assert int(state["step"]) == int(path.name[5:13])
        return path

    assert chosen("latest", tmp_path) == checkpoint_path(tmp_path, 100)
    assert chosen(str(tmp_path), None) == checkpoint_path(tmp_path, 100)
    assert chosen(checkpoint_path(tmp_path, 5), tmp_path) == checkpoint_path(tmp_path, 5)
    with pytest.raises(CheckpointError, match="ckpt-00000007.h5: no such checkpoint file"):
        chosen(checkpoint_path(tmp_path, 7), tmp_path)
    with pytest.raises(CheckpointError, match="ckpt-00000005.h5: missing key 'params'"):
        choose_checkpoint(checkpoint_path(tmp_path, 5), None, "--resume", say=print,
                          required=("params",))
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == sorted(["ckpt-00000005.h5", dead.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt-00000020.h5", "ckpt-00000100.h5", live.name, "notes.txt"]
    )
    assert prune_checkpoints(tmp_path, keep=0) == []  # 0: keep everything
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 100


def test_bad_files_refused_with_file_name(tmp_path):
    missing = tmp_path / "missing.h5"
    with pytest.raises(CheckpointError, match=r"missing\.h5: no such file"):
        load_checkpoint(missing)

    good = save_checkpoint(tmp_path / "good.h5", full_state())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.h5: file is \d+ bytes, .*truncated"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(CheckpointError, match=r"garbage\.h5"):
        load_checkpoint(garbage)

    # flip bytes inside a parameter's data: its SHA-256 catches it
    big = np.arange(100_000, dtype=np.float32)
    flipped = save_checkpoint(tmp_path / "flipped.h5", {"params": {"W": big}})
    raw = bytearray(flipped.read_bytes())
    pos = bytes(raw).find(big[50_000:50_004].tobytes())
    assert pos > 0
    raw[pos : pos + 4] = b"\xff\xff\xff\xff"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError, match=r"flipped\.h5: dataset params/W fails its checksum \(file damaged\)"
    ):
        load_checkpoint(flipped)

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(CheckpointError, match=r"foreign\.h5: not a dtrain checkpoint"):
        load_checkpoint(foreign)

    future = save_checkpoint(tmp_path / "future.h5", {"step": 1})
    raw = future.read_bytes()
    assert raw.startswith(b"DTRAIN-CHECKPOINT version=2 ")
    future.write_bytes(raw.replace(b"version=2 ", b"version=9 ", 1))
    with pytest.raises(CheckpointError, match=r"future\.h5: format version 9 \(a newer dtrain's"):
        load_checkpoint(future)

    old = tmp_path / "old.h5"  # format version 1: no checksummed header
    with h5py.File(old, "w") as f:
        f.attrs["dtrain_checkpoint_version"] = 1
        f["step"] = 1
    with pytest.raises(CheckpointError, match=r"old\.h5: not a dtrain checkpoint .*version 1"):
        load_checkpoint(old)


def test_check_compatible(tmp_path):
    state = full_state()
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "c.h5", state))
    shapes = {k: v.shape for k, v in state["params"].items()}
    check_compatible(ckpt, shapes, VOCAB)  # fits

    with pytest.raises(
        CheckpointError, match=r"c\.h5: parameter 'W_embed' has shape \(6, 4\).*\(6, 8\)"
    ):
        check_compatible(ckpt, {**shapes, "W_embed": (6, 8)}, VOCAB)
    with pytest.raises(CheckpointError, match="has no parameter 'Wx'"):
        check_compatible(ckpt, {**shapes, "Wx": (4, 16)}, VOCAB)
    fewer = dict(shapes)
    del fewer["b_vocab"]
    with pytest.raises(CheckpointError, match="parameter 'b_vocab' is not in the model"):
        check_compatible(ckpt, fewer, VOCAB)
    other = VOCAB[:4] + ["the", "cat"]
    with pytest.raises(CheckpointError, match="index 4: checkpoint has 'a', data has 'the'"):
        check_compatible(ckpt, shapes, other)
    with pytest.raises(CheckpointError, match="vocabulary has 6 words, the data's has 7"):
        check_compatible(ckpt, shapes, VOCAB + ["dog"])


@pytest.mark.timeout(120)
def test_sigkill_during_write_keeps_previous_checkpoint(tmp_path):
    """A writer killed mid-write leaves the previous checkpoint intact and loadable,
    and nothing under a real checkpoint name that fails to load."""
    killed_mid_write = False
    for attempt in range(3):
        directory = tmp_path / f"try{attempt}"
        proc = subprocess.Popen(
            [sys.executable, str(WORKERS / "ckpt_writer.py"), str(directory), "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "saved 1"
            assert proc.stdout.readline().strip() == "writing 2"
            deadline = time.monotonic() + 30
            threshold = 20_000_000 >> attempt  # kill once the temp file holds this much
            while time.monotonic() < deadline and proc.poll() is None:
                tmps = list(directory.glob("ckpt-00000002.h5.tmp-*"))
                if tmps and tmps[0].stat().st_size > threshold:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.001)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if proc.returncode == -signal.SIGKILL:
            killed_mid_write = True
            break
    assert killed_mid_write, "the writer finished before it could be killed mid-write"

    assert latest_checkpoint(directory) == checkpoint_path(directory, 1)
    prev = load_checkpoint(checkpoint_path(directory, 1))
    assert prev["step"] == 1 and prev["config"] == {"note": "previous"}
    assert prev["params"]["W"].tobytes() == np.arange(12, dtype=np.float32).reshape(3, 4).tobytes()
    for path in directory.glob("ckpt-*.h5"):
        load_checkpoint(path)  # every file under a real name loads
    assert not checkpoint_path(directory, 2).exists()
    leftovers = list(directory.glob("ckpt-00000002.h5.tmp-*"))
    assert leftovers, "expected the killed writer's temp file"
    assert set(prune_checkpoints(directory, keep=5)) == set(leftovers)
