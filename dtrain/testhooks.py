"""Fault injection and state dumps for the end-to-end tests (environment variables only).

* ``DTRAIN_FAULT="raise@R:S"`` raises on rank R after step S;
  ``"signal@R:S"`` sends SIGTERM to rank R itself after step S;
  ``"signal@R:eval"`` sends it when the final evaluation starts;
  ``"nan@R:S"`` makes rank R's features NaN in step S (so its loss and gradient are);
  ``"hold@R:S1,S2,...:DIR"`` holds rank R after each step S listed (so every rank waits in
  the next step's collective): it creates ``DIR/held-S`` and waits until ``DIR/release-S``
  exists or a stop signal has reached it, for at most ``HOLD_LIMIT_S`` seconds. A test can
  then act (cut a link, send a signal) at a known step instead of racing a fast run.
* ``DTRAIN_DUMP_DIR=DIR`` gets each rank's parameters and Adam moments as .npy at the end.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from . import env, signals
from .backend import to_host

HOLD_LIMIT_S = 120  # a test that never releases fails, it does not hang


def inject_fault(rank, step):
    spec = env.get("DTRAIN_FAULT")
    if not spec:
        return
    if spec.startswith("hold@"):
        _hold(spec, rank, step)
        return
    kind, _, where = spec.partition("@")
    r, _, s = where.partition(":")
    if kind not in ("raise", "signal") or not s.isdigit() or int(r) != rank or int(s) != step:
        return
    if kind == "raise":
        raise RuntimeError(f"injected fault (DTRAIN_FAULT={spec})")
    if kind == "signal":
        os.kill(os.getpid(), signal.SIGTERM)


def _hold(spec, rank, step):
    r, _, rest = spec[len("hold@"):].partition(":")
    steps, _, directory = rest.partition(":")
    if not directory or int(r) != rank or str(step) not in steps.split(","):
        return
    open(os.path.join(directory, f"held-{step}"), "w").close()
    release = os.path.join(directory, f"release-{step}")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(release) and signals.received() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"DTRAIN_FAULT={spec}: {release} not created within "
                               f"{HOLD_LIMIT_S} s")
        time.sleep(0.02)


def dump_rank_state(rank, arrays: dict):
    out = env.get("DTRAIN_DUMP_DIR")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    for name, arr in arrays.items():
        np.save(os.path.join(out, f"rank{rank}-{name}.npy"), to_host(arr))


def _spec():
    spec = env.get("DTRAIN_FAULT", "")
    kind, _, where = spec.partition("@")
    rank, _, at = where.partition(":")
    return kind, rank, at


def corrupt_batch(rank, step, features):
    """``nan@R:S``: rank R's features of step S (1-based) become NaN."""
    kind, r, at = _spec()
    if kind == "nan" and r == str(rank) and at == str(step):
        return np.full_like(features, np.nan)
    return features


def at_final_evaluation(rank):
    kind, r, at = _spec()
    if kind == "signal" and r == str(rank) and at == "eval":
        os.kill(os.getpid(), signal.SIGTERM)
