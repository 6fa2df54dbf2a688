"""Atomic, world-size-agnostic HDF5 checkpoints.

A checkpoint is one HDF5 file holding a nested state dict: dicts become
groups, arrays and scalars become datasets, strings become string datasets,
and the JSON-able dicts under the keys "config", "vocab" and "extra" (and any
list or tuple) are stored as JSON strings. Nothing is ever unpickled, so a
checkpoint from elsewhere cannot run code.

Rank 0 writes ``<name>.tmp-<pid>``, flushes and fsyncs it, renames it over
the real name and fsyncs the directory: a crash at any moment leaves either
the previous complete file or the new complete file under a real name, never
a half-written one. Array datasets carry a Fletcher-32 checksum, so a file
damaged later is refused on load rather than read as wrong numbers.

Nothing in a checkpoint depends on the number of ranks (parameters and Adam
moments are global, the sampler position is a global step), so a run saved
on p ranks resumes on any other number.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "check_compatible",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
]

FORMAT_VERSION = 1
VERSION_ATTR = "dtrain_checkpoint_version"
KIND_ATTR = "dtrain_kind"
JSON_KEYS = frozenset({"config", "vocab", "extra"})
_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.h5$")
_TMP_RE = re.compile(r"^ckpt-\d{8,}\.h5\.tmp-(\d+)$")
_INT64 = np.iinfo(np.int64)
_STR = h5py.string_dtype("utf-8")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the file."""

    user_error = True  # comm.run_guarded prints the message alone, no traceback


class CheckpointState(dict):
    """A loaded checkpoint (or one of its groups): a dict whose missing keys
    raise CheckpointError naming the file and key instead of a bare KeyError."""

    def __init__(self, data, path, prefix=""):
        super().__init__(data)
        self.path = Path(path)
        self.prefix = prefix

    def __missing__(self, key):
        raise CheckpointError(f"checkpoint {self.path}: missing key '{self.prefix}{key}'")


# ------------------------------------------------------------------- names
def checkpoint_path(directory, step: int) -> Path:
    """``directory/ckpt-<step:08d>.h5``."""
    return Path(directory) / f"ckpt-{int(step):08d}.h5"


def list_checkpoints(directory) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint under a real name in ``directory``, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _NAME_RE.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory) -> Path | None:
    """The highest-step checkpoint in ``directory`` (temp files ignored), or None.

    Files appear under a real name only by an atomic rename after they were
    complete, so the name alone says the file is whole.
    """
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_checkpoints(directory, keep: int | None) -> list[Path]:
    """Delete all but the ``keep`` highest-step checkpoints; returns what was removed.

    ``keep`` None or <= 0 keeps everything. Temp files left by a killed
    writer (its pid no longer alive on this host) are removed too.
    """
    directory = Path(directory)
    removed = []
    if keep is not None and keep > 0:
        for _, path in list_checkpoints(directory)[:-keep]:
            path.unlink(missing_ok=True)
            removed.append(path)
    if directory.is_dir():
        for entry in directory.iterdir():
            m = _TMP_RE.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def resolve_resume(arg, directory) -> Path:
    """``--resume`` to a file: "latest" -> the newest in ``directory``; a
    directory -> the newest in it; else the path itself, which must exist."""
    if str(arg) == "latest":
        found = latest_checkpoint(directory)
        if found is None:
            raise CheckpointError(f"--resume latest: no checkpoint (ckpt-*.h5) in {directory}")
        return found
    path = Path(arg)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"--resume {path}: no checkpoint (ckpt-*.h5) in that directory")
        return found
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    return path


# ------------------------------------------------------------------- write
def _to_host(value):
    if type(value).__module__.startswith("cupy"):
        return value.get()
    return value


def _write(group, key: str, value, where: str) -> None:
    if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
        raise ValueError(f"save_checkpoint: key {where}{key!r} must be a non-empty str without '/'")
    name = where + key
    value = _to_host(value)
    if isinstance(value, dict) and key not in JSON_KEYS:
        sub = group.create_group(key)
        for k, v in value.items():
            _write(sub, k, v, name + "/")
        return
    if isinstance(value, (dict, list, tuple)):
        try:
            text = json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"save_checkpoint: {name} is not JSON-able: {exc}") from None
        ds = group.create_dataset(key, data=text, dtype=_STR)
        ds.attrs[KIND_ATTR] = "json"
        return
    if value is None:
        ds = group.create_dataset(key, data=h5py.Empty("f"))
        ds.attrs[KIND_ATTR] = "none"
        return
    if isinstance(value, str):
        ds = group.create_dataset(key, data=value, dtype=_STR)
        ds.attrs[KIND_ATTR] = "str"
        return
    if isinstance(value, bool):
        ds = group.create_dataset(key, data=np.bool_(value))
        ds.attrs[KIND_ATTR] = "bool"
        return
    if isinstance(value, int):
        if _INT64.min <= value <= _INT64.max:
            ds = group.create_dataset(key, data=np.int64(value))
            ds.attrs[KIND_ATTR] = "int"
        else:  # e.g. a PCG64 state: exact, as decimal text
            ds = group.create_dataset(key, data=str(value), dtype=_STR)
            ds.attrs[KIND_ATTR] = "bigint"
        return
    if isinstance(value, float):
        ds = group.create_dataset(key, data=np.float64(value))
        ds.attrs[KIND_ATTR] = "float"
        return
    if isinstance(value, np.generic):
        if value.dtype.kind in "OUSV":
            raise ValueError(f"save_checkpoint: {name} has unsupported dtype {value.dtype}")
        ds = group.create_dataset(key, data=value)
        ds.attrs[KIND_ATTR] = "scalar"
        return
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OUSV" or value.dtype.fields is not None:
            raise ValueError(f"save_checkpoint: {name} has unsupported dtype {value.dtype}")
        if not value.flags.c_contiguous:
            value = value.copy(order="C")
        if value.ndim and value.size:
            ds = group.create_dataset(key, data=value, fletcher32=True)
        else:
            ds = group.create_dataset(key, data=value)
        ds.attrs[KIND_ATTR] = "array"
        return
    raise ValueError(
        f"save_checkpoint: {name} has unsupported type {type(value).__name__} "
        "(expected dict, array, number, str, None, or JSON-able list)"
    )


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync a directory; a file must
            raise
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` atomically to ``path`` (temp file, fsync, rename, fsync dir).

    Call it on one rank only (rank 0). Returns the path.
    """
    if not isinstance(state, dict):
        raise TypeError("save_checkpoint: state must be a dict")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs[VERSION_ATTR] = FORMAT_VERSION
            for key, value in state.items():
                _write(f, key, value, "")
            f.flush()
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_path(path.parent, directory=True)
    return path


# -------------------------------------------------------------------- read
def _read(obj, path: Path, name: str):
    if isinstance(obj, h5py.Group):
        return CheckpointState(
            {k: _read(obj[k], path, f"{name}{k}/") for k in obj.keys()}, path, name
        )
    try:
        return _read_dataset(obj, path, name.rstrip("/"))
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot read key '{name.rstrip('/')}' (corrupt?): {_first_line(exc)}"
        ) from None


def _read_dataset(obj, path: Path, key: str):
    kind = obj.attrs.get(KIND_ATTR, "array")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind == "none":
        return None
    if kind in ("str", "json", "bigint"):
        text = obj[()]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if kind == "str":
            return text
        if kind == "bigint":
            return int(text)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path}: key '{key}' holds invalid JSON ({exc})"
            ) from None
    if kind == "bool":
        return bool(obj[()])
    if kind == "int":
        return int(obj[()])
    if kind == "float":
        return float(obj[()])
    if kind == "scalar":
        return obj.dtype.type(obj[()])
    if kind == "array":
        if obj.dtype.kind in "OSUV":
            raise CheckpointError(
                f"checkpoint {path}: key '{key}' has unsupported dtype {obj.dtype}"
            )
        return np.asarray(obj[...])
    raise CheckpointError(f"checkpoint {path}: key '{key}' has unknown kind {kind!r}")


def load_checkpoint(path, required=()) -> CheckpointState:
    """Read a checkpoint written by save_checkpoint into the same nested dict.

    Raises CheckpointError (one line naming the file, and the key where one
    is at fault) for a missing, truncated or corrupt file, a wrong format
    version, or a missing key among ``required`` ("a/b" paths) or later
    looked up in the returned dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a readable HDF5 file (truncated or corrupt): {_first_line(exc)}"
        ) from None
    with f:
        version = f.attrs.get(VERSION_ATTR)
        if version is None:
            raise CheckpointError(
                f"checkpoint {path}: not a dtrain checkpoint (no {VERSION_ATTR} attribute)"
            )
        if int(version) != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path}: format version {int(version)}, this dtrain reads version {FORMAT_VERSION}"
            )
        state = {}
        for key in f.keys():
            try:
                state[key] = _read(f[key], path, f"{key}/")
            except CheckpointError:
                raise
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"checkpoint {path}: cannot read key '{key}' (corrupt?): {_first_line(exc)}"
                ) from None
    state = CheckpointState(state, path)
    for req in required:
        node = state
        for part in req.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"checkpoint {path}: missing key '{req}'")
            node = node[part]
    return state


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------ compatibility
def check_compatible(ckpt, params_shapes: dict, idx_to_word) -> None:
    """Refuse a checkpoint that does not fit the model built from the data and flags.

    Raises CheckpointError naming the first parameter whose name or shape
    differs, or the first vocabulary difference.
    """
    path = getattr(ckpt, "path", "<state>")
    params = ckpt["params"]
    for name, shape in params_shapes.items():
        if name not in params:
            raise CheckpointError(
                f"checkpoint {path}: has no parameter '{name}' (the model built from the data and flags needs it)"
            )
        have, want = tuple(np.shape(params[name])), tuple(int(s) for s in shape)
        if have != want:
            raise CheckpointError(
                f"checkpoint {path}: parameter '{name}' has shape {have}, "
                f"but the model built from the data and flags needs {want}"
            )
    extra = sorted(set(params) - set(params_shapes))
    if extra:
        raise CheckpointError(
            f"checkpoint {path}: parameter '{extra[0]}' is not in the model built from the data and flags "
            "(another cell type?)"
        )
    vocab = ckpt["vocab"]
    saved = vocab["idx_to_word"] if isinstance(vocab, dict) and "idx_to_word" in vocab else None
    if saved is None:
        raise CheckpointError(f"checkpoint {path}: missing key 'vocab/idx_to_word'")
    data = list(idx_to_word)
    for i, (a, b) in enumerate(zip(saved, data)):
        if a != b:
            raise CheckpointError(
                f"checkpoint {path}: vocabulary differs from the data's at index {i}: "
                f"checkpoint has {a!r}, data has {b!r}"
            )
    if len(saved) != len(data):
        raise CheckpointError(
            f"checkpoint {path}: vocabulary has {len(saved)} words, the data's has {len(data)}"
        )
