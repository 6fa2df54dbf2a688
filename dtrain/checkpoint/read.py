"""Reading a checkpoint: every byte checked against the index before HDF5 opens the file.

Some damaged files make HDF5 loop forever, so the bytes are verified first;
what HDF5 then returns is checked against the index once more. A damaged file
is refused by name, naming the dataset at fault where one is, and never read as
wrong numbers; every failure while reading is one CheckpointError line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from .errors import CheckpointError, CheckpointState, file_error, first_line
from .index import (
    FORMAT_VERSION,
    HDF5_SIGNATURE,
    HEADER_RE,
    MAGIC,
    TEXT_KINDS,
    VERSION_ATTR,
    array_bytes,
    data_ranges,
    hash_range,
    rest_digest,
    sha256,
)


def _verify_bytes(path: Path) -> list[dict]:
    """Check the header, the index and every byte after the user block; return the index.

    Runs before HDF5 opens the file. Raises CheckpointError naming the first
    dataset whose bytes fail their checksum, or the part of the file at fault.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
        m = HEADER_RE.match(head)
        if m is None:
            if head.startswith(HDF5_SIGNATURE):
                raise file_error(
                    path,
                    "not a dtrain checkpoint (an HDF5 file without a dtrain header; "
                    "checkpoints of format version 1, from before checksums, are no longer read)",
                )
            if head.startswith(MAGIC):
                raise file_error(path, "header damaged (file damaged)")
            raise file_error(path, "not a dtrain checkpoint (no dtrain header; truncated or "
                                   "corrupt?)")
        version, userblock, want_size, index_len = (int(g) for g in m.groups()[1:5])
        if version != FORMAT_VERSION:
            raise file_error(
                path,
                f"format version {version} (a newer dtrain's, or a damaged header), "
                f"this dtrain reads version {FORMAT_VERSION}",
            )
        if userblock < 512 or userblock & (userblock - 1) or m.end() + index_len > userblock:
            raise file_error(path, "header damaged (file damaged)")
        fh.seek(m.end())
        index_bytes = fh.read(index_len)
        if sha256(m.group(1) + index_bytes) != m.group(6).decode():
            raise file_error(path, "header or index fails its checksum (file damaged)")
        if size != want_size:
            raise file_error(path, f"file is {size} bytes, its header says {want_size} "
                                   "(truncated or damaged)")
        index = json.loads(index_bytes)
        entries = index["entries"]
        ranges = data_ranges(entries)
        prev_stop = userblock
        for start, stop, name in ranges:
            if start < prev_stop or stop > size:
                raise file_error(path, f"dataset {name} lies outside the file (file damaged)")
            prev_stop = stop
        digests = {e["name"]: e["sha256"] for e in entries if e["kind"] not in ("group", "none")}
        for start, stop, name in ranges:
            h = hashlib.sha256()
            hash_range(fh, start, stop, h)
            if h.hexdigest() != digests[name]:
                raise file_error(path, f"dataset {name} fails its checksum (file damaged)")
        if rest_digest(fh, userblock, size, ranges) != index["rest_sha256"]:
            raise file_error(path, "HDF5 structure (groups, headers, attributes) fails its "
                                   "checksum (file damaged)")
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
            raise file_error(path, f"{group_name} is not a group (file damaged)")
        found = set(node.keys())
        if found != expected:
            extra, missing = sorted(found - expected), sorted(expected - found)
            raise file_error(
                path,
                f"group {group_name or '/'} differs from the index (unexpected {extra}, "
                f"missing {missing}; file damaged)",
            )


def _read_dataset(obj, rec: dict, path: Path):
    """One dataset's value, if what HDF5 returns matches the index."""
    name, kind = rec["name"], rec["kind"]

    def bad():
        return file_error(path, f"dataset {name} fails its checksum (file damaged)")

    if not isinstance(obj, h5py.Dataset):
        raise file_error(path, f"{name} is not a dataset (file damaged)")
    if kind == "none":
        if obj.shape is not None:
            raise bad()
        return None
    if obj.dtype.str != rec["dtype"] or list(obj.shape or ()) != rec["shape"]:
        raise bad()
    if kind in TEXT_KINDS:
        buf = np.empty((), dtype=obj.dtype)
        obj.read_direct(buf)
        raw = buf.tobytes()
        if sha256(raw) != rec["sha256"]:
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
    if sha256(array_bytes(arr)) != rec["sha256"]:
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
    raise file_error(path, f"dataset {name} has unknown kind {kind!r}")


def _load(path: Path) -> CheckpointState:
    entries = _verify_bytes(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get(VERSION_ATTR) != FORMAT_VERSION:
            raise file_error(path, f"{VERSION_ATTR} attribute differs from the header "
                                   "(file damaged)")
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
        raise file_error(path, "no such file")
    try:
        state = _load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # whatever a damaged or unreadable file raises: one line
        raise file_error(path, f"cannot be read (file damaged?): {first_line(exc)}") from None
    check_required(state, path, required)
    return state


def check_required(state, path, required=()) -> None:
    """CheckpointError naming ``path`` and the key for each "a/b" in ``required`` that the
    loaded ``state`` lacks."""
    for req in required:
        node = state
        for part in req.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise file_error(path, f"missing key '{req}'")
            node = node[part]


def verify_checkpoint(path) -> None:
    """Raise CheckpointError (one line naming the file and the fault) unless
    ``path`` is a complete checkpoint whose every byte matches its checksum."""
    load_checkpoint(path)

