"""Nothing silently wrong: damaged checkpoints are refused by name, never half-used;
failed writes (a full disk) leave the previous checkpoint and no partial file; non-finite
state is never written; a checkpoint knows the data it was trained on."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid

import h5py
import numpy as np
import pytest

from dtrain import checkpoint as ckpt_mod
from dtrain.checkpoint import (
    CheckpointError,
    check_same_data,
    checkpoint_path,
    choose_checkpoint,
    data_fingerprint,
    latest_checkpoint,
    latest_verified_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_aside_checkpoint,
    verify_checkpoint,
)
from dtrain.runlock import LockError, OutputPathError, RunLock, check_writable_dir

VOCAB = ["<NULL>", "<START>", "<END>", "<UNK>"] + [f"w{i}" for i in range(36)]


def small_state():
    """A real, small training state: every kind of value a checkpoint holds."""
    r = np.random.default_rng(1)
    V, H, W = len(VOCAB), 16, 8
    return {
        "step": 600,
        "params": {
            "W_embed": r.standard_normal((V, W)).astype(np.float32),
            "W_proj": r.standard_normal((12, H)).astype(np.float32),
            "Wx": r.standard_normal((W, 4 * H)).astype(np.float32),
            "W_vocab": r.standard_normal((H, V)).astype(np.float32),
            "b_vocab": r.standard_normal(V).astype(np.float32),
        },
        "adam": {
            "m": r.standard_normal(600).astype(np.float32),
            "v": r.random(600).astype(np.float32),
            "t": 600,
        },
        "sampler": {"epoch": 2, "step_in_epoch": 17, "seed": 5},
        "rng": {"numpy": np.random.default_rng(5).bit_generator.state},
        "config": {"cell": "lstm", "lr": 0.002, "batch_size": 128, "data": None},
        "vocab": {"idx_to_word": VOCAB},
        "data_fingerprint": "train=400x17,val=50x17:0123456789abcdef",
        "lr": 0.002,
        "finished": False,
        "name": "run-α",
        "nothing": None,
        "count": np.int32(7),
        "empty": np.zeros((0, 3), np.float32),
    }


def same(a, b) -> bool:
    """Exactly the same content: types, dtypes, shapes and values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    return type(a) is type(b) and a == b


def header_index(path):
    """The index stored in a checkpoint's header (entries with byte ranges)."""
    raw = path.read_bytes()
    line, _, rest = raw.partition(b"\n")
    n = int(re.search(rb"index=(\d+)", line).group(1))
    return json.loads(rest[:n])


def test_fuzzed_copies_are_refused_or_identical(tmp_path):
    """Random single-byte changes and zeroed blocks anywhere in the file: each copy
    either loads exactly the original content or is refused with one line naming it."""
    original = save_checkpoint(tmp_path / "ckpt-00000600.h5", small_state())
    reference = load_checkpoint(original)
    assert same(reference, small_state())
    raw = original.read_bytes()
    rng = np.random.default_rng(2024)
    damaged = tmp_path / "damaged.h5"
    outcome = {"refused": 0, "identical": 0}
    reasons = set()
    trials = [("flip", i) for i in range(1200)] + [("zero", i) for i in range(150)]
    for kind, _ in trials:
        buf = bytearray(raw)
        offset = int(rng.integers(0, len(buf)))
        if kind == "flip":
            buf[offset] ^= int(rng.integers(1, 256))  # any other byte value
        else:
            length = int(rng.integers(64, 4097))
            buf[offset : offset + length] = bytes(len(buf[offset : offset + length]))
        damaged.write_bytes(bytes(buf))
        try:
            got = load_checkpoint(damaged)
        except CheckpointError as exc:
            text = str(exc)
            assert "\n" not in text and text.startswith(f"checkpoint {damaged}: "), text
            outcome["refused"] += 1
            reasons.add(exc.reason)
            continue
        assert same(reference, got), f"{kind} at byte {offset} loaded different content"
        outcome["identical"] += 1
    assert outcome["refused"] + outcome["identical"] == len(trials)
    # the fuzz reached the data and the structure, not only padding
    assert outcome["refused"] > len(trials) // 2, outcome
    for name in ("params/W_vocab", "adam/m", "adam/v"):
        assert f"dataset {name} fails its checksum (file damaged)" in reasons, reasons
    assert any("HDF5 structure" in r for r in reasons), reasons


def test_each_dataset_named_when_its_bytes_change(tmp_path):
    """A change inside any dataset's stored bytes (arrays, scalars, JSON, strings) is
    reported as that dataset failing its checksum."""
    path = save_checkpoint(tmp_path / "ckpt-00000600.h5", small_state())
    raw = path.read_bytes()
    index = header_index(path)
    stored = [e for e in index["entries"] if e.get("offset") is not None and e["nbytes"] > 0]
    names = {e["name"] for e in stored}
    assert {"params/W_vocab", "adam/t", "config", "vocab", "step", "name"} <= names
    for e in stored:
        for pos in (e["offset"], e["offset"] + e["nbytes"] - 1):
            buf = bytearray(raw)
            buf[pos] ^= 0x01
            path.write_bytes(bytes(buf))
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(path)
            assert str(err.value) == (
                f"checkpoint {path}: dataset {e['name']} fails its checksum (file damaged)"
            )
    # the header's index itself (one digit of the digest it records)
    buf = bytearray(raw)
    pos = raw.index(b'"rest_sha256": "') + len(b'"rest_sha256": "')
    buf[pos] = ord("a") if buf[pos] != ord("a") else ord("b")
    path.write_bytes(bytes(buf))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {path}: header or index fails its checksum (file damaged)"
    )
    # a field of the header line (the size, one digit changed) is under the digest too
    line = raw[: raw.index(b"\n")]
    size_at = line.index(b" size=") + len(b" size=")
    buf = bytearray(raw)
    buf[size_at] = ord("9") if buf[size_at] != ord("9") else ord("8")
    path.write_bytes(bytes(buf))
    with pytest.raises(CheckpointError, match="header or index fails its checksum"):
        load_checkpoint(path)


def test_attribute_and_structure_damage_refused(tmp_path):
    """Changes HDF5 itself accepts (an attribute's value, a renamed group, a dataset
    removed or added) are refused: the structure is under a checksum too."""
    edits = {
        "version attribute": lambda f: f.attrs.modify("dtrain_checkpoint_version", 3),
        "new attribute": lambda f: f["params/W_vocab"].attrs.create("x", 1),
        "renamed group": lambda f: f.move("adam", "adan"),
        "removed dataset": lambda f: f.__delitem__("adam/t"),
        "added dataset": lambda f: f.create_dataset("params/W_extra", data=np.ones(3)),
    }
    for what, edit in edits.items():
        path = save_checkpoint(tmp_path / f"{what.replace(' ', '-')}.h5", small_state())
        with h5py.File(path, "r+") as f:
            edit(f)
        with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path}: ")) as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value), what


def test_hdf5_never_opens_a_damaged_file(tmp_path, monkeypatch):
    """Some damaged HDF5 files make the library loop forever; the byte checks come first."""
    path = save_checkpoint(tmp_path / "c.h5", small_state())
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(h5py, "File", lambda *a, **k: opened.append(a) or real_file(*a, **k))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert opened == []
    load_checkpoint(save_checkpoint(tmp_path / "good.h5", small_state()))
    assert len(opened) == 2  # the patch works: the good file was written and read through it


def test_latest_verified_checkpoint_skips_damaged(tmp_path):
    assert latest_verified_checkpoint(tmp_path) == (None, [])
    state = small_state()
    for step in (100, 200, 300):
        save_checkpoint(checkpoint_path(tmp_path, step), dict(state, step=step))
    good, cut, flipped = (checkpoint_path(tmp_path, s) for s in (100, 200, 300))
    cut.write_bytes(cut.read_bytes()[:-100])
    entry = next(e for e in header_index(flipped)["entries"] if e["name"] == "params/W_vocab")
    raw = bytearray(flipped.read_bytes())
    raw[entry["offset"] + 5] ^= 0x40
    flipped.write_bytes(bytes(raw))

    assert latest_checkpoint(tmp_path) == flipped  # by name alone: the damaged one
    path, skipped = latest_verified_checkpoint(tmp_path)
    assert path == good and load_checkpoint(path)["step"] == 100
    assert [p for p, _ in skipped] == [flipped, cut]
    assert skipped[0][1] == "dataset params/W_vocab fails its checksum (file damaged)"
    assert "truncated" in skipped[1][1] and str(cut) not in skipped[1][1]
    verify_checkpoint(good)
    with pytest.raises(CheckpointError, match="ckpt-00000300.h5: dataset params/W_vocab"):
        verify_checkpoint(flipped)

    # set aside, the damaged ones no longer count (resume, prune) but stay for inspection
    assert set_aside_checkpoint(flipped) == tmp_path / "ckpt-00000300.h5.damaged"
    assert latest_verified_checkpoint(tmp_path) == (good, [(cut, skipped[1][1])])
    save_checkpoint(flipped, dict(state, step=300))  # the same step, written again later
    assert set_aside_checkpoint(flipped) == tmp_path / "ckpt-00000300.h5.damaged-1"
    assert prune_checkpoints(tmp_path, keep=1) == [good]
    assert latest_checkpoint(tmp_path) == cut
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000200.h5", "ckpt-00000300.h5.damaged", "ckpt-00000300.h5.damaged-1",
    ]  # fmt: skip

    cut.write_bytes(b"\0" * 4096)
    path, skipped = latest_verified_checkpoint(tmp_path)
    assert path is None and skipped == [(cut, "not a dtrain checkpoint (no dtrain header; "
                                              "truncated or corrupt?)")]  # fmt: skip


def test_choose_checkpoint_renames_damaged_files_only_for_the_directory_owner(tmp_path):
    """One resolution of "latest" for --resume, --init-from and readers; only the run that
    owns the directory (--resume latest) sets damaged files aside."""
    state = small_state()
    for step in (100, 200):
        save_checkpoint(checkpoint_path(tmp_path, step), dict(state, step=step))
    good, bad = checkpoint_path(tmp_path, 100), checkpoint_path(tmp_path, 200)
    bad.write_bytes(bad.read_bytes()[:-100])
    why = latest_verified_checkpoint(tmp_path)[1][0][1]
    for arg in ("latest", str(tmp_path)):
        said = []
        path, loaded = choose_checkpoint(arg, tmp_path, "--checkpoint", say=said.append)
        assert path == good and int(loaded["step"]) == 100 and bad.exists()
        assert said == [f"--checkpoint {arg}: skipped {bad}: {why}"]
    said = []
    path, _ = choose_checkpoint("latest", tmp_path, "--resume", say=said.append, owner=True)
    assert path == good and not bad.exists() and said[0].endswith("(set aside as "
                                                                  "ckpt-00000200.h5.damaged)")
    good.write_bytes(b"\0" * 4096)
    with pytest.raises(CheckpointError, match="--resume latest: no checkpoint in .* verifies "
                       r"\(all 1 damaged, set aside as \*.damaged; the newest: not a dtrain"):
        choose_checkpoint("latest", tmp_path, "--resume", say=print, owner=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000100.h5.damaged", "ckpt-00000200.h5.damaged"]


# ------------------------------------------------------------------ writing


def test_non_finite_state_is_not_written(tmp_path):
    for where, bad in (
        ("params/Wx", {"params": {"Wx": np.array([[1.0, np.nan]], np.float32)}}),
        ("adam/v", {"adam": {"v": np.array([np.inf, 1.0])}}),
        ("loss", {"loss": np.float32(-np.inf)}),
    ):
        path = checkpoint_path(tmp_path / "ck", 5)
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(path, {"step": 5, **bad})
        assert str(err.value) == (
            f"refusing to write checkpoint {path}: {where} has non-finite values"
        )
        assert not (tmp_path / "ck").exists() or list((tmp_path / "ck").iterdir()) == []
    # integers and finite floats are fine
    save_checkpoint(tmp_path / "ok.h5", {"a": np.arange(3), "b": np.ones(2), "c": 1.5})


def _save_fails_cleanly(directory, expected_message_re):
    """Save step 2 over a directory holding step 1; the error is one line and
    nothing but the step-1 checkpoint is left."""
    prev = checkpoint_path(directory, 1)
    target = checkpoint_path(directory, 2)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(target, dict(small_state(), step=2))
    text = str(err.value)
    assert "\n" not in text and re.fullmatch(expected_message_re, text), text
    assert sorted(p.name for p in directory.iterdir()) == [prev.name]  # no temp, no partial
    assert load_checkpoint(prev)["step"] == 1
    return text


def test_disk_full_while_writing_data(tmp_path, monkeypatch):
    """HDF5 reports ENOSPC from a dataset write (as h5py raises it)."""
    prev = save_checkpoint(checkpoint_path(tmp_path, 1), dict(small_state(), step=1))
    calls = []
    real = h5py.Group.create_dataset

    def failing(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 4:
            raise OSError(
                errno.ENOSPC,
                "Can't synchronously write data (file write failed: errno = 28, "
                "error message = 'No space left on device')",
            )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    target = checkpoint_path(tmp_path, 2)
    text = _save_fails_cleanly(tmp_path, ".*")
    assert text == f"no space left on device writing {target}; previous checkpoint {prev} kept"
    assert len(calls) == 4


def test_disk_full_at_fsync_and_other_write_errors(tmp_path, monkeypatch):
    prev = save_checkpoint(checkpoint_path(tmp_path, 1), dict(small_state(), step=1))
    target = checkpoint_path(tmp_path, 2)
    real_fsync = os.fsync
    for code, expected in (
        (errno.ENOSPC,
         f"no space left on device writing {target}; previous checkpoint {prev} kept"),
        (errno.EDQUOT, f"disk quota exceeded writing {target}; previous checkpoint {prev} kept"),
        (errno.EIO, rf"cannot write checkpoint {re.escape(str(target))} \(\[Errno 5\] .*\); "
                    rf"previous checkpoint {re.escape(str(prev))} kept"),
    ):  # fmt: skip

        def fsync(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fsync)
        text = _save_fails_cleanly(tmp_path, re.escape(expected) if code != errno.EIO else expected)
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert text.count(str(target)) == 1
    # a first checkpoint that cannot be written says there is none before it
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError, match=r"; previous checkpoint none kept$"):
        save_checkpoint(checkpoint_path(empty, 1), small_state())
    assert list(empty.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    directory = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    r = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True)


def test_real_full_disk(tiny_tmpfs):
    """On a real 64 KiB file system: the big checkpoint fails with one line, the
    small one before it stays, and the space is given back (no file left open)."""
    small = {"step": 1, "params": {"W": np.arange(100, dtype=np.float32)}}
    prev = save_checkpoint(checkpoint_path(tiny_tmpfs, 1), small)
    free_before = os.statvfs(tiny_tmpfs).f_bfree
    target = checkpoint_path(tiny_tmpfs, 2)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(target, {"step": 2, "params": {"W": np.ones(200_000, np.float32)}})
    assert str(err.value) == (
        f"no space left on device writing {target}; previous checkpoint {prev} kept"
    )
    assert [p.name for p in tiny_tmpfs.iterdir()] == [prev.name]
    assert os.statvfs(tiny_tmpfs).f_bfree == free_before
    assert load_checkpoint(prev)["params"]["W"].tobytes() == small["params"]["W"].tobytes()
    save_checkpoint(checkpoint_path(tiny_tmpfs, 3), dict(small, step=3))  # room again


# --------------------------------------------------------- data fingerprint


def _data(seed=0, n=50):
    r = np.random.default_rng(seed)
    caps = {"train": r.integers(0, 40, (n, 17)).astype(np.int32), "val": r.integers(0, 40, (9, 17))}
    idxs = {"train": r.integers(0, 20, n), "val": r.integers(0, 5, 9)}
    return caps, idxs


def test_data_fingerprint():
    caps, idxs = _data()
    fp = data_fingerprint(caps, idxs)
    assert fp == data_fingerprint(*_data())
    assert fp.startswith("train=50x17,val=9x17:") and re.fullmatch(r"[^ ]+:[0-9a-f]{16}", fp)
    # the integer width a loader uses does not matter; the values do
    wide = {k: v.astype(np.int64) for k, v in caps.items()}
    assert data_fingerprint(wide, idxs) == fp
    one_token = {k: v.copy() for k, v in caps.items()}
    one_token["train"][31, 4] += 1
    assert data_fingerprint(one_token, idxs) != fp
    one_image = {k: v.copy() for k, v in idxs.items()}
    one_image["val"][0] += 1
    assert data_fingerprint(caps, one_image) != fp
    assert data_fingerprint(*_data(n=49)) != fp
    swapped = {"train": caps["val"], "val": caps["train"]}
    assert data_fingerprint(swapped, {"train": idxs["val"], "val": idxs["train"]}) != fp


def test_check_same_data(tmp_path):
    caps, idxs = _data()
    fp = data_fingerprint(caps, idxs)
    path = save_checkpoint(tmp_path / "ckpt-00000600.h5", {"step": 600, "data_fingerprint": fp})
    ckpt = load_checkpoint(path)
    check_same_data(ckpt, fp, path)  # same data: fine
    check_same_data(load_checkpoint(save_checkpoint(tmp_path / "old.h5", {"step": 1})), fp, path)
    other = data_fingerprint(*_data(seed=1))
    with pytest.raises(CheckpointError) as err:
        check_same_data(ckpt, other, path)
    assert str(err.value) == (
        f"checkpoint {path} was trained on another data set (fingerprint {fp} vs {other}); "
        f"use --init-from {path} to start a new run from its parameters"
    )
    assert err.value.user_error


def test_module_keeps_its_public_names():
    for name in ("save_checkpoint", "load_checkpoint", "latest_checkpoint", "choose_checkpoint",
                 "checkpoint_path", "list_checkpoints", "prune_checkpoints", "check_compatible",
                 "verify_checkpoint", "latest_verified_checkpoint", "data_fingerprint",
                 "check_same_data", "set_aside_checkpoint", "CheckpointError"):  # fmt: skip
        assert name in ckpt_mod.__all__ and callable(getattr(ckpt_mod, name))


# ----------------------------------------------------------------- run lock

HOLD = """
import sys, time
from dtrain.runlock import RunLock
msg = RunLock(sys.argv[1]).acquire()
print("locked", msg, flush=True)
time.sleep(120)
"""

TRY = """
import sys
from dtrain.runlock import LockError, RunLock
try:
    RunLock(sys.argv[1]).acquire()
except LockError as exc:
    print(exc)
    sys.exit(3)
print("acquired")
"""


def test_run_lock_one_run_per_directory(tmp_path):
    directory = tmp_path / "ckpt" / "run1"  # created by acquire
    host = socket.gethostname()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked None"
        info = json.loads((directory / ".dtrain.lock").read_text())
        assert info["pid"] == holder.pid and info["host"] == host
        assert info["argv"][-1] == str(directory) and info["start_time"]

        # a second process, and this one, are refused while the holder lives
        other = subprocess.run(
            [sys.executable, "-c", TRY, str(directory)], capture_output=True, text=True, timeout=60
        )
        assert other.returncode == 3, other.stderr
        expected = (
            f"checkpoint directory {directory} is in use by pid {holder.pid} on host {host} "
            f"since {info['start_time']}; stop that run or use another --checkpoint-dir"
        )
        assert other.stdout.strip() == expected
        with pytest.raises(LockError) as err:
            RunLock(directory).acquire()
        assert str(err.value) == expected and err.value.user_error

        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops the flock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()

    lock = RunLock(directory)
    message = lock.acquire()
    assert message == (
        f"took over stale lock in {directory}: left by pid {holder.pid} on host {host} "
        f"since {info['start_time']}, which is no longer running"
    )
    assert json.loads((directory / ".dtrain.lock").read_text())["pid"] == os.getpid()
    assert lock.acquire() is None  # already held: nothing happens
    lock.release()
    assert (directory / ".dtrain.lock").read_text() == ""  # released cleanly: no name left
    with RunLock(directory) as again:  # a clean release leaves nothing to report
        assert again.held and again.message is None
        refused = subprocess.run(
            [sys.executable, "-c", TRY, str(directory)], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 3 and f"in use by pid {os.getpid()} " in refused.stdout
    assert not again.held
    ok = subprocess.run(
        [sys.executable, "-c", TRY, str(directory)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "acquired", ok.stdout + ok.stderr


def test_check_writable_dir(tmp_path):
    made = check_writable_dir(tmp_path / "a" / "b" / "c", "--checkpoint-dir")
    assert made.is_dir() and list(made.iterdir()) == []  # probe removed
    a_file = tmp_path / "hostname"
    a_file.write_text("x")
    with pytest.raises(OutputPathError) as err:
        check_writable_dir(a_file / "x", "--checkpoint-dir")
    assert str(err.value) == (f"--checkpoint-dir {a_file / 'x'}: cannot create directory "
                              "(Not a directory)")
    assert err.value.user_error
    with pytest.raises(OutputPathError,
                       match=r"^--metrics-dir \S+hostname: exists and is not a dir"):
        check_writable_dir(a_file, "--metrics-dir")


def test_check_writable_dir_read_only(tmp_path):
    """A directory that exists but cannot be written (a read-only mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs root and mount(8)")
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        with pytest.raises(OutputPathError) as err:
            check_writable_dir(ro, "--checkpoint-dir")
        assert str(err.value) == (f"--checkpoint-dir {ro}: cannot write there "
                                  "(Read-only file system)")
        with pytest.raises(OutputPathError, match="cannot create directory .Read-only file system"):
            RunLock(ro / "sub").acquire()
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
