"""The checkpoint directory: names, the newest, the newest that verifies, retention, damage.

Files appear under a real name (``ckpt-<step:08d>.h5``) only by an atomic rename
after they were complete; a file that later fails verification is set aside as
``<name>.damaged`` so that neither a resume nor retention takes it for a good one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..runlock import pid_alive
from .errors import CheckpointError
from .read import verify_checkpoint

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
    complete; whether one was damaged later is what latest_verified_checkpoint
    finds out.
    """
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def latest_verified_checkpoint(directory) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that verifies, and the newer ones skipped.

    Returns ``(path or None, [(skipped_path, reason), ...])``, newest first;
    the caller prints ``skipped <path>: <reason>`` for each. ``(None, [])``
    means there is no checkpoint at all; ``(None, [...])`` that there are
    some and none verifies (a run should stop, not start afresh over them).
    """
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, exc.reason))
            continue
        return path, skipped
    return None, skipped


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


def resolve_resume(arg, directory) -> Path:
    """``--resume`` to a file: "latest" -> the newest in ``directory``; a
    directory -> the newest in it; else the path itself, which must exist."""
    if str(arg) == "latest":
        found = latest_checkpoint(directory)
        if found is None:
            raise CheckpointError(f"--resume latest: no checkpoint (ckpt-*.h5) in {directory}")
        return found
    path = Path(arg)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"--resume {path}: no checkpoint (ckpt-*.h5) in that directory")
        return found
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    return path



def resume_checkpoint(arg, directory, say) -> Path | None:
    """The checkpoint ``--resume arg`` names. For "latest", the newest in ``directory`` that
    verifies: newer damaged ones are named through ``say(line)``, set aside as
    ``<name>.damaged`` and skipped. None when "latest" finds no checkpoint at all (a fresh
    start); CheckpointError when there are some and none verifies (never start afresh over
    them)."""
    if str(arg) != "latest":
        return resolve_resume(arg, directory)
    path, skipped = latest_verified_checkpoint(directory)
    for bad, why in skipped:
        moved = set_aside_checkpoint(bad)
        say(f"--resume latest: skipped {bad}: {why} (set aside as {moved.name})")
    if path is None and skipped:
        raise CheckpointError(
            f"--resume latest: no checkpoint in {directory} verifies (all {len(skipped)} damaged, "
            "set aside as *.damaged); not starting fresh over them")
    if path is None:
        say(f"--resume latest: no checkpoint in {directory}; starting fresh")
    return path
