"""The checkpoint file's layout: the header in HDF5's user block, the index, the digests.

The first bytes of the file (HDF5's user block, which the library skips)
hold one text line and the index:
  DTRAIN-CHECKPOINT version=2 userblock=4096 size=<file bytes> index=<n> index_sha256=<hex>
  {"entries": [...], "rest_sha256": "<hex>"}
Every group and dataset is an entry, in the order of the state dict; a
dataset's entry has its kind, dtype, shape, the byte range of its stored
data and the SHA-256 of those bytes. "rest_sha256" covers every other byte
after the user block (HDF5's superblock, object headers, B-trees, heaps,
attributes), so no byte that HDF5 reads escapes a checksum, and HDF5 never
parses a damaged file: some damaged files make the library loop forever.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

# Version 2 added the checksummed header; version 1 files (Fletcher-32 on
# arrays only) are refused rather than half-trusted.
FORMAT_VERSION = 2
VERSION_ATTR = "dtrain_checkpoint_version"
JSON_KEYS = frozenset({"config", "vocab", "extra"})  # dicts stored as JSON text, not groups
TEXT_KINDS = ("str", "json", "bigint")
MAGIC = b"DTRAIN-CHECKPOINT"
HEADER_RE = re.compile(
    rb"^(DTRAIN-CHECKPOINT version=(\d{1,6}) userblock=(\d{3,12}) size=(\d{1,15}) "
    rb"index=(\d{1,12}) )index_sha256=([0-9a-f]{64})\n"
)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CHUNK = 1 << 22  # bytes hashed per read


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def c_order(a) -> np.ndarray:
    """``a`` in C order, 0-d arrays kept 0-d (np.ascontiguousarray makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def array_bytes(a: np.ndarray):
    """The bytes HDF5 stores for a C-order numeric array, without a copy."""
    a = c_order(a)
    return a.reshape(-1).view(np.uint8) if a.size else b""


def hash_range(fh, start: int, stop: int, h) -> None:
    fh.seek(start)
    left = stop - start
    while left > 0:
        block = fh.read(min(left, CHUNK))
        if not block:
            raise OSError(f"unexpected end of file at byte {stop - left}")
        h.update(block)
        left -= len(block)


def data_ranges(entries: list[dict]) -> list[tuple[int, int, str]]:
    """(start, stop, name) of every stored dataset, by offset."""
    return sorted(
        (e["offset"], e["offset"] + e["nbytes"], e["name"])
        for e in entries
        if e.get("offset") is not None and e["nbytes"] > 0
    )


def rest_digest(fh, userblock: int, size: int, ranges) -> str:
    """SHA-256 of every byte after the user block that is not a dataset's data."""
    h = hashlib.sha256()
    pos = userblock
    for start, stop, _ in ranges:
        hash_range(fh, pos, start, h)
        pos = stop
    hash_range(fh, pos, size, h)
    return h.hexdigest()


def header_line(userblock: int, size: int, index: bytes) -> bytes:
    """The header line; its digest covers the fields before it and the index."""
    fields = (
        f"DTRAIN-CHECKPOINT version={FORMAT_VERSION} userblock={userblock} size={size} "
        f"index={len(index)} "
    ).encode()
    return fields + f"index_sha256={sha256(fields + index)}\n".encode()


def userblock_size(records: list[dict]) -> int:
    """A user block (a power of two, at least 512) with room for the header and index."""
    wide = [dict(r, offset=10**15, nbytes=10**15) if r["kind"] != "group" else r for r in records]
    need = len(json.dumps({"entries": wide, "rest_sha256": "0" * 64})) + 256
    size = 512
    while size < need:
        size *= 2
    return size

