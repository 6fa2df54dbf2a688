"""Writing a checkpoint: check the whole state, write a temporary file, verify it, rename it.

Rank 0 checks the whole state first (supported types, finite float arrays),
then writes ``<name>.tmp-<pid>``, reads every dataset back against its digest,
writes the header, fsyncs, renames it over the real name and fsyncs the
directory: a crash, a full disk or any write error leaves the previous complete
files untouched and nothing half-written under a real name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from .errors import CheckpointError, first_line
from .index import (
    FORMAT_VERSION,
    JSON_KEYS,
    TEXT_KINDS,
    VERSION_ATTR,
    array_bytes,
    c_order,
    data_ranges,
    hash_range,
    header_line,
    rest_digest,
    sha256,
    userblock_size,
)
from .store import latest_checkpoint

_INT64 = np.iinfo(np.int64)


def _to_host(value):
    if type(value).__module__.startswith("cupy"):
        return value.get()
    return value


def _flatten(value, name: str, key: str, out: list) -> None:
    """Append (name, kind, data) for ``value`` and everything under it to ``out``.

    Raises ValueError for what cannot be stored, before any file is opened.
    """
    if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
        raise ValueError(f"save_checkpoint: key {name}{key!r} must be a non-empty str without '/'")
    name = name + key
    value = _to_host(value)
    if isinstance(value, dict) and key not in JSON_KEYS:
        out.append((name, "group", None))
        for k, v in value.items():
            _flatten(v, name + "/", k, out)
        return
    if isinstance(value, (dict, list, tuple)):
        try:
            text = json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"save_checkpoint: {name} is not JSON-able: {exc}") from None
        out.append((name, "json", text.encode("utf-8")))
        return
    if value is None:
        out.append((name, "none", None))
        return
    if isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"save_checkpoint: {name} is not valid text: {exc}") from None
        out.append((name, "str", data))
        return
    if isinstance(value, bool):
        out.append((name, "bool", np.bool_(value)))
        return
    if isinstance(value, int):
        if _INT64.min <= value <= _INT64.max:
            out.append((name, "int", np.int64(value)))
        else:  # e.g. a PCG64 state: exact, as decimal text
            out.append((name, "bigint", str(value).encode()))
        return
    if isinstance(value, float):
        out.append((name, "float", np.float64(value)))
        return
    if isinstance(value, (np.generic, np.ndarray)):
        if value.dtype.kind not in "biufc" or value.dtype.fields is not None:
            raise ValueError(f"save_checkpoint: {name} has unsupported dtype {value.dtype}")
        kind = "scalar" if isinstance(value, np.generic) else "array"
        out.append((name, kind, c_order(value)))
        return
    raise ValueError(
        f"save_checkpoint: {name} has unsupported type {type(value).__name__} "
        "(expected dict, array, number, str, None, or JSON-able list)"
    )


def _check_finite(entries, path: Path) -> None:
    for name, kind, data in entries:
        if kind in ("array", "scalar") and data.dtype.kind in "fc":
            if not np.isfinite(data).all():
                reason = f"{name} has non-finite values"
                raise CheckpointError(
                    f"refusing to write checkpoint {path}: {reason}", path=path, reason=reason
                )


def _create(f, name: str, kind: str, data) -> dict:
    """Create one group or dataset; return its index entry (offset filled in later)."""
    if kind == "group":
        f.create_group(name)
        return {"name": name, "kind": "group"}
    if kind == "none":
        f.create_dataset(name, data=h5py.Empty("f"))
        return {"name": name, "kind": "none"}
    if kind in TEXT_KINDS:
        # fixed-length UTF-8 (not variable-length): the text lies in one byte range
        stored = max(len(data), 1)
        arr = np.array(data.ljust(stored, b"\0"), dtype=h5py.string_dtype("utf-8", stored))
        f.create_dataset(name, data=arr)
        entry = {"name": name, "kind": kind, "text_bytes": len(data)}
    else:
        arr = data
        f.create_dataset(name, data=arr)
        entry = {"name": name, "kind": kind}
    raw = array_bytes(arr)
    entry.update(dtype=arr.dtype.str, shape=list(arr.shape), sha256=sha256(raw))
    entry.update(offset=None, nbytes=len(raw))
    return entry


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


def _write_failure(path: Path, exc: BaseException) -> CheckpointError:
    """One line for a failed write: what happened and which checkpoint is still there."""
    try:
        prev = path if path.is_file() else latest_checkpoint(path.parent)
    except OSError:
        prev = None
    kept = f"previous checkpoint {prev if prev is not None else 'none'} kept"
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left on device" in text or "errno = 28," in text:
        reason = f"no space left on device writing {path}; {kept}"
    elif code == errno.EDQUOT or "Disk quota exceeded" in text:
        reason = f"disk quota exceeded writing {path}; {kept}"
    else:
        reason = f"cannot write checkpoint {path} ({first_line(exc)}); {kept}"
    return CheckpointError(reason, path=path, reason=reason)


def _write_file(tmp: Path, entries: list) -> None:
    """The HDF5 file, then its header; the data read back must match its digests."""
    records = [_create_placeholder(name, kind, data) for name, kind, data in entries]
    userblock = userblock_size(records)
    with h5py.File(tmp, "w", userblock_size=userblock) as f:
        f.attrs[VERSION_ATTR] = FORMAT_VERSION
        records = [_create(f, name, kind, data) for name, kind, data in entries]
        f.flush()
        for rec in records:
            if rec.get("nbytes"):
                ds = f[rec["name"]]
                offset, stored = ds.id.get_offset(), ds.id.get_storage_size()
                if offset is None or stored != rec["nbytes"] or offset < userblock:
                    raise OSError(f"unexpected storage for {rec['name']} ({offset}, {stored})")
                rec["offset"] = int(offset)
    size = tmp.stat().st_size
    ranges = data_ranges(records)
    with open(tmp, "r+b") as fh:
        for (_, stop, name), (next_start, _, _) in zip(ranges, ranges[1:]):
            if stop > next_start:
                raise OSError(f"overlapping storage at {name}")
        for rec in records:  # read back: what is on disk is what was meant
            if rec.get("offset") is not None:
                h = hashlib.sha256()
                hash_range(fh, rec["offset"], rec["offset"] + rec["nbytes"], h)
                if h.hexdigest() != rec["sha256"]:
                    raise OSError(f"{rec['name']} reads back differently from what was written")
        index = json.dumps(
            {"entries": records, "rest_sha256": rest_digest(fh, userblock, size, ranges)}
        ).encode()
        header = header_line(userblock, size, index)
        if len(header) + len(index) > userblock:
            raise OSError(f"checkpoint index ({len(index)} bytes) exceeds its user block")
        fh.seek(0)
        fh.write(header + index)
        fh.flush()
        os.fsync(fh.fileno())


def _create_placeholder(name: str, kind: str, data) -> dict:
    """An index entry as wide as the real one will be, to size the user block."""
    entry = {"name": name, "kind": kind}
    if kind not in ("group", "none"):
        shape = [] if kind in TEXT_KINDS else list(np.shape(data))
        entry.update(dtype="|S" + "9" * 12, shape=shape, sha256="0" * 64, text_bytes=10**15)
    return entry


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` atomically to ``path`` (temp file, fsync, rename, fsync dir).

    Call it on one rank only (rank 0). Returns the path. Raises ValueError for
    a value that cannot be stored and CheckpointError (one line) for float
    arrays holding NaN or inf, both before anything is written, and
    CheckpointError for any failure while writing (full disk included); in
    every case the temporary file is removed and no file under ``path``
    other than a previous complete one exists.
    """
    if not isinstance(state, dict):
        raise TypeError("save_checkpoint: state must be a dict")
    path = Path(path)
    entries: list = []
    for key, value in state.items():
        _flatten(value, "", key, entries)
    _check_finite(entries, path)

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, entries)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, Exception):
            raise _write_failure(path, exc) from None
        raise
    _fsync_path(path.parent, directory=True)
    return path

