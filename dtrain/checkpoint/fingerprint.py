"""The training data's fingerprint: a resume refuses a checkpoint trained on other data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import CheckpointError

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
            if type(arr).__module__.startswith("cupy"):
                arr = arr.get()
            arr = np.asarray(arr)
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
    check_fingerprint(saved, fingerprint, path)


def check_fingerprint(saved: str | None, fingerprint: str, path) -> None:
    """CheckpointError unless ``saved`` (a checkpoint's fingerprint; None: written before
    fingerprints, accepted) equals ``fingerprint``."""
    if saved is None or saved == fingerprint:
        return
    reason = (
        f"was trained on another data set (fingerprint {saved} vs {fingerprint}); "
        f"use --init-from {path} to start a new run from its parameters"
    )
    raise CheckpointError(f"checkpoint {path} {reason}", path=Path(path), reason=reason)
