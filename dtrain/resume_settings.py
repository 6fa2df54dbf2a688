"""Resume: the settings stored in a checkpoint compared with the new run's.

A resumed run continues the same computation only with the same settings. A change that alters
the results (another seed: another sample stream; another learning rate; under
``--deterministic``, another micro-batch or thread count: other bits) is refused, or accepted
with ``--allow-changed-settings`` and one warning line naming every difference. Settings that
do not reach the parameters (where to log, how often to evaluate, when to stop) may change
freely. The data are compared by their fingerprint elsewhere (checkpoint/fingerprint.py).
"""

from __future__ import annotations

from types import SimpleNamespace

from .errors import UserError
from .step import micro_batch_rows, requested_threads

# Settings whose change alters the parameters of the resumed run.
ALTERING = ("seed", "replacement", "batch_size", "lr", "lr_decay", "cell", "wordvec_dim",
            "hidden_dim", "dtype", "precision", "reduce_dtype", "max_train", "pca_features",
            "deterministic")
# ... and under --deterministic, which promises the same bits.
ALTERING_DETERMINISTIC = ("micro_batch", "threads_per_rank", "device")


def effective(settings: dict) -> dict:
    """The values a run uses, defaults resolved by the trainer's own policy (dtrain/step's
    ``requested_threads`` and ``micro_batch_rows``) where --deterministic makes them count."""
    out = dict(settings)
    if out.get("deterministic"):
        cfg = SimpleNamespace(**({"batch_size": 8, "micro_batch": None, "threads_per_rank": None}
                                 | out))
        out["threads_per_rank"] = requested_threads(cfg)
        out["micro_batch"] = micro_batch_rows(cfg)
    return out


def changed_settings(saved: dict, now: dict) -> list[str]:
    """``--flag old -> new`` for every result-altering difference (settings the checkpoint does
    not record are not compared)."""
    old, new = effective(saved), effective(now)
    deterministic = old.get("deterministic") or new.get("deterministic")
    keys = ALTERING + (ALTERING_DETERMINISTIC if deterministic else ())
    return [f"--{k.replace('_', '-')} {old[k]} -> {new.get(k)}" for k in keys
            if k in old and old[k] != new.get(k)]


def check_resume_settings(saved: dict, now: dict, path, allow: bool, say) -> None:
    """Refuse (UserError, one line) a resume whose settings alter the results, unless ``allow``;
    then ``say`` one warning line naming every difference."""
    diffs = changed_settings(saved, now)
    if not diffs:
        return
    listed = ", ".join(diffs)
    if not allow:
        raise UserError(f"checkpoint {path}: resuming with other settings would change the run's "
                        f"results ({listed}); resume with the checkpoint's settings, or add "
                        "--allow-changed-settings to continue with the new ones")
    say(f"warning: resuming {path} with changed settings (--allow-changed-settings): {listed}")
