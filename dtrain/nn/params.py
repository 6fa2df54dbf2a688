"""The model's parameters in one flat buffer: their shapes, layout order, and the
named views (``ParamDict``) the CS231n notebooks index.

``W_embed`` is laid out last, so that when its gradient is reduced row-sparse the
rest of the gradient is still one contiguous prefix.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from ..backend import get_array_module, to_device
from .cells import get_cell

# Flat-buffer order; W_embed last (see the module docstring).
PARAM_ORDER = ("W_proj", "b_proj", "Wx", "Wh", "b", "W_vocab", "b_vocab", "W_embed")


def param_shapes(vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type):
    return {
        "W_proj": (input_dim, hidden_dim),
        "b_proj": (hidden_dim,),
        **get_cell(cell_type).param_shapes(wordvec_dim, hidden_dim),
        "W_vocab": (hidden_dim, vocab_size),
        "b_vocab": (vocab_size,),
        "W_embed": (vocab_size, wordvec_dim),
    }


class ParamDict(MutableMapping):
    """``model.params`` as the CS231n notebooks use it, backed by a flat buffer.

    ``params[name]`` is a view into the buffer (in-place edits take effect);
    ``params[name] = array`` copies the values into that view.
    """

    def __init__(self, views):
        self._views = views

    def __getitem__(self, name):
        return self._views[name]

    def __setitem__(self, name, value):
        if name not in self._views:
            raise KeyError(f"unknown parameter {name!r}; expected one of {sorted(self._views)}")
        view = self._views[name]
        if tuple(np.shape(value)) != view.shape:
            raise ValueError(
                f"parameter {name}: expected shape {view.shape}, got {np.shape(value)}")
        if not isinstance(value, type(view)):
            value = to_device(value, get_array_module(view))
        view[...] = value

    def __delitem__(self, name):
        raise TypeError("parameters cannot be deleted")

    def __iter__(self):
        return iter(self._views)

    def __len__(self):
        return len(self._views)


def flat_views(buffer, shapes, order=PARAM_ORDER):
    """Views into ``buffer`` for each named shape, laid out in ``order``."""
    views, offset = {}, 0
    for name in order:
        size = int(np.prod(shapes[name]))
        views[name] = buffer[offset : offset + size].reshape(shapes[name])
        offset += size
    return views
