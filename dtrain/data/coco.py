"""The CS231n COCO layout: the reader of a validated data directory (Split, CocoData).

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
The checks are in checks.py, the vocabulary and decoding in vocab.py (their names are
importable from here too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checks import (
    DataError,
    check_features,
    check_image_idxs,
    check_not_degenerate,
    checked_dataset,
    fail,
    open_h5,
    read_data,
    read_text,
)
from .vocab import (
    SPECIAL_TOKENS,
    caption_lengths,
    caption_tokens,
    decode_captions,
    load_vocab,
    validate_vocab,
)

CAPTIONS_FILE = "coco2014_captions.h5"
VOCAB_FILE = "coco2014_vocab.json"
SPLITS = ("train", "val")


def feature_file(split: str, pca_features: bool = True) -> str:
    """File name of a split's features in the CS231n layout."""
    return f"{split}2014_vgg16_fc7_pca.h5" if pca_features else f"{split}2014_vgg16_fc7.h5"


def urls_file(split: str) -> str:
    return f"{split}2014_urls.txt"


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
        self._file = open_h5(features_path)
        self._memory = None
        try:
            ds = checked_dataset(self._file, features_path, "features", 2, "f", "floating-point")
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
        """Every feature checked finite in float32 (checks.check_features); kept if asked."""
        return check_features(self._ds, self._features_path, keep)

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
        block = read_data(self._ds, self._features_path, "features", unique)
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
            raise fail(self.data_dir, "(directory)", "a data directory", "no such directory")
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
                raise fail(self.data_dir / feature_file("val", pca_features), "features",
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
        with open_h5(path) as f:
            for name in SPLITS:
                ck, ik = f"{name}_captions", f"{name}_image_idxs"
                cds = checked_dataset(f, path, ck, 2, "iu", "integer")
                ids = checked_dataset(f, path, ik, 1, "iu", "integer")
                if cds.shape[1] < 2:
                    raise fail(path, ck, "at least 2 time steps (<START> ... <END>)",
                                f"shape {cds.shape}")
                if ids.shape[0] != cds.shape[0]:
                    raise fail(path, ik, f"{cds.shape[0]} entries (one per caption)",
                                ids.shape[0])
                captions = read_data(cds, path, ck)
                if captions.size and (captions.min() < 0 or captions.max() >= self.vocab_size):
                    raise fail(path, ck, f"word ids in [0, {self.vocab_size})",
                                f"ids in [{captions.min()}, {captions.max()}]")
                image_idxs = read_data(ids, path, ik)
                out[name] = (captions.astype(np.int32), image_idxs.astype(np.int64))
        return out

    def _check_split(self, split: Split, fpath: Path):
        check_image_idxs(self.data_dir / CAPTIONS_FILE, split, fpath,
                         self.data_dir / urls_file(split.name))

    def _check_not_degenerate(self):
        check_not_degenerate(self.data_dir / CAPTIONS_FILE, self._splits["train"],
                             self._splits["val"], self.word_to_idx["<NULL>"])

    def _read_urls(self, name):
        path = self.data_dir / urls_file(name)
        if not path.is_file():
            return None
        return read_text(path, "a URL list, one per line").splitlines()

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
            lengths = caption_lengths(s.captions, self.word_to_idx)
            unk_frac = float((s.captions == unk).sum()) / max(1, int(lengths.sum()))
            low, high, mean = ((lengths.min(), lengths.max(), lengths.mean()) if lengths.size
                               else (0, 0, 0))
            lines.append(
                f"  {name}: {s.num_captions} captions of {s.num_images} images "
                f"({len(np.unique(s.image_idxs))} captioned), {s.captions.shape[1]} slots, "
                f"words/caption {low}-{high} (mean {mean:.1f}), <UNK> {100 * unk_frac:.2f}%")
            if s.num_captions:
                lines.append(f"    e.g. \"{decode_captions(s.captions[0], self.idx_to_word)}\"")
        return "\n".join(lines)


__all__ = [
    "SPECIAL_TOKENS", "DataError", "load_vocab", "validate_vocab", "decode_captions",
    "caption_tokens", "CocoData", "Split", "feature_file", "urls_file",
    "CAPTIONS_FILE", "VOCAB_FILE",
]
