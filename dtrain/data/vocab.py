"""The vocabulary of the CS231n COCO layout: coco2014_vocab.json, checked; ids to words.

Special tokens come from word_to_idx (``<NULL>`` padding, ``<START>``, ``<END>``, ``<UNK>``);
no index is hard-coded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checks import fail, read_json

SPECIAL_TOKENS = ("<NULL>", "<START>", "<END>", "<UNK>")


def load_vocab(path) -> tuple[dict[str, int], list[str]]:
    """Read and validate coco2014_vocab.json -> (word_to_idx, idx_to_word)."""
    path = Path(path)
    blob = read_json(path, "a vocabulary JSON file")
    if not isinstance(blob, dict):
        raise fail(path, "(file)", "a JSON object", type(blob).__name__)
    return validate_vocab(blob.get("word_to_idx"), blob.get("idx_to_word"), path)


def validate_vocab(word_to_idx, idx_to_word, path="vocabulary"
                   ) -> tuple[dict[str, int], list[str]]:
    """(word_to_idx, idx_to_word) once they agree and hold the special tokens; else DataError
    naming ``path`` and the key."""
    if idx_to_word is None:
        raise fail(path, "idx_to_word", "a list of words", "no such key")
    if word_to_idx is None:
        raise fail(path, "word_to_idx", "a word -> index object", "no such key")
    if not isinstance(idx_to_word, list):
        raise fail(path, "idx_to_word", "a list of strings", type(idx_to_word).__name__)
    for i, w in enumerate(idx_to_word):
        if not isinstance(w, str):
            raise fail(path, "idx_to_word", "a list of strings", f"{w!r} at index {i}")
    if not isinstance(word_to_idx, dict) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in word_to_idx.values()
    ):
        raise fail(path, "word_to_idx", "an object of word -> integer", "other values")
    for tok in SPECIAL_TOKENS:
        if tok not in word_to_idx:
            raise fail(path, "word_to_idx", f"the special token {tok}", "no entry for it")
    if len(word_to_idx) != len(idx_to_word):
        raise fail(path, "word_to_idx", f"{len(idx_to_word)} entries (as idx_to_word)",
                    len(word_to_idx))
    for i, w in enumerate(idx_to_word):
        j = word_to_idx.get(w)
        if j != i:
            raise fail(path, "word_to_idx", f"word_to_idx[{w!r}] == {i} (its idx_to_word index)",
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


def caption_lengths(captions, word_to_idx) -> np.ndarray:
    """Words per caption, not counting <START>, <END> or padding."""
    end, null, start = word_to_idx["<END>"], word_to_idx["<NULL>"], word_to_idx["<START>"]
    is_end = captions == end
    has_end = is_end.any(axis=1)
    stop = np.where(has_end, is_end.argmax(axis=1), captions.shape[1])
    t = np.arange(captions.shape[1])[None, :]
    word = (t < stop[:, None]) & (captions != null) & (captions != start)
    return word.sum(axis=1)
