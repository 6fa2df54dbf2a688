"""`python -m dtrain` with every default: built-in data, one process, a few minutes on 2 cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Validation BLEU-4 of the same kind of model trained on the built-in data with the image
# features shuffled across images (a language model that cannot see the image) is about
# 0.07-0.08 (tests/test_synthetic.py measures that gap at small scale). "Well above" here
# means at least four times that.
BLIND_BLEU4 = 0.08


@pytest.mark.timeout(660)  # the run's own limit is 600 s; alone it takes well under a minute
def test_default_training_run_learns_from_images(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DTRAIN_CACHE", str(Path(__file__).parent / ".cache"))
    proc = subprocess.run([sys.executable, "-m", "dtrain"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training done" in proc.stdout and "sample :" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "checkpoints" / "metrics.jsonl")]
    final = [r for r in rows if r["kind"] == "eval" and r["final"]][-1]
    assert final["step"] == 600
    assert final["bleu4"] > 4 * BLIND_BLEU4, final
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    assert train[-1] < 0.5 * train[0]
    assert (tmp_path / "checkpoints" / "ckpt-00000600.h5").exists()
