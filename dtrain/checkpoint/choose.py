"""Which checkpoint a flag names: the one resolution of "latest" in dtrain.

Used by ``train --resume`` and ``--init-from``, ``sample --checkpoint`` and
``evaluate --checkpoint``. "latest" (in the checkpoint directory) or a directory
means the newest checkpoint that verifies: newer damaged ones are named and
skipped. Only the run that owns the directory (``train --resume latest``, which
holds its RunLock) renames them ``<name>.damaged``; a reader, or a run reading
another directory, leaves others' files as they are.

A file that disappears while it is read was pruned (a training's
``--keep-checkpoints`` beside a reader), not damaged: the choice is made again,
and by then a newer file is there.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .read import check_required, load_checkpoint
from .store import list_checkpoints, set_aside_checkpoint

TRIES = 5  # choices made again after a file vanished under the reader


def _newest_that_loads(directory):
    """``(path, loaded, skipped)``: the newest checkpoint in ``directory`` that loads and
    verifies (path None when none does), the newer ones skipped as ``[(path, reason)]``,
    newest first. None when a file vanished while it was read (choose again)."""
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as exc:
            if not path.exists():
                return None
            skipped.append((path, exc.reason))
    return None, None, skipped


def newest_verified(directory, what: str = ""):
    """``(path or None, loaded checkpoint or None, [(skipped path, reason), ...])``.

    ``(None, None, [])`` means there is no checkpoint at all; ``(None, None, [...])``
    that there are some and none verifies (a run should stop, not start afresh over
    them). CheckpointError (prefixed by ``what``) if files vanish ``TRIES`` times."""
    for _ in range(TRIES):
        found = _newest_that_loads(directory)
        if found is not None:
            return found
    raise CheckpointError(f"{what}checkpoints in {directory} were deleted while being read, "
                          f"{TRIES} times")


def latest_verified_checkpoint(directory) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that verifies, and the newer ones skipped:
    ``(path or None, [(skipped_path, reason), ...])``, newest first (newest_verified)."""
    path, _, skipped = newest_verified(directory)
    return path, skipped


def _load_file(path: Path, flag: str):
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such checkpoint file")
    try:
        return load_checkpoint(path)
    except CheckpointError:
        if path.exists():
            raise
        raise CheckpointError(f"{flag} {path}: the file was deleted while it was read "
                              "(pruned by a running training?)") from None


def choose_checkpoint(arg, directory, flag: str, *, say, required=(), owner=False):
    """``(path, loaded checkpoint)`` that ``flag arg`` names: a file, a directory's newest
    checkpoint that verifies, or "latest": the newest that verifies in ``directory``.

    ``say(line)`` names each damaged file skipped. ``owner``: the caller owns
    ``directory`` (holds its lock), so for "latest" the damaged files are set aside as
    ``<name>.damaged``, and a directory without checkpoints is a fresh start,
    ``(None, None)``. Otherwise CheckpointError, one line naming ``flag``, when there
    is none to load; also for the chosen file's missing ``required`` keys ("a/b")."""
    latest = str(arg) == "latest"
    where = Path(directory) if latest else Path(arg)
    if not latest and not where.is_dir():
        path, state = where, _load_file(where, flag)
    else:
        path, state, skipped = newest_verified(where, f"{flag} {arg}: ")
        set_aside = owner and latest
        for bad, why in skipped:
            note = f" (set aside as {set_aside_checkpoint(bad).name})" if set_aside else ""
            say(f"{flag} {arg}: skipped {bad}: {why}{note}")
        if path is None and skipped:
            aside = ", set aside as *.damaged" if set_aside else ""
            raise CheckpointError(f"{flag} {arg}: no checkpoint in {where} verifies (all "
                                  f"{len(skipped)} damaged{aside}; the newest: {skipped[0][1]})"
                                  + ("; not starting fresh over them" if owner else ""))
        if path is None and owner and latest:
            say(f"{flag} {arg}: no checkpoint in {where}; starting fresh")
            return None, None
        if path is None:
            raise CheckpointError(f"{flag} {arg}: no checkpoint (ckpt-*.h5) in {where}")
    check_required(state, path, required)
    return path, state
