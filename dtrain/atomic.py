"""Output files written whole or not at all: a temporary name beside the target, then a rename.

A reader (a browser reloading the captions page, TensorBoard, a resumed run) sees the old
file or the new one, never half of one; a failure leaves no temporary behind. Checkpoints
add a read-back and fsync of their own (checkpoint/write.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a temporary path beside ``path`` (``<name>.tmp-<pid>``) to write; on leaving the
    block it is renamed onto ``path``, or removed if the block raised."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
