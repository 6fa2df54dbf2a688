"""Atomic, verified, world-size-agnostic HDF5 checkpoints.

A checkpoint is one HDF5 file holding a nested state dict: dicts become
groups, arrays and scalars become datasets, strings become string datasets,
and the JSON-able dicts under the keys "config", "vocab" and "extra" (and any
list or tuple) are stored as JSON strings. Nothing is ever unpickled, so a
checkpoint from elsewhere cannot run code.

Integrity: the file starts with a text header in HDF5's user block (which
the library skips) holding an index: every group and dataset in order, each
dataset's kind, dtype, shape, byte range and the SHA-256 of its stored bytes,
plus one SHA-256 over all the other bytes (HDF5's own structures), and the
index's own SHA-256. Loading checks every byte against these before HDF5
opens the file (some damaged files make the library loop forever), then
checks what HDF5 returns against the index once more. A damaged file is
refused by name, naming the dataset at fault where one is, and never read as
wrong numbers; every failure while reading is one CheckpointError line.

Writing: rank 0 checks the whole state first (supported types, finite float
arrays), then writes ``<name>.tmp-<pid>``, flushes and fsyncs it, renames it
over the real name and fsyncs the directory: a crash, a full disk or any
write error leaves the previous complete files untouched and nothing
half-written under a real name.

Nothing in a checkpoint depends on the number of ranks (parameters and Adam
moments are global, the sampler position is a global step), so a run saved
on p ranks resumes on any other number.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from .runlock import pid_alive

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "check_compatible",
    "check_same_data",
    "checkpoint_path",
    "data_fingerprint",
    "latest_checkpoint",
    "latest_verified_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "set_aside_checkpoint",
    "verify_checkpoint",
]

# Version 2 added the checksummed header; version 1 files (Fletcher-32 on
# arrays only) are refused rather than half-trusted.
FORMAT_VERSION = 2
VERSION_ATTR = "dtrain_checkpoint_version"
JSON_KEYS = frozenset({"config", "vocab", "extra"})
_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.h5$")
_TMP_RE = re.compile(r"^ckpt-\d{8,}\.h5\.tmp-(\d+)$")
_INT64 = np.iinfo(np.int64)
_STR = h5py.string_dtype("utf-8")
_TEXT_KINDS = ("str", "json", "bigint")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the file.

    ``path`` and ``reason`` (the message without the "checkpoint <path>: "
    prefix) are set when the error is about one file.
    """

    user_error = True  # comm.run_guarded prints the message alone, no traceback

    def __init__(self, message, *, path=None, reason=None):
        super().__init__(message)
        self.path = path
        self.reason = reason if reason is not None else str(message)


def _error(path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {reason}", path=Path(path), reason=reason)


class CheckpointState(dict):
    """A loaded checkpoint (or one of its groups): a dict whose missing keys
    raise CheckpointError naming the file and key instead of a bare KeyError."""

    def __init__(self, data, path, prefix=""):
        super().__init__(data)
        self.path = Path(path)
        self.prefix = prefix

    def __missing__(self, key):
        raise _error(self.path, f"missing key '{self.prefix}{key}'")


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


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
    complete; whether one was damaged later is what latest_verified_checkpoint
    finds out.
    """
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def latest_verified_checkpoint(directory) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that verifies, and the newer ones skipped.

    Returns ``(path or None, [(skipped_path, reason), ...])``, newest first;
    the caller prints ``skipped <path>: <reason>`` for each. ``(None, [])``
    means there is no checkpoint at all; ``(None, [...])`` that there are
    some and none verifies (a run should stop, not start afresh over them).
    """
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, exc.reason))
            continue
        return path, skipped
    return None, skipped


def set_aside_checkpoint(path) -> Path:
    """Rename a checkpoint that failed verification to ``<name>.damaged`` (or
    ``<name>.damaged-N``) and return the new path: it stays for inspection, but
    no longer counts as a checkpoint, so resume skips it and prune_checkpoints
    (which keeps the newest by step) does not keep it in place of good ones."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{n}")
        n += 1
    os.replace(path, target)
    return target


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
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
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


# ------------------------------------------------------------ file header
# The first bytes of the file (HDF5's user block, which the library skips)
# hold one text line and the index:
#   DTRAIN-CHECKPOINT version=2 userblock=4096 size=<file bytes> index=<n> index_sha256=<hex>
#   {"entries": [...], "rest_sha256": "<hex>"}
# Every group and dataset is an entry, in the order of the state dict; a
# dataset's entry has its kind, dtype, shape, the byte range of its stored
# data and the SHA-256 of those bytes. "rest_sha256" covers every other byte
# after the user block (HDF5's superblock, object headers, B-trees, heaps,
# attributes), so no byte that HDF5 reads escapes a checksum, and HDF5 never
# parses a damaged file: some damaged files make the library loop forever.
_MAGIC = b"DTRAIN-CHECKPOINT"
_HEADER_RE = re.compile(
    rb"^(DTRAIN-CHECKPOINT version=(\d{1,6}) userblock=(\d{3,12}) size=(\d{1,15}) "
    rb"index=(\d{1,12}) )index_sha256=([0-9a-f]{64})\n"
)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHUNK = 1 << 22  # bytes hashed per read


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _c_order(a) -> np.ndarray:
    """``a`` in C order, 0-d arrays kept 0-d (np.ascontiguousarray makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _array_bytes(a: np.ndarray):
    """The bytes HDF5 stores for a C-order numeric array, without a copy."""
    a = _c_order(a)
    return a.reshape(-1).view(np.uint8) if a.size else b""


def _hash_range(fh, start: int, stop: int, h) -> None:
    fh.seek(start)
    left = stop - start
    while left > 0:
        block = fh.read(min(left, _CHUNK))
        if not block:
            raise OSError(f"unexpected end of file at byte {stop - left}")
        h.update(block)
        left -= len(block)


def _ranges(entries: list[dict]) -> list[tuple[int, int, str]]:
    """(start, stop, name) of every stored dataset, by offset."""
    return sorted(
        (e["offset"], e["offset"] + e["nbytes"], e["name"])
        for e in entries
        if e.get("offset") is not None and e["nbytes"] > 0
    )


def _rest_digest(fh, userblock: int, size: int, ranges) -> str:
    """SHA-256 of every byte after the user block that is not a dataset's data."""
    h = hashlib.sha256()
    pos = userblock
    for start, stop, _ in ranges:
        _hash_range(fh, pos, start, h)
        pos = stop
    _hash_range(fh, pos, size, h)
    return h.hexdigest()


def _header(userblock: int, size: int, index: bytes) -> bytes:
    """The header line; its digest covers the fields before it and the index."""
    fields = (
        f"DTRAIN-CHECKPOINT version={FORMAT_VERSION} userblock={userblock} size={size} "
        f"index={len(index)} "
    ).encode()
    return fields + f"index_sha256={_sha256(fields + index)}\n".encode()


def _userblock_size(records: list[dict]) -> int:
    """A user block (a power of two, at least 512) with room for the header and index."""
    wide = [dict(r, offset=10**15, nbytes=10**15) if r["kind"] != "group" else r for r in records]
    need = len(json.dumps({"entries": wide, "rest_sha256": "0" * 64})) + 256
    size = 512
    while size < need:
        size *= 2
    return size


# ------------------------------------------------------------------- write
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
        out.append((name, kind, _c_order(value)))
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
    if kind in _TEXT_KINDS:
        # fixed-length UTF-8 (not variable-length): the text lies in one byte range
        stored = max(len(data), 1)
        arr = np.array(data.ljust(stored, b"\0"), dtype=h5py.string_dtype("utf-8", stored))
        f.create_dataset(name, data=arr)
        entry = {"name": name, "kind": kind, "text_bytes": len(data)}
    else:
        arr = data
        f.create_dataset(name, data=arr)
        entry = {"name": name, "kind": kind}
    raw = _array_bytes(arr)
    entry.update(dtype=arr.dtype.str, shape=list(arr.shape), sha256=_sha256(raw))
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
        reason = f"cannot write checkpoint {path} ({_first_line(exc)}); {kept}"
    return CheckpointError(reason, path=path, reason=reason)


def _write_file(tmp: Path, entries: list) -> None:
    """The HDF5 file, then its header; the data read back must match its digests."""
    records = [_create_placeholder(name, kind, data) for name, kind, data in entries]
    userblock = _userblock_size(records)
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
    ranges = _ranges(records)
    with open(tmp, "r+b") as fh:
        for (_, stop, name), (next_start, _, _) in zip(ranges, ranges[1:]):
            if stop > next_start:
                raise OSError(f"overlapping storage at {name}")
        for rec in records:  # read back: what is on disk is what was meant
            if rec.get("offset") is not None:
                h = hashlib.sha256()
                _hash_range(fh, rec["offset"], rec["offset"] + rec["nbytes"], h)
                if h.hexdigest() != rec["sha256"]:
                    raise OSError(f"{rec['name']} reads back differently from what was written")
        index = json.dumps(
            {"entries": records, "rest_sha256": _rest_digest(fh, userblock, size, ranges)}
        ).encode()
        header = _header(userblock, size, index)
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
        shape = [] if kind in _TEXT_KINDS else list(np.shape(data))
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


# -------------------------------------------------------------------- read
def _verify_bytes(path: Path) -> list[dict]:
    """Check the header, the index and every byte after the user block; return the index.

    Runs before HDF5 opens the file. Raises CheckpointError naming the first
    dataset whose bytes fail their checksum, or the part of the file at fault.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
        m = _HEADER_RE.match(head)
        if m is None:
            if head.startswith(_HDF5_SIGNATURE):
                raise _error(
                    path,
                    "not a dtrain checkpoint (an HDF5 file without a dtrain header; "
                    "checkpoints of format version 1, from before checksums, are no longer read)",
                )
            if head.startswith(_MAGIC):
                raise _error(path, "header damaged (file damaged)")
            raise _error(path, "not a dtrain checkpoint (no dtrain header; truncated or corrupt?)")
        version, userblock, want_size, index_len = (int(g) for g in m.groups()[1:5])
        if version != FORMAT_VERSION:
            raise _error(
                path,
                f"format version {version} (a newer dtrain's, or a damaged header), "
                f"this dtrain reads version {FORMAT_VERSION}",
            )
        if userblock < 512 or userblock & (userblock - 1) or m.end() + index_len > userblock:
            raise _error(path, "header damaged (file damaged)")
        fh.seek(m.end())
        index_bytes = fh.read(index_len)
        if _sha256(m.group(1) + index_bytes) != m.group(6).decode():
            raise _error(path, "header or index fails its checksum (file damaged)")
        if size != want_size:
            raise _error(path, f"file is {size} bytes, its header says {want_size} (truncated or damaged)")
        index = json.loads(index_bytes)
        entries = index["entries"]
        ranges = _ranges(entries)
        prev_stop = userblock
        for start, stop, name in ranges:
            if start < prev_stop or stop > size:
                raise _error(path, f"dataset {name} lies outside the file (file damaged)")
            prev_stop = stop
        digests = {e["name"]: e["sha256"] for e in entries if e["kind"] not in ("group", "none")}
        for start, stop, name in ranges:
            h = hashlib.sha256()
            _hash_range(fh, start, stop, h)
            if h.hexdigest() != digests[name]:
                raise _error(path, f"dataset {name} fails its checksum (file damaged)")
        if _rest_digest(fh, userblock, size, ranges) != index["rest_sha256"]:
            raise _error(path, "HDF5 structure (groups, headers, attributes) fails its checksum "
                               "(file damaged)")
    return entries


def _check_structure(f, path: Path, entries: list[dict]) -> None:
    """Every group holds exactly the members the index lists."""
    children: dict[str, set] = {"": set()}
    for rec in entries:
        parent, _, leaf = rec["name"].rpartition("/")
        children.setdefault(parent, set()).add(leaf)
        if rec["kind"] == "group":
            children.setdefault(rec["name"], set())
    for group_name, expected in children.items():
        node = f[group_name] if group_name else f
        if not isinstance(node, h5py.Group):
            raise _error(path, f"{group_name} is not a group (file damaged)")
        found = set(node.keys())
        if found != expected:
            extra, missing = sorted(found - expected), sorted(expected - found)
            raise _error(
                path,
                f"group {group_name or '/'} differs from the index (unexpected {extra}, "
                f"missing {missing}; file damaged)",
            )


def _read_dataset(obj, rec: dict, path: Path):
    """One dataset's value, if what HDF5 returns matches the index."""
    name, kind = rec["name"], rec["kind"]

    def bad():
        return _error(path, f"dataset {name} fails its checksum (file damaged)")

    if not isinstance(obj, h5py.Dataset):
        raise _error(path, f"{name} is not a dataset (file damaged)")
    if kind == "none":
        if obj.shape is not None:
            raise bad()
        return None
    if obj.dtype.str != rec["dtype"] or list(obj.shape or ()) != rec["shape"]:
        raise bad()
    if kind in _TEXT_KINDS:
        buf = np.empty((), dtype=obj.dtype)
        obj.read_direct(buf)
        raw = buf.tobytes()
        if _sha256(raw) != rec["sha256"]:
            raise bad()
        text = raw[: rec["text_bytes"]].decode("utf-8")
        if kind == "str":
            return text
        if kind == "bigint":
            return int(text)
        return json.loads(text)
    if obj.dtype.kind not in "biufc" or obj.dtype.fields is not None:
        raise bad()
    arr = np.asarray(obj[()])
    if _sha256(_array_bytes(arr)) != rec["sha256"]:
        raise bad()
    if kind == "array":
        return arr
    if kind == "bool":
        return bool(arr)
    if kind == "int":
        return int(arr)
    if kind == "float":
        return float(arr)
    if kind == "scalar":
        return arr[()]
    raise _error(path, f"dataset {name} has unknown kind {kind!r}")


def _load(path: Path) -> CheckpointState:
    entries = _verify_bytes(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get(VERSION_ATTR) != FORMAT_VERSION:
            raise _error(path, f"{VERSION_ATTR} attribute differs from the header (file damaged)")
        _check_structure(f, path, entries)
        root = CheckpointState({}, path)
        groups = {"": root}
        for rec in entries:
            name = rec["name"]
            parent, _, leaf = name.rpartition("/")
            if rec["kind"] == "group":
                groups[name] = groups[parent][leaf] = CheckpointState({}, path, name + "/")
            else:
                groups[parent][leaf] = _read_dataset(f[name], rec, path)
    return root


def load_checkpoint(path, required=()) -> CheckpointState:
    """Read and verify a checkpoint written by save_checkpoint into the same nested dict.

    Raises CheckpointError (one line naming the file, and the dataset where
    one is at fault) for a missing, truncated, damaged or foreign file, a
    wrong format version, content that fails its checksum, or a missing key
    among ``required`` ("a/b" paths) or later looked up in the returned dict.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "no such file")
    try:
        state = _load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # whatever a damaged or unreadable file raises: one line
        raise _error(path, f"cannot be read (file damaged?): {_first_line(exc)}") from None
    for req in required:
        node = state
        for part in req.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise _error(path, f"missing key '{req}'")
            node = node[part]
    return state


def verify_checkpoint(path) -> None:
    """Raise CheckpointError (one line naming the file and the fault) unless
    ``path`` is a complete checkpoint whose every byte matches its checksum."""
    load_checkpoint(path)


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


# --------------------------------------------------------- data fingerprint
_FINGERPRINT_CHUNK = 1 << 20  # values hashed per chunk: bounded extra memory


def data_fingerprint(captions_by_split: dict, image_idxs_by_split: dict) -> str:
    """A short string that changes when the training data changes.

    Covers every split's caption and image-index arrays: their shapes and
    their values (as little-endian int64, so a loader that changes the
    integer width does not change the fingerprint). Reads each array once;
    no copy larger than a chunk. Looks like ``train=4000x17,val=500x17:<16 hex>``.
    """
    h = hashlib.blake2b(b"dtrain-data-v1", digest_size=8)
    sizes = []
    for split in sorted(set(captions_by_split) | set(image_idxs_by_split)):
        h.update(f"|split {split}".encode())
        for what, table in (("captions", captions_by_split), ("image_idxs", image_idxs_by_split)):
            arr = table.get(split)
            if arr is None:
                h.update(f"|{what} none".encode())
                continue
            arr = np.asarray(_to_host(arr))
            h.update(f"|{what} {arr.shape}|".encode())
            if arr.dtype.kind not in "biu":
                raise ValueError(
                    f"data_fingerprint: {split} {what} must be integers, not {arr.dtype}"
                )
            flat = arr.reshape(-1)
            for start in range(0, flat.size, _FINGERPRINT_CHUNK):
                chunk = flat[start : start + _FINGERPRINT_CHUNK].astype("<i8")
                h.update(chunk.view(np.uint8))
        caps = captions_by_split.get(split)
        if caps is not None:
            shape = np.shape(caps)
            sizes.append(f"{split}=" + "x".join(str(int(s)) for s in shape))
    return f"{','.join(sizes)}:{h.hexdigest()}"


def check_same_data(ckpt, fingerprint: str, path) -> None:
    """Refuse to resume ``ckpt`` on data other than the data it was trained on.

    ``ckpt`` is a loaded checkpoint (a dict); its "data_fingerprint" key, when
    present, must equal ``fingerprint``. A checkpoint without one (written
    before fingerprints) is accepted.
    """
    saved = ckpt.get("data_fingerprint") if isinstance(ckpt, dict) else None
    if saved is None or saved == fingerprint:
        return
    reason = (
        f"was trained on another data set (fingerprint {saved} vs {fingerprint}); "
        f"use --init-from {path} to start a new run from its parameters"
    )
    raise CheckpointError(f"checkpoint {path} {reason}", path=Path(path), reason=reason)
