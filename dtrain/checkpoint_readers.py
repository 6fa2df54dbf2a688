"""Which checkpoint a reader loads: ``sample``/``evaluate --checkpoint``, ``train --init-from``.

The same resolution as ``train --resume latest``: "latest" (or a directory) means the newest
checkpoint that verifies; newer damaged ones are named and skipped (not set aside: a reader
does not own the directory). A reader can run beside a training run whose retention
(``--keep-checkpoints``) deletes files: a file that disappears while it is read was pruned,
not damaged, so the choice is made again (a newer file is there by then).
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .checkpoint import CheckpointError

TRIES = 5  # choices made again after a file vanished under the reader


def _candidates(arg, directory):
    """(directory searched or None for an explicit file, paths newest first)."""
    where = Path(directory) if str(arg) == "latest" else Path(arg)
    if str(arg) != "latest" and not where.is_dir():
        return None, [where]
    return where, [path for _, path in reversed(checkpoint.list_checkpoints(where))]


def _load_file(path: Path, flag: str, required):
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such checkpoint file")
    try:
        return checkpoint.load_checkpoint(path, required=required)
    except CheckpointError:
        if path.exists():
            raise
        raise CheckpointError(f"{flag} {path}: the file was deleted while it was read "
                              "(pruned by a running training?)") from None


def load_newest_verified(arg, directory, flag: str, required=(), say=print):
    """``(path, loaded checkpoint)`` for ``flag arg``: a file, a directory's newest checkpoint
    that verifies, or "latest" in ``directory``. ``say(line)`` names each damaged file
    skipped. CheckpointError (one line naming ``flag``) when there is none to load."""
    for _ in range(TRIES):
        where, paths = _candidates(arg, directory)
        if where is None:
            return paths[0], _load_file(paths[0], flag, required)
        if not paths:
            raise CheckpointError(f"{flag} {arg}: no checkpoint (ckpt-*.h5) in {where}")
        skipped = []
        for path in paths:
            try:
                state = checkpoint.load_checkpoint(path, required=required)
            except CheckpointError as exc:
                if not path.exists():
                    break  # pruned under us: choose again
                skipped.append((path, exc.reason))
                continue
            for bad, why in skipped:
                say(f"{flag} {arg}: skipped {bad}: {why}")
            return path, state
        else:
            raise CheckpointError(f"{flag} {arg}: no checkpoint in {where} verifies (all "
                                  f"{len(skipped)} damaged; the newest: {skipped[0][1]})")
    raise CheckpointError(f"{flag} {arg}: checkpoints in {where} were deleted while being read, "
                          f"{TRIES} times")
