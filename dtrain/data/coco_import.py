"""Build the CS231n COCO layout from the official COCO caption annotations.

Inputs per split: the annotation JSON (captions_train2014.json / captions_val2014.json:
{"images": [{"id", "coco_url"?, "flickr_url"?, ...}], "annotations": [{"image_id",
"caption", ...}]}), a feature array (.npy, or .h5 with a dataset, default `features`)
whose row i belongs to the i-th COCO image id of an id-order file (.txt with one id a
line, or a .json list of ids).

Captions are tokenised as in CS231n: lower case, punctuation dropped, split on white
space, at most `max_words` (15) words kept between <START> and <END>. The vocabulary
is built from the training captions (words seen fewer than `min_count` times become
<UNK>), or taken from an existing vocabulary file. Captions of images that have no
feature row are skipped (and counted). Output files are written under temporary
names and renamed, then the directory is validated with CocoData.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from ..atomic import replaced_atomically, write_text_atomic
from .checks import DataError, fail, read_text
from .coco import CAPTIONS_FILE, VOCAB_FILE, CocoData, feature_file, urls_file
from .coco_results import read_caption_annotations
from .vocab import SPECIAL_TOKENS, load_vocab

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def tokenize(caption: str) -> list[str]:
    """CS231n tokenisation: lower case, punctuation removed, split on white space."""
    return caption.lower().translate(_PUNCTUATION).split()


def build_vocab(token_lists, min_count=1) -> tuple[dict[str, int], list[str]]:
    """Special tokens at 0..3, then words seen at least min_count times, most frequent
    first (ties alphabetical)."""
    counts = Counter(w for tokens in token_lists for w in tokens)
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    idx_to_word = list(SPECIAL_TOKENS) + words
    return {w: i for i, w in enumerate(idx_to_word)}, idx_to_word


def encode(tokens, word_to_idx, slots) -> list[int]:
    unk = word_to_idx["<UNK>"]
    ids = [word_to_idx["<START>"]] + [word_to_idx.get(w, unk) for w in tokens]
    ids.append(word_to_idx["<END>"])
    return ids + [word_to_idx["<NULL>"]] * (slots - len(ids))


def _read_image_ids(path: Path) -> list[int]:
    text = read_text(path, "an image-id order file")
    if path.suffix == ".json":
        try:
            ids = json.loads(text)
        except json.JSONDecodeError:
            raise fail(path, "(file)", "a JSON list of image ids", "invalid JSON") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise fail(path, "(file)", "a JSON list of integer image ids", type(ids).__name__)
        return ids
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise fail(path, f"line {n}", "an integer image id", repr(line[:40])) from None
    if len(set(ids)) != len(ids):
        raise fail(path, "(file)", "each image id once", "repeated ids")
    return ids


class _FeatureSource:
    """Rows of a .npy (memory-mapped) or .h5 features array, read in blocks."""

    def __init__(self, path: Path, dataset="features"):
        self.path, self.key = path, dataset
        self._file = None
        if not path.is_file():
            raise fail(path, "(file)", "a features array (.npy or .h5)", "no such file")
        if path.suffix == ".npy":
            self.key = "(array)"
            try:
                self.array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise fail(path, "(file)", "a readable .npy array", type(e).__name__) from None
        elif path.suffix in (".h5", ".hdf5"):
            try:
                self._file = h5py.File(path, "r")
            except OSError as e:
                raise fail(path, "(file)", "a readable HDF5 file", type(e).__name__) from None
            if dataset not in self._file or not isinstance(self._file[dataset], h5py.Dataset):
                self.close()
                raise fail(path, dataset, "a 2-D feature dataset", "no such key")
            self.array = self._file[dataset]
        else:
            raise fail(path, "(file)", "a .npy or .h5 file", f"suffix {path.suffix!r}")
        if self.array.ndim != 2 or self.array.dtype.kind not in "fiu":
            shape, dtype = self.array.shape, self.array.dtype
            self.close()
            raise fail(path, self.key, "a 2-D numeric array", f"shape {shape}, dtype {dtype}")
        self.shape = tuple(int(s) for s in self.array.shape)

    def blocks(self, rows=8192):
        for start in range(0, self.shape[0], rows):
            try:
                block = np.asarray(self.array[start:start + rows], dtype=np.float32)
            except OSError as e:
                raise fail(self.path, self.key, "readable data", type(e).__name__) from None
            if not np.isfinite(block).all():
                r = start + int(np.argwhere(~np.isfinite(block))[0][0])
                raise fail(self.path, self.key, "finite values", f"a non-finite value in row {r}")
            yield start, block

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_atomic_h5(path: Path, fill):
    with replaced_atomically(path) as tmp, h5py.File(tmp, "w") as f:
        fill(f)


def import_coco(out_dir, train_captions, val_captions, train_features, val_features,
                train_image_ids, val_image_ids, min_count=5, max_words=15, vocab=None,
                feature_kind=None, features_dataset="features") -> dict:
    """Write the CS231n layout into out_dir from COCO annotations and feature arrays.

    feature_kind: "pca" (write *_vgg16_fc7_pca.h5) or "full" (*_vgg16_fc7.h5); by
        default "full" for 4096-wide features and "pca" otherwise.
    vocab: path of an existing coco2014_vocab.json to use instead of building one.
    Returns a summary dict (counts per split, vocabulary size, skipped captions).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if max_words < 1:
        raise ValueError(f"--max-words must be at least 1, got {max_words}")
    slots = max_words + 2
    splits = {
        "train": (Path(train_captions), Path(train_features), Path(train_image_ids)),
        "val": (Path(val_captions), Path(val_features), Path(val_image_ids)),
    }
    # Tokenise both splits, keeping only captions of images that have a feature row.
    tokens, image_rows, summary = {}, {}, {"splits": {}}
    id_orders, url_maps = {}, {}
    for name, (cap_path, _, ids_path) in splits.items():
        pairs, urls = read_caption_annotations(cap_path)
        order = _read_image_ids(ids_path)
        row_of = {image_id: r for r, image_id in enumerate(order)}
        toks, rows, skipped, truncated = [], [], 0, 0
        for image_id, caption in pairs:
            r = row_of.get(image_id)
            if r is None:
                skipped += 1
                continue
            t = tokenize(caption)
            if len(t) > max_words:
                truncated += 1
                t = t[:max_words]
            toks.append(t)
            rows.append(r)
        if not toks:
            raise fail(cap_path, "annotations", "captions of images listed in " + ids_path.name,
                        "none")
        tokens[name], image_rows[name] = toks, rows
        id_orders[name], url_maps[name] = order, urls
        summary["splits"][name] = {"captions": len(toks), "skipped_no_features": skipped,
                                   "truncated": truncated}
    if vocab is not None:
        word_to_idx, idx_to_word = load_vocab(vocab)
    else:
        if min_count < 1:
            raise ValueError(f"--min-count must be at least 1, got {min_count}")
        word_to_idx, idx_to_word = build_vocab(tokens["train"], min_count)
    summary["vocab_size"] = len(idx_to_word)

    # Features first (they are the big ones); the captions file last.
    widths = {}
    for name, (_, feat_path, ids_path) in splits.items():
        src = _FeatureSource(feat_path, features_dataset)
        try:
            n, D = src.shape
            if n != len(id_orders[name]):
                raise fail(feat_path, src.key, f"{len(id_orders[name])} rows (one per id in "
                            f"{ids_path.name})", n)
            kind = feature_kind or ("full" if D == 4096 else "pca")
            if kind not in ("pca", "full"):
                raise ValueError(f"--feature-kind must be pca or full, got {kind!r}")
            widths[name] = D

            def fill(f, src=src, n=n, D=D):
                ds = f.create_dataset("features", shape=(n, D), dtype=np.float32)
                for start, block in src.blocks():
                    ds[start:start + len(block)] = block

            _write_atomic_h5(out / feature_file(name, kind == "pca"), fill)
        finally:
            src.close()
        write_text_atomic(out / urls_file(name),
                           "".join(url_maps[name].get(i, "") + "\n" for i in id_orders[name]))
        summary["splits"][name]["images"] = n
    if widths["train"] != widths["val"]:
        raise DataError(f"{splits['val'][1]}: features: expected width {widths['train']} "
                        f"(as train), got {widths['val']}")
    write_text_atomic(out / VOCAB_FILE, json.dumps({"idx_to_word": idx_to_word,
                                                     "word_to_idx": word_to_idx}))

    def fill_captions(f):
        for name in splits:
            caps = np.array([encode(t, word_to_idx, slots) for t in tokens[name]], np.int32)
            f.create_dataset(f"{name}_captions", data=caps)
            f.create_dataset(f"{name}_image_idxs", data=np.array(image_rows[name], np.int32))

    _write_atomic_h5(out / CAPTIONS_FILE, fill_captions)
    with CocoData(out, pca_features=(feature_kind or ("full" if widths["train"] == 4096
                                                       else "pca")) == "pca",
                  feature_memory_budget=0):
        pass
    summary["out_dir"] = str(out)
    return summary
