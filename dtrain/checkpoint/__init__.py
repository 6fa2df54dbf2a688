"""Atomic, verified, world-size-agnostic HDF5 checkpoints, and the state a run keeps in them.

A checkpoint is one HDF5 file holding a nested state dict: dicts become
groups, arrays and scalars become datasets, strings become string datasets,
and the JSON-able dicts under the keys "config", "vocab" and "extra" (and any
list or tuple) are stored as JSON strings. Nothing is ever unpickled, so a
checkpoint from elsewhere cannot run code. Every byte is covered by a digest
in the file's header, checked before HDF5 opens the file.

Modules, each with one job:

    state.py        RunState: what a run saves, to and from a checkpoint's keys (one place)
    write.py        save_checkpoint: checked state, temp file, read back, fsync, rename
    read.py         load_checkpoint / verify_checkpoint: every byte checked, then HDF5
    index.py        the header and index in HDF5's user block, the digests
    errors.py       CheckpointError (one line naming the file), the loaded dict
    store.py        the directory: names, newest by name, retention, ``*.damaged``
    choose.py       which file --resume, --init-from, --checkpoint name: the one
                    resolution of "latest" (the newest that verifies)
    compat.py       does a checkpoint fit the model and vocabulary
    fingerprint.py  the training data's fingerprint

One run owns a checkpoint directory at a time (dtrain/runlock.py).
"""

from __future__ import annotations

from .choose import choose_checkpoint, latest_verified_checkpoint
from .compat import check_compatible
from .errors import CheckpointError, CheckpointState
from .fingerprint import check_same_data, data_fingerprint
from .index import FORMAT_VERSION
from .read import load_checkpoint, verify_checkpoint
from .state import RunState
from .store import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    set_aside_checkpoint,
)
from .write import save_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointState",
    "FORMAT_VERSION",
    "RunState",
    "check_compatible",
    "check_same_data",
    "choose_checkpoint",
    "checkpoint_path",
    "data_fingerprint",
    "latest_checkpoint",
    "latest_verified_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "set_aside_checkpoint",
    "verify_checkpoint",
]
