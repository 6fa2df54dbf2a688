"""Recurrent cells, registered by name: ``CELLS["lstm"]`` is the LSTM's :class:`Cell`."""

from __future__ import annotations

from . import gru, lstm, rnn
from .base import Cell

CELLS: dict[str, Cell] = {cell.name: cell for cell in (rnn.CELL, lstm.CELL, gru.CELL)}


def get_cell(name: str) -> Cell:
    try:
        return CELLS[name]
    except KeyError:
        raise ValueError(f"cell_type: expected one of {', '.join(sorted(CELLS))}, "
                         f"got {name!r}") from None


__all__ = ["CELLS", "Cell", "get_cell"]
