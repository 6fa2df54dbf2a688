"""The command line: config mapping, bench output (not timings), help."""

import json

import pytest

from dtrain.cli import build_parser
from dtrain.config import TrainConfig, config_from_args
from dtrain_run import run_dtrain


def test_flags_map_onto_config():
    args = build_parser().parse_args(["train", "--batch-size", "64", "--cell", "rnn",
                                      "--lr", "0.01", "--steps", "5", "--resume",
                                      "--threads-per-rank", "3", "--debug"])
    cfg = config_from_args(args)
    assert cfg == TrainConfig(batch_size=64, cell="rnn", lr=0.01, steps=5, resume="latest",
                              threads_per_rank=3, debug=True)
    assert cfg.total_steps(100) == 5
    assert TrainConfig(epochs=1.5).total_steps(100) == 150


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--lr-decay", "0"),
                                        ("--log-every", "0")])
def test_invalid_values_name_the_flag(flag, value):
    args = build_parser().parse_args(["train", flag, value])
    with pytest.raises(ValueError, match=flag):
        config_from_args(args)


def test_broken_dependency_is_one_line_naming_it(tmp_path):
    """A dependency that fails to import names itself; `train` does not silently vanish."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "h5py.py").write_text(
        "raise ImportError('libhdf5.so.310: cannot open shared object file')\n")
    for argv in ([], ["train", "--steps", "1"], ["sample", "--checkpoint", "x"]):
        p = run_dtrain(None, *argv, env={"PYTHONPATH": str(fake)}, check=False, timeout=60)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "h5py" in lines[0] and "invalid choice" not in p.stderr, p.stderr


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bench_runs_every_cell(tmp_path, cell):
    out = tmp_path / "b.json"
    run_dtrain(None, "bench", "-N", 8, "-T", 8, "-D", 16, "-W", 8, "-H", 16, "-V", 40,
               "--cell", cell, "--steps", 2, "--warmup", 1, "--json", out, timeout=120)
    r = json.loads(out.read_text())
    assert r["cell"] == cell and r["median_ms"] > 0
