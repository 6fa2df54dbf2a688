"""Does a checkpoint fit the model built from the data and flags? (names, shapes, vocabulary)"""

from __future__ import annotations

import numpy as np

from .errors import CheckpointError


def check_params(path, params: dict, params_shapes: dict) -> None:
    """Raise CheckpointError naming the first parameter whose name or shape differs."""
    for name, shape in params_shapes.items():
        if name not in params:
            raise CheckpointError(
                f"checkpoint {path}: has no parameter '{name}' (the model built from the data "
                "and flags needs it)"
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
            f"checkpoint {path}: parameter '{extra[0]}' is not in the model built from the data "
            "and flags (another cell type?)"
        )


def check_vocab(path, saved, idx_to_word) -> None:
    """Raise CheckpointError naming the first difference between the saved vocabulary
    (None: the checkpoint has none) and the data's."""
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


def saved_vocab(ckpt):
    """A loaded checkpoint's ``vocab/idx_to_word``, or None."""
    vocab = ckpt["vocab"]
    return vocab["idx_to_word"] if isinstance(vocab, dict) and "idx_to_word" in vocab else None


def check_compatible(ckpt, params_shapes: dict, idx_to_word) -> None:
    """Refuse a loaded checkpoint that does not fit the model built from the data and flags.

    Raises CheckpointError naming the first parameter whose name or shape
    differs, or the first vocabulary difference.
    """
    path = getattr(ckpt, "path", "<state>")
    check_params(path, ckpt["params"], params_shapes)
    check_vocab(path, saved_vocab(ckpt), idx_to_word)
