"""Every training flag is checked before any work: one ValueError line naming the flag."""

import argparse
import dataclasses
import math

import pytest

from dtrain.cli import LIMITS, build_parser, check_numbers, numeric_flags
from dtrain.config import TrainConfig, config_from_args


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *map(str, argv)]))


def refused(*argv) -> str:
    with pytest.raises(ValueError) as err:
        parse(*argv)
    text = str(err.value)
    assert "\n" not in text, text
    return text


BAD = [
    # (flag, value, what the message says it expected)
    ("--eval-images", -1, "an integer >= 0"),
    ("--eval-captions", -5, "an integer >= 0"),
    ("--checkpoint-every", -1, "an integer >= 0"),
    ("--eval-every", -10, "an integer >= 0"),
    ("--check-every", -1, "an integer >= 0"),
    ("--keep-checkpoints", 0, "a positive integer"),
    ("--max-train", 0, "a positive integer"),
    ("--max-train", -3, "a positive integer"),
    ("--lr", "inf", "a finite number > 0"),
    ("--lr", "nan", "a finite number > 0"),
    ("--lr", "-inf", "a finite number > 0"),
    ("--lr", 0, "a finite number > 0"),
    ("--lr", -0.1, "a finite number > 0"),
    ("--lr-decay", "inf", "a finite number > 0"),
    ("--lr-decay", "nan", "a finite number > 0"),
    ("--lr-decay", 0, "a finite number > 0"),
    ("--epochs", 0, "a finite number > 0"),
    ("--epochs", "inf", "a finite number > 0"),
    ("--steps", -1, "an integer >= 0"),
    ("--feature-memory-budget-mb", -1, "an integer >= 0"),
    ("--seed", -1, "an integer >= 0"),
    ("--max-length", 0, "a positive integer"),
    ("--hidden-dim", 0, "a positive integer"),
    ("--wordvec-dim", 0, "a positive integer"),
    ("--batch-size", 0, "a positive integer"),
    ("--batch-size", -8, "a positive integer"),
    ("--log-every", 0, "a positive integer"),
    ("--buckets", 0, "a positive integer"),
    ("--threads-per-rank", 0, "a positive integer"),
    ("--micro-batch", 0, "a positive integer"),
    ("--micro-batch", 48, "a divisor of --batch-size 128"),
    ("--checkpoint-dir", "", "a directory"),
    ("--init-from", "", "a checkpoint path"),
    ("--data", " ", "a data directory"),
]


@pytest.mark.parametrize("flag,value,expected", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_value_names_the_flag(flag, value, expected):
    text = refused(f"{flag}={value}")  # the = form: argparse takes "-inf" for an option
    assert text.startswith(f"{flag}: expected {expected}"), text


def test_lr_finite_but_large_is_accepted():
    assert parse("--lr", "1e18").lr == 1e18  # finite and positive: the user's call


def test_epochs_and_steps_together():
    assert refused("--epochs", 2, "--steps", 100) == "--epochs and --steps: give one, not both"
    assert parse("--epochs", 2).epochs == 2.0 and parse("--steps", 100).steps == 100


def test_init_from():
    cfg = parse("--init-from", "runs/a/ckpt-00000600.h5")
    assert cfg.init_from == "runs/a/ckpt-00000600.h5" and cfg.resume is None
    assert parse().init_from is None
    for argv in (("--init-from", "x.h5", "--resume"),
                 ("--resume", "latest", "--init-from", "x.h5")):
        text = refused(*argv)
        assert text.startswith("--init-from and --resume: give one, not both"), text
    helps = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--init-from" in helps and "fine-tune" in helps


def test_defaults_and_good_values_pass():
    assert parse() == TrainConfig()
    cfg = parse("--eval-images", 0, "--eval-captions", 0, "--checkpoint-every", 0,
                "--check-every", 0, "--keep-checkpoints", 1, "--max-train", 1, "--seed", 0,
                "--steps", 0, "--feature-memory-budget-mb", 0, "--lr", "1e-6",
                "--micro-batch", 32)  # fmt: skip
    assert cfg.keep_checkpoints == 1 and cfg.max_train == 1 and cfg.micro_batch == 32


def _numeric_fields():
    out = []
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type)
        if "bool" in kind or not ("int" in kind or "float" in kind):
            continue
        out.append("--" + f.name.replace("_", "-"))
    return out


@pytest.mark.parametrize("flag", _numeric_fields())
def test_every_numeric_flag_is_checked(flag):
    """No numeric setting takes -1 or a non-finite value silently (a new field needs a check)."""
    assert refused(f"{flag}=-1").startswith(f"{flag}: expected "), flag
    if flag in ("--lr", "--lr-decay", "--epochs"):
        for value in ("inf", "-inf", "nan"):
            assert refused(f"{flag}={value}").startswith(f"{flag}:")


def test_direct_construction_is_validated_too():
    """validate() also catches values no parser would produce (bools, NaN)."""
    with pytest.raises(ValueError, match="^--batch-size: "):
        TrainConfig(batch_size=True).validate()
    with pytest.raises(ValueError, match="^--lr: "):
        TrainConfig(lr=math.nan).validate()
    with pytest.raises(ValueError, match="^--keep-checkpoints: "):
        TrainConfig(keep_checkpoints=2.5).validate()


# ------------------------------------------------------------------ every flag of every subcommand
TREE = build_parser()
FLAGS = numeric_flags(TREE)


def test_every_numeric_flag_of_every_subcommand_has_a_range():
    """A new numeric flag anywhere in the parser tree must get a range in cli.LIMITS."""
    table = {(where, flag) for where, flags in LIMITS.items() for flag in flags}
    assert set(FLAGS) == table, (set(FLAGS) - table, table - set(FLAGS))


def _required_argv(path):
    """The subcommand's argv with a placeholder for every required option and positional."""
    parser = TREE
    for name in path.split():
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    argv = path.split()
    for action in parser._actions:
        if action.option_strings and action.required:
            argv += [action.option_strings[-1], "x"]
        elif not action.option_strings and action.nargs is None:
            argv.append("x")
    return argv


def _hostile_values(low, high, kind):
    """Values just outside the range (and non-finite ones for floats)."""
    if kind is float:
        out = ["nan", "inf", "-inf", repr(low - 1.0) if (low, high) != (0.0, None) else "0"]
        return out + ([repr(high * 10)] if high is not None else [])
    return [str(low - 1)] + ([str(high + 1), "1000000000000000000000"] if high is not None else [])


CASES = [(where, flag, value) for (where, flag), action in FLAGS.items()
         for value in _hostile_values(*LIMITS[where][flag], action.type)]


@pytest.mark.parametrize("where,flag,value", CASES, ids=[f"{w}:{f}={v}" for w, f, v in CASES])
def test_every_flag_refuses_values_out_of_range_before_work(where, flag, value):
    args = TREE.parse_args([*_required_argv(where), f"{flag}={value}"])
    text = check_numbers(TREE, args)
    assert text is not None and "\n" not in text, (flag, value, text)
    assert flag in text.split(":")[0] and "expected" in text, text


@pytest.mark.parametrize("where,flag", sorted(FLAGS), ids=[f"{w}:{f}" for w, f in sorted(FLAGS)])
def test_every_flag_accepts_its_bounds(where, flag):
    low, high = LIMITS[where][flag]
    kind = FLAGS[(where, flag)].type
    for value in ([low + 0.5] if (kind is float and (low, high) == (0.0, None)) else [low]) + (
            [high] if high is not None else []):
        args = TREE.parse_args([*_required_argv(where), f"{flag}={value}"])
        assert check_numbers(TREE, args) is None, (flag, value)


def test_huge_max_length_is_one_line_before_any_work(tmp_path):
    from dtrain_run import run_dtrain

    for argv in (["sample", "--checkpoint", tmp_path / "x.h5"],
                 ["train", "--checkpoint-dir", tmp_path / "ck", "--steps", 1]):
        p = run_dtrain(None, *argv, "--max-length", 10**12, check=False, timeout=60)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip() == ("dtrain: error: --max-length: expected an integer in "
                                    "[1, 4096], got 1000000000000"), p.stderr
    assert not (tmp_path / "ck").exists()
