"""The checkpoint directory: names, the newest by name, retention, damaged files set aside.

Files appear under a real name (``ckpt-<step:08d>.h5``) only by an atomic rename
after they were complete; a file that later fails verification is set aside as
``<name>.damaged`` so that neither a resume nor retention takes it for a good one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..runlock import pid_alive

_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.h5$")
_TMP_RE = re.compile(r"^ckpt-\d{8,}\.h5\.tmp-(\d+)$")


def checkpoint_path(directory, step: int) -> Path:
    """``directory/ckpt-<step:08d>.h5``."""
    return Path(directory) / f"ckpt-{int(step):08d}.h5"


def list_checkpoints(directory) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint under a real name in ``directory``, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _NAME_RE.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory) -> Path | None:
    """The highest-step checkpoint in ``directory`` (temp files ignored), or None.

    Files appear under a real name only by an atomic rename after they were
    complete; whether one was damaged later is what choose.newest_verified finds out.
    """
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def set_aside_checkpoint(path) -> Path:
    """Rename a checkpoint that failed verification to ``<name>.damaged`` (or
    ``<name>.damaged-N``) and return the new path: it stays for inspection, but
    no longer counts as a checkpoint, so resume skips it and prune_checkpoints
    (which keeps the newest by step) does not keep it in place of good ones."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{n}")
        n += 1
    os.replace(path, target)
    return target


def prune_checkpoints(directory, keep: int | None) -> list[Path]:
    """Delete all but the ``keep`` highest-step checkpoints; returns what was removed.

    ``keep`` None or <= 0 keeps everything. Temp files left by a killed
    writer (its pid no longer alive on this host) are removed too.
    """
    directory = Path(directory)
    removed = []
    if keep is not None and keep > 0:
        for _, path in list_checkpoints(directory)[:-keep]:
            path.unlink(missing_ok=True)
            removed.append(path)
    if directory.is_dir():
        for entry in directory.iterdir():
            m = _TMP_RE.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
