"""The tooling in benchmarks/: comparisons that run every contender in a process of its own,
alternating, and the line between it and the product (never how fast: speed is not tested)."""

import ast
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare_torch
from benchmarks.harness import NOT_FORWARDED, child_argv, comparison_parser
from dtrain.cli import build_parser
from dtrain.commands.bench import moved_flag_error
from dtrain_run import run_dtrain

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["-N", 8, "-W", 8, "-H", 16, "--steps", 3, "--warmup", 1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@functools.cache
def _bf16_missing():
    """Why dtrain's bf16 step cannot run on this machine (no MKL extra or no AMX-BF16), or ''.
    Asked when a bf16 test runs, not at collection: it loads MKL and Numba."""
    from dtrain.config import check_precision

    try:
        check_precision("bf16")
    except ValueError as exc:
        return str(exc)
    return ""


def run_module(module, *args, timeout=300, check=True):
    """``python -m benchmarks.module args`` from the repository root, as its README says."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DTRAIN_CACHE", str(ROOT / "tests" / ".cache"))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------------------
# product and tooling apart


def _imported_modules(path):
    """Every module a file imports, at any depth, and every import_module("...") it calls."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Call) and _calls_import(node):
            yield node.args[0].value


def _calls_import(call):
    """importlib.import_module("name") or __import__("name")."""
    name = getattr(call.func, "attr", getattr(call.func, "id", ""))
    return name in ("import_module", "__import__") and bool(call.args) \
        and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def test_no_module_under_dtrain_imports_torch_or_the_tooling():
    offenders = [(str(p.relative_to(ROOT)), name) for p in sorted((ROOT / "dtrain").rglob("*.py"))
                 for name in _imported_modules(p)
                 if name.split(".")[0] in ("torch", "benchmarks")]
    assert offenders == []


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import torch.nn\n    importlib.import_module('torch')\n")
    assert list(_imported_modules(f)) == ["torch.nn", "torch"]


def test_dtrain_bench_names_the_commands_that_replaced_its_comparison_flags():
    p = run_dtrain(None, "bench", "--compare-torch", "--rounds", 3, check=False, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "--compare-torch" in lines[0] and "python -m benchmarks.compare_torch" in lines[0]
    for argv, module in ((["--strong-scaling", "2"], "strong_scaling"),
                         (["--compare-trainer"], "compare_trainer"),
                         (["--fresh-processes"], "compare_torch")):
        line = moved_flag_error(build_parser().parse_args(["bench", *argv]))
        assert argv[0] in line and f"python -m benchmarks.{module}" in line
    assert moved_flag_error(build_parser().parse_args(["bench"])) is None


# ---------------------------------------------------------------------------
# the children's command lines


def test_child_flags_reproduce_the_workload(tiny_data):
    args = comparison_parser("compare_torch", "").parse_args(
        [str(a) for a in ("-N", 16, "-W", 8, "--cell", "gru", "--dtype", "float64", "--data",
                          tiny_data, "--micro-batch", 4, "--deterministic", "--seed", 0,
                          "--rounds", 3, "--threads", 1, "--json", "x.json")])
    again = build_parser().parse_args(["bench", *child_argv(args)])
    for key, value in vars(args).items():
        if key not in NOT_FORWARDED:
            assert getattr(again, key) == value, key
    assert again.json is None and again.threads is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compare_trainer_gives_the_trainer_the_benchs_precision(precision):
    from benchmarks.compare_trainer import trainer_argv

    args = comparison_parser("compare_trainer", "").parse_args(["--precision", precision])
    train = build_parser().parse_args(trainer_argv(args, "ckpt"))
    assert train.precision == args.precision == precision
    assert train.dtype == args.dtype and train.batch_size == args.batch_size


def test_args_namespace_has_no_unforwardable_values():
    """child_argv writes every forwarded value as --flag value: none may be a structure."""
    args = comparison_parser("compare_torch", "").parse_args([])
    for key, value in vars(args).items():
        if key not in NOT_FORWARDED:
            assert value is None or isinstance(value, (bool, int, float, str)), key


# ---------------------------------------------------------------------------
# comparisons: separate processes, alternating rounds


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed")
def test_compare_torch_alternates_blocks_of_two_idle_checked_processes(tmp_path, tiny_data):
    out = tmp_path / "c.json"
    p = run_module("compare_torch", *SMALL, "--data", tiny_data, "--rounds", 3, "--threads", 1,
                   "--json", out)
    r = json.loads(out.read_text())
    assert r["isolation"] == "two processes, alternating blocks"
    assert r["processes"] == 2 and not r["frameworks_mixed"]
    # while one framework ran its block, the other (blocked on its pipe) used next to no CPU
    assert r["idle_other_cpu_ms_max"] < 0.1 * min(r["median_ms"], r["torch_median_ms"]) * 3
    assert len(r["round_ms"]) == 3 and r["torch_median_ms"] > 0 and r["median_ms"] > 0
    assert r["median_ms"] == pytest.approx(sorted(x["dtrain"] for x in r["round_ms"])[1])
    assert r["speedup_vs_torch"] == pytest.approx(r["torch_median_ms"] / r["median_ms"])
    assert r["speedup_range"][0] <= r["speedup_range"][1]
    assert r["torch"]["torch_threads"] == 1 and len(r["torch"]["step_times_ms"]) == 9
    assert r["floor_ms"] > 0  # the dtrain process profiles after its last block
    assert "dtrain fp32 / PyTorch fp32 tokens/s" in p.stdout
    assert "never running at once" in p.stdout
    # the default is float32 on both sides: no autocast, every dtype PyTorch produced float32
    assert r["precision"] == r["torch_precision"] == "fp32" and r["torch"]["autocast"] is None
    assert set(r["torch"]["autocast_dtypes"].values()) == {"float32"}


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed")
def test_compare_torch_fresh_processes(tmp_path, tiny_data):
    out = tmp_path / "c.json"
    run_module("compare_torch", *SMALL, "--data", tiny_data, "--fresh-processes", "--rounds", 2,
               "--threads", 1, "--no-floor", "--json", out)
    r = json.loads(out.read_text())
    assert r["processes"] == 4 and not r["frameworks_mixed"] and len(r["round_ms"]) == 2
    assert r["foreign_load_max"] is None or r["foreign_load_max"] >= 0


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("mode", [[], ["--fresh-processes", "--no-floor"]],
                         ids=["blocks", "fresh"])
def test_compare_torch_bf16_pits_dtrain_bf16_against_torch_autocast(tmp_path, tiny_data, mode):
    if _bf16_missing():  # a CPU without AMX-BF16, or no bf16 extra: dtrain refuses bf16 there
        pytest.skip(_bf16_missing())
    out = tmp_path / "c.json"
    p = run_module("compare_torch", *SMALL, "--data", tiny_data, "--rounds", 2, "--threads", 1,
                   "--precision", "bf16", *mode, "--json", out)
    r = json.loads(out.read_text())
    assert r["precision"] == "bf16" and r["torch_precision"] == "bf16" and r["N"] == 8
    assert not r["frameworks_mixed"] and len(r["round_ms"]) == 2
    # autocast was on: the LSTM and the scores ran in bf16, the loss in float32, and the
    # weights (master copies) and their gradients stayed float32
    assert r["torch"]["autocast_dtypes"] == {"rnn_output": "bfloat16", "scores": "bfloat16",
                                             "loss": "float32", "grads": "float32"}
    assert r["torch"]["autocast"].startswith("torch.autocast(dtype=torch.bfloat16)")
    assert r["contenders"] == {"dtrain": "dtrain bf16 GEMMs", "PyTorch": "PyTorch bf16 autocast"}
    assert "bf16-GEMMs" in p.stdout and "dtrain bf16 GEMMs / PyTorch bf16 autocast" in p.stdout
    assert "PyTorch precision: torch.autocast" in p.stdout
    assert ("never running at once" in p.stdout) == (mode == [])


def test_compare_torch_without_torch_says_so_in_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    assert compare_torch.main(["--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install torch==2.13.0" in lines[0], lines


def test_compare_trainer_reads_the_trainers_logged_step_time(tmp_path, tiny_data):
    out = tmp_path / "t.json"
    p = run_module("compare_trainer", "-N", 8, "-W", 8, "-H", 16, "--steps", 5, "--warmup", 1,
                   "--data", tiny_data, "--rounds", 1, "--threads", 1, "--json", out)
    r = json.loads(out.read_text())
    assert r["trainer"]["median_ms"] > 0 and len(r["trainer"]["interval_ms"]) == 1
    assert r["trainer_over_bench"] == pytest.approx(r["trainer"]["median_ms"]
                                                    / r["bench"]["median_ms"])
    assert "trainer / bench" in p.stdout


def test_strong_scaling_compares_one_rank_with_several(tmp_path, tiny_data):
    out = tmp_path / "s.json"
    run_module("strong_scaling", *SMALL, "--data", tiny_data, "--ranks", 2, "--threads", 2,
               "--rounds", 1, "--json", out)
    r = json.loads(out.read_text())
    assert r["one_rank"]["ranks"] == 1 and r["ranks"]["ranks"] == 2 and r["P"] == 2
    assert r["one_rank"]["threads_per_rank"] == 2 and r["ranks"]["threads_per_rank"] == 1
    assert r["one_rank"]["N"] == r["ranks"]["N"] == 8
    assert 0 <= r["ranks"]["comm_share"] < 1


@pytest.mark.parametrize("module,argv,words", [
    ("compare_torch", ["--ranks", 2], "--ranks"),
    ("compare_torch", ["--rounds", 0], "--rounds"),
    ("compare_torch", ["--precision", "bf16", "--dtype", "float64"], "--precision bf16"),
    ("compare_torch", ["--precision", "bf16", "--no-kernels"], "--precision bf16"),
    ("compare_trainer", ["--synthetic"], "needs data"),
    ("strong_scaling", ["--ranks", 3, "--threads", 2], "--ranks 3"),
    ("strong_scaling", ["--ranks", 2, "--threads", 2, "-N", 7], "--batch-size 7"),
])
def test_comparison_flag_errors_are_one_line(module, argv, words, capsys):
    """Refused before any process starts: exit 2 and one line naming the command and flag."""
    main = importlib.import_module(f"benchmarks.{module}").main
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and f"benchmarks.{module}" in lines[0], lines
    assert captured.out == ""
