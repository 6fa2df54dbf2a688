"""The CS231n COCO layout: validated HDF5/JSON reader, vocabulary, decoding.

A data directory holds

    coco2014_captions.h5      train_captions (Ncap, T) int, train_image_idxs (Ncap,) int,
                              val_captions, val_image_idxs
    coco2014_vocab.json       {"idx_to_word": [...], "word_to_idx": {...}}
    train2014_vgg16_fc7_pca.h5 / val2014_vgg16_fc7_pca.h5   dataset `features` (Nimg, 512)
    train2014_vgg16_fc7.h5     / val2014_vgg16_fc7.h5       dataset `features` (Nimg, 4096)
    train2014_urls.txt / val2014_urls.txt                   optional, one URL per image

Everything is checked when a CocoData is opened, and every problem is reported as
a one-line DataError "<file>: <key>: expected ..., got ..." rather than as an
exception from inside h5py. Captions live in memory (they are small); feature
rows are read per batch, unless the whole matrix fits `feature_memory_budget`.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

SPECIAL_TOKENS = ("<NULL>", "<START>", "<END>", "<UNK>")

CAPTIONS_FILE = "coco2014_captions.h5"
VOCAB_FILE = "coco2014_vocab.json"
SPLITS = ("train", "val")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def feature_file(split: str, pca_features: bool = True) -> str:
    """File name of a split's features in the CS231n layout."""
    return f"{split}2014_vgg16_fc7_pca.h5" if pca_features else f"{split}2014_vgg16_fc7.h5"


def urls_file(split: str) -> str:
    return f"{split}2014_urls.txt"


class DataError(ValueError):
    """A data file is missing or malformed. The message is one line:
    "<file path>: <key>: expected ..., got ..."."""

    user_error = True  # run_guarded prints the line alone, no traceback, exit 2

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.path = path
        self.key = key


def _fail(path, key: str, expected: str, got) -> DataError:
    return DataError(f"{path}: {key}: expected {expected}, got {got}", str(path), key)


# ---------------------------------------------------------------------------
# Vocabulary and decoding


def load_vocab(path) -> tuple[dict[str, int], list[str]]:
    """Read and validate coco2014_vocab.json -> (word_to_idx, idx_to_word)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(path, "(file)", "a vocabulary JSON file", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, "(file)", "a readable UTF-8 JSON file", type(e).__name__) from None
    try:
        blob = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, "(file)", "valid JSON", f"a parse error at line {e.lineno}") from None
    if not isinstance(blob, dict):
        raise _fail(path, "(file)", "a JSON object", type(blob).__name__)
    return validate_vocab(blob.get("word_to_idx"), blob.get("idx_to_word"), path)


def validate_vocab(word_to_idx, idx_to_word, path="vocabulary") -> tuple[dict[str, int], list[str]]:
    if idx_to_word is None:
        raise _fail(path, "idx_to_word", "a list of words", "no such key")
    if word_to_idx is None:
        raise _fail(path, "word_to_idx", "a word -> index object", "no such key")
    if not isinstance(idx_to_word, list):
        raise _fail(path, "idx_to_word", "a list of strings", type(idx_to_word).__name__)
    for i, w in enumerate(idx_to_word):
        if not isinstance(w, str):
            raise _fail(path, "idx_to_word", "a list of strings", f"{w!r} at index {i}")
    if not isinstance(word_to_idx, dict) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in word_to_idx.values()
    ):
        raise _fail(path, "word_to_idx", "an object of word -> integer", "other values")
    for tok in SPECIAL_TOKENS:
        if tok not in word_to_idx:
            raise _fail(path, "word_to_idx", f"the special token {tok}", "no entry for it")
    if len(word_to_idx) != len(idx_to_word):
        raise _fail(path, "word_to_idx", f"{len(idx_to_word)} entries (as idx_to_word)",
                    len(word_to_idx))
    for i, w in enumerate(idx_to_word):
        j = word_to_idx.get(w)
        if j != i:
            raise _fail(path, "word_to_idx", f"word_to_idx[{w!r}] == {i} (its idx_to_word index)",
                        "no entry" if j is None else j)
    return dict(word_to_idx), list(idx_to_word)


def _to_host(a):
    # CuPy arrays expose .get(); everything else goes through numpy.
    return np.asarray(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a)


def caption_tokens(ids, idx_to_word) -> list[str]:
    """Words of one caption: stops at <END>, skips <NULL> and <START>."""
    words = []
    for i in _to_host(ids).tolist():
        w = idx_to_word[i]
        if w == "<END>":
            break
        if w != "<NULL>" and w != "<START>":
            words.append(w)
    return words


def decode_captions(captions, idx_to_word):
    """1-D ids -> one string; 2-D (N, T) -> a list of N strings."""
    captions = _to_host(captions)
    if captions.ndim == 1:
        return " ".join(caption_tokens(captions, idx_to_word))
    return [" ".join(caption_tokens(row, idx_to_word)) for row in captions]


# ---------------------------------------------------------------------------
# HDF5 helpers


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise _fail(path, "(file)", "an HDF5 file", "no such file")
    try:
        try:
            # Readers never need the lock; skipping it avoids trouble on shared file systems.
            return h5py.File(path, "r", locking=False)
        except TypeError:  # pragma: no cover - h5py built without the locking option
            return h5py.File(path, "r")
    except OSError as e:
        raise _fail(path, "(file)", "a readable HDF5 file", _reason(e)) from None


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__} ({text[:160]})" if text else type(e).__name__


def _dataset(f: h5py.File, path: Path, key: str, ndim: int, kinds: str, kind_name: str):
    if key not in f:
        raise _fail(path, key, f"a {ndim}-D {kind_name} dataset", "no such key")
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise _fail(path, key, f"a {ndim}-D {kind_name} dataset", "a group")
    if ds.ndim != ndim:
        raise _fail(path, key, f"a {ndim}-D {kind_name} dataset", f"shape {ds.shape}")
    if ds.dtype.kind not in kinds:
        raise _fail(path, key, f"a {ndim}-D {kind_name} dataset", f"dtype {ds.dtype}")
    return ds


def _read(ds, path: Path, key: str, sel=()):
    try:
        return ds[sel]
    except (OSError, RuntimeError, KeyError) as e:
        raise _fail(path, key, "readable data", _reason(e)) from None


# ---------------------------------------------------------------------------
# Reader


class Split:
    """Captions, image indices and features of one split ("train" or "val")."""

    def __init__(self, name, captions, image_idxs, features_path: Path, feature_memory_budget,
                 idx_to_word, urls=None):
        self.name = name
        self.captions = captions
        self.image_idxs = image_idxs
        self.urls = urls
        self._idx_to_word = idx_to_word
        self._features_path = features_path
        self._file = _open_h5(features_path)
        self._memory = None
        try:
            ds = _dataset(self._file, features_path, "features", 2, "f", "floating-point")
            self._ds = ds
            self.num_images, self.feature_dim = (int(s) for s in ds.shape)
            self.num_captions = int(captions.shape[0])
            self._references = None
            resident = self.num_images * self.feature_dim * 4 <= feature_memory_budget
            self._memory = self._scan_features(keep=resident)
        except BaseException:
            self._file.close()
            raise
        if self._memory is not None:
            self._file.close()
            self._file = self._ds = None

    def _scan_features(self, keep: bool):
        """Check every feature is finite in float32 (what training computes in), reading ~32 MiB
        at a time; keep them if asked. A float64 value beyond float32's range would become inf."""
        ds, path = self._ds, self._features_path
        if self.feature_dim == 0:
            raise _fail(path, "features", "at least one feature per image", f"shape {ds.shape} "
                        "(zero-width features: the model would train without images)")
        rows = max(1, (32 << 20) // max(1, 4 * self.feature_dim))
        out = np.empty((self.num_images, self.feature_dim), np.float32) if keep else None
        for start in range(0, self.num_images, rows):
            block = _read(ds, path, "features", np.s_[start:start + rows])
            bad = ~(np.abs(block) <= FLOAT32_MAX)  # NaN, inf, or beyond float32 (also NaN-safe)
            if bad.any():
                r, c = (int(i) for i in np.argwhere(bad)[0])
                value = float(block[r, c])
                beyond = (f" (beyond float32's range, |x| <= {FLOAT32_MAX:.3g}: it would be inf "
                          "in training)") if np.isfinite(value) else ""
                raise _fail(path, "features", "finite values",
                            f"{value!r} at row {start + r}, column {c}{beyond}")
            if keep:
                out[start:start + len(block)] = block
        return out

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def features(self, image_rows) -> np.ndarray:
        """Feature rows (n, D) float32 in the order given (repeats allowed)."""
        rows = np.asarray(image_rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise IndexError(f"{self.name} image rows must be in [0, {self.num_images})")
        if self._memory is not None:
            return self._memory[rows]
        if self._ds is None:
            raise ValueError(f"{self.name} split is closed")
        if rows.size == 0:
            return np.empty((0, self.feature_dim), np.float32)
        # HDF5 point selections must be increasing: read each needed row once, in order.
        unique, inverse = np.unique(rows, return_inverse=True)
        block = _read(self._ds, self._features_path, "features", unique)
        return np.ascontiguousarray(block[inverse.reshape(-1)], dtype=np.float32)

    def batch(self, caption_indices):
        """(captions (n, T) int32, features (n, D) float32) for the given caption rows."""
        idx = np.asarray(caption_indices, dtype=np.int64).reshape(-1)
        return self.captions[idx], self.features(self.image_idxs[idx])

    def image_references(self):
        """(image ids (M,), [[tokens of each reference caption] per image]) for BLEU."""
        if self._references is None:
            order = np.argsort(self.image_idxs, kind="stable")
            ids, starts = np.unique(self.image_idxs[order], return_index=True)
            bounds = list(starts) + [len(order)]
            refs = []
            for k in range(len(ids)):
                rows = order[bounds[k]:bounds[k + 1]]
                refs.append([caption_tokens(self.captions[r], self._idx_to_word) for r in rows])
            self._references = (ids, refs)
        return self._references

    def close(self):
        if self._file is not None:
            self._file.close()
        self._file = self._ds = None

    def __repr__(self):
        return (f"Split({self.name!r}, captions={self.num_captions}, images={self.num_images}, "
                f"feature_dim={self.feature_dim}, in_memory={self.in_memory})")


class CocoData:
    """A validated CS231n COCO data directory.

    pca_features: read the 512-wide *_pca.h5 features (True) or the 4096-wide fc7 ones.
    max_train: keep a subset of this many training captions, chosen at random without
        replacement from a fixed seed (so every rank picks the same), in file order.
    feature_memory_budget: bytes; a split's feature matrix is held in memory when it
        fits, otherwise feature rows are read from HDF5 per batch.
    """

    def __init__(self, data_dir, pca_features=True, max_train=None, feature_memory_budget=1 << 30,
                 max_train_seed=0):
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise _fail(self.data_dir, "(directory)", "a data directory", "no such directory")
        self.pca_features = pca_features
        self.word_to_idx, self.idx_to_word = load_vocab(self.data_dir / VOCAB_FILE)
        self.vocab_size = len(self.idx_to_word)
        self._splits: dict[str, Split] = {}
        try:
            raw = self._read_captions()
            for name in SPLITS:
                captions, image_idxs = raw[name]
                fpath = self.data_dir / feature_file(name, pca_features)
                split = Split(name, captions, image_idxs, fpath, feature_memory_budget,
                              self.idx_to_word, self._read_urls(name))
                self._splits[name] = split
                self._check_split(split, fpath)
            if self._splits["train"].feature_dim != self._splits["val"].feature_dim:
                raise _fail(self.data_dir / feature_file("val", pca_features), "features",
                            f"width {self._splits['train'].feature_dim} (as train)",
                            self._splits["val"].feature_dim)
            if max_train is not None:
                self._subsample_train(int(max_train), max_train_seed)
            self._check_not_degenerate()
        except BaseException:
            self.close()
            raise
        self.feature_dim = self._splits["train"].feature_dim

    def _read_captions(self):
        path = self.data_dir / CAPTIONS_FILE
        out = {}
        with _open_h5(path) as f:
            for name in SPLITS:
                ck, ik = f"{name}_captions", f"{name}_image_idxs"
                cds = _dataset(f, path, ck, 2, "iu", "integer")
                ids = _dataset(f, path, ik, 1, "iu", "integer")
                if cds.shape[1] < 2:
                    raise _fail(path, ck, "at least 2 time steps (<START> ... <END>)",
                                f"shape {cds.shape}")
                if ids.shape[0] != cds.shape[0]:
                    raise _fail(path, ik, f"{cds.shape[0]} entries (one per caption)",
                                ids.shape[0])
                captions = _read(cds, path, ck)
                if captions.size and (captions.min() < 0 or captions.max() >= self.vocab_size):
                    raise _fail(path, ck, f"word ids in [0, {self.vocab_size})",
                                f"ids in [{captions.min()}, {captions.max()}]")
                image_idxs = _read(ids, path, ik)
                out[name] = (captions.astype(np.int32), image_idxs.astype(np.int64))
        return out

    def _check_split(self, split: Split, fpath: Path):
        path = self.data_dir / CAPTIONS_FILE
        key = f"{split.name}_image_idxs"
        ii = split.image_idxs
        if ii.size and (ii.min() < 0 or ii.max() >= split.num_images):
            raise _fail(path, key, f"image indices in [0, {split.num_images}) (rows of {fpath.name})",
                        f"indices in [{ii.min()}, {ii.max()}]")
        if split.urls is not None and len(split.urls) != split.num_images:
            raise _fail(self.data_dir / urls_file(split.name), "(lines)",
                        f"{split.num_images} URLs (one per feature row)", len(split.urls))

    def _check_not_degenerate(self):
        """Data that would train or evaluate on nothing, and report it as success, is refused:
        no target token in any training caption (loss 0.0000, 0 tok/s) or no validation
        caption (a val loss over nothing)."""
        path = self.data_dir / CAPTIONS_FILE
        null = self.word_to_idx["<NULL>"]
        train, val = self._splits["train"], self._splits["val"]
        if not (train.captions[:, 1:] != null).any():
            raise _fail(path, "train_captions", "captions with words to predict after <START>",
                        f"{train.num_captions} captions, none with a word or <END> after <START>")
        if val.num_captions == 0 or not (val.captions[:, 1:] != null).any():
            raise _fail(path, "val_captions", "at least one validation caption with words "
                        "(val loss and BLEU need them)", f"{val.num_captions} captions without any")

    def _read_urls(self, name):
        path = self.data_dir / urls_file(name)
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise _fail(path, "(file)", "a readable UTF-8 text file", type(e).__name__) from None

    def _subsample_train(self, max_train: int, seed: int):
        split = self._splits["train"]
        if max_train < 1:
            raise ValueError(f"--max-train must be at least 1, got {max_train}")
        if max_train >= split.num_captions:
            return
        rng = np.random.default_rng(np.random.SeedSequence([seed, max_train]))
        keep = np.sort(rng.choice(split.num_captions, size=max_train, replace=False))
        split.captions = split.captions[keep]
        split.image_idxs = split.image_idxs[keep]
        split.num_captions = max_train

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise KeyError(f"no split {name!r}; expected one of {SPLITS}")
        return self._splits[name]

    def close(self):
        for s in self._splits.values():
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def summary(self) -> str:
        lines = [f"{self.data_dir}: vocabulary {self.vocab_size} words, "
                 f"features {self.feature_dim}-d ({'PCA' if self.pca_features else 'fc7'})"]
        unk = self.word_to_idx["<UNK>"]
        for name in SPLITS:
            s = self._splits[name]
            lengths = _caption_lengths(s.captions, self.word_to_idx)
            unk_frac = float((s.captions == unk).sum()) / max(1, int(lengths.sum()))
            lines.append(
                f"  {name}: {s.num_captions} captions of {s.num_images} images "
                f"({len(np.unique(s.image_idxs))} captioned), {s.captions.shape[1]} slots, "
                f"words/caption {lengths.min() if lengths.size else 0}-"
                f"{lengths.max() if lengths.size else 0} (mean {lengths.mean() if lengths.size else 0:.1f}), "
                f"<UNK> {100 * unk_frac:.2f}%")
            if s.num_captions:
                lines.append(f"    e.g. \"{decode_captions(s.captions[0], self.idx_to_word)}\"")
        return "\n".join(lines)


def _caption_lengths(captions, word_to_idx) -> np.ndarray:
    """Words per caption, not counting <START>, <END> or padding."""
    end, null, start = word_to_idx["<END>"], word_to_idx["<NULL>"], word_to_idx["<START>"]
    is_end = captions == end
    has_end = is_end.any(axis=1)
    stop = np.where(has_end, is_end.argmax(axis=1), captions.shape[1])
    t = np.arange(captions.shape[1])[None, :]
    word = (t < stop[:, None]) & (captions != null) & (captions != start)
    return word.sum(axis=1)


__all__ = [
    "SPECIAL_TOKENS", "DataError", "load_vocab", "validate_vocab", "decode_captions",
    "caption_tokens", "CocoData", "Split", "feature_file", "urls_file",
    "CAPTIONS_FILE", "VOCAB_FILE",
]
