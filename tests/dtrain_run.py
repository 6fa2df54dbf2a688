"""Run dtrain as real processes: plain python for one rank, the mpiexec beside it for more."""

import json
import os
import subprocess
import sys
from pathlib import Path

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def dtrain_cmd(ranks, *args):
    base = [sys.executable, "-m", "dtrain", *map(str, args)]
    if ranks is None:
        return base
    return [MPIEXEC, "-n", str(ranks), *base]


def run_dtrain(ranks, *args, timeout=120, env=None, check=True):
    full_env = dict(os.environ)
    full_env.setdefault("DTRAIN_CACHE", str(Path(__file__).parent / ".cache"))
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    proc = subprocess.run(dtrain_cmd(ranks, *args), capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"dtrain exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def train_losses(ckpt_dir):
    rows = [json.loads(line) for line in open(Path(ckpt_dir) / "metrics.jsonl")]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
