"""Validation of a data directory's files: DataError, one line naming the file and key.

Every problem is reported as "<file>: <key>: expected ..., got ..." rather than as an
exception from inside h5py or json; the reader (coco.py) calls these checks, the
importer (coco_import.py) and the results reader (coco_results.py) share ``fail``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class DataError(ValueError):
    """A data file is missing or malformed. The message is one line:
    "<file path>: <key>: expected ..., got ..."."""

    user_error = True  # run_guarded prints the line alone, no traceback, exit 2

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.path = path
        self.key = key


def fail(path, key: str, expected: str, got) -> DataError:
    """The DataError "<path>: <key>: expected <expected>, got <got>" (raise it)."""
    return DataError(f"{path}: {key}: expected {expected}, got {got}", str(path), key)


def read_text(path, what: str) -> str:
    """The UTF-8 text of ``path``; DataError "expected <what>" when it is missing, a
    directory or unreadable."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail(path, "(file)", what, "no such file") from None
    except IsADirectoryError:
        raise fail(path, "(file)", what, "a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise fail(path, "(file)", f"a readable UTF-8 file ({what})", type(e).__name__) from None


def read_json(path, what: str):
    """The JSON value in ``path`` (read_text's errors, and "valid JSON" naming the line of
    a parse error). Never more than JSON: nothing in a data file can run code."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(path, "(file)", f"valid JSON ({what})",
                   f"a parse error at line {e.lineno}: {e.msg}") from None


def open_h5(path: Path) -> h5py.File:
    """``path`` opened read-only, or DataError naming it."""
    if not path.is_file():
        raise fail(path, "(file)", "an HDF5 file", "no such file")
    try:
        try:
            # Readers never need the lock; skipping it avoids trouble on shared file systems.
            return h5py.File(path, "r", locking=False)
        except TypeError:  # pragma: no cover - h5py built without the locking option
            return h5py.File(path, "r")
    except OSError as e:
        raise fail(path, "(file)", "a readable HDF5 file", reason(e)) from None


def reason(e: Exception) -> str:
    """An exception in one short line: its class and the start of its text."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__} ({text[:160]})" if text else type(e).__name__


def checked_dataset(f: h5py.File, path: Path, key: str, ndim: int, kinds: str, kind_name: str):
    """``f[key]``, a dataset of ``ndim`` dimensions and a dtype kind in ``kinds``."""
    if key not in f:
        raise fail(path, key, f"a {ndim}-D {kind_name} dataset", "no such key")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise fail(path, key, f"a {ndim}-D {kind_name} dataset", "a group")
    if ds.ndim != ndim:
        raise fail(path, key, f"a {ndim}-D {kind_name} dataset", f"shape {ds.shape}")
    if ds.dtype.kind not in kinds:
        raise fail(path, key, f"a {ndim}-D {kind_name} dataset", f"dtype {ds.dtype}")
    return ds


def read_data(ds, path: Path, key: str, sel=()):
    """``ds[sel]``; a read error (a damaged file) is a DataError naming ``path`` and ``key``."""
    try:
        return ds[sel]
    except (OSError, RuntimeError, KeyError) as e:
        raise fail(path, key, "readable data", reason(e)) from None


def check_features(ds, path, keep: bool):
    """Check every feature is finite in float32 (what training computes in), reading ~32 MiB
    at a time; return them (float32) if ``keep``, else None. A float64 value beyond float32's
    range would become inf."""
    num_images, feature_dim = (int(s) for s in ds.shape)
    if feature_dim == 0:
        raise fail(path, "features", "at least one feature per image", f"shape {ds.shape} "
                   "(zero-width features: the model would train without images)")
    rows = max(1, (32 << 20) // max(1, 4 * feature_dim))
    out = np.empty((num_images, feature_dim), np.float32) if keep else None
    for start in range(0, num_images, rows):
        block = read_data(ds, path, "features", np.s_[start:start + rows])
        bad = ~(np.abs(block) <= FLOAT32_MAX)  # NaN, inf, or beyond float32 (also NaN-safe)
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            value = float(block[r, c])
            beyond = (f" (beyond float32's range, |x| <= {FLOAT32_MAX:.3g}: it would be inf "
                      "in training)") if np.isfinite(value) else ""
            raise fail(path, "features", "finite values",
                       f"{value!r} at row {start + r}, column {c}{beyond}")
        if keep:
            out[start:start + len(block)] = block
    return out


def check_image_idxs(captions_path, split, fpath, urls_path) -> None:
    """A split's image indices address rows of its feature file, and its URL list (if any)
    has one line per feature row."""
    key = f"{split.name}_image_idxs"
    ii = split.image_idxs
    if ii.size and (ii.min() < 0 or ii.max() >= split.num_images):
        raise fail(captions_path, key, f"image indices in [0, {split.num_images}) (rows of "
                   f"{fpath.name})", f"indices in [{ii.min()}, {ii.max()}]")
    if split.urls is not None and len(split.urls) != split.num_images:
        raise fail(urls_path, "(lines)", f"{split.num_images} URLs (one per feature row)",
                   len(split.urls))


def check_not_degenerate(captions_path, train, val, null: int) -> None:
    """Data that would train or evaluate on nothing, and report it as success, is refused:
    no target token in any training caption (loss 0.0000, 0 tok/s) or no validation
    caption (a val loss over nothing). ``null``: the <NULL> id."""
    if not (train.captions[:, 1:] != null).any():
        raise fail(captions_path, "train_captions", "captions with words to predict after "
                   "<START>", f"{train.num_captions} captions, none with a word or <END> after "
                   "<START>")
    if val.num_captions == 0 or not (val.captions[:, 1:] != null).any():
        raise fail(captions_path, "val_captions", "at least one validation caption with words "
                   "(val loss and BLEU need them)", f"{val.num_captions} captions without any")
