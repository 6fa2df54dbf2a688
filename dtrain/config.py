"""All training settings in one dataclass; the CLI flags map onto its fields."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, fields

from .nn.cells import CELLS


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # COCO-layout directory; None: the built-in data set
    pca_features: bool = True
    max_train: int | None = None
    feature_memory_budget_mb: int = 1024
    # model
    cell: str = "lstm"
    # Smaller than CS231n's 256/512 so that the default run on the built-in data
    # takes about two minutes on 2 cores; use --wordvec-dim 256 --hidden-dim 512 for COCO.
    wordvec_dim: int = 128
    hidden_dim: int = 256
    dtype: str = "float32"
    precision: str = "fp32"  # fp32 | bf16: the GEMMs' operands (bf16: float32 sums, CPU with AMX)
    device: str = "cpu"
    # optimisation
    batch_size: int = 128  # global, across all ranks
    lr: float = 2e-3
    lr_decay: float = 1.0  # multiplied into lr once per epoch
    epochs: float | None = None
    steps: int | None = None  # default: 600 steps when neither --epochs nor --steps
    seed: int = 0
    replacement: bool = False
    # evaluation and logging
    eval_every: int = 0  # steps; 0: only at the end
    eval_images: int = 500  # val images sampled for BLEU
    eval_captions: int = 5000  # val captions for the val loss
    log_every: int = 20
    max_length: int = 16
    # checkpoints
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 0  # steps; 0: only at the end and on a signal
    keep_checkpoints: int = 3
    resume: str | None = None  # a path or "latest"
    allow_changed_settings: bool = False  # resume despite result-altering changes
    init_from: str | None = None  # a checkpoint whose parameters start a new run
    # distributed
    threads_per_rank: int | None = None
    embed_reduce: str = "auto"  # auto | dense | sparse
    micro_batch: int | None = None  # rows per micro-shard (gradient accumulation); None: one pass
    deterministic: bool = False  # bitwise identical for any number of ranks (fixed-point sums)
    buckets: int = 1
    reduce_dtype: str = "fp32"  # fp32 | bf16: how the dense gradient travels between ranks
    overlap_reduce: bool = False  # reduce W_vocab's and b_vocab's gradients during BPTT
    check_every: int = 100
    debug: bool = False
    quiet: bool = False
    # diagnostics (docs/diagnostics.md)
    stall_timeout: float = 600.0  # seconds in one collective before the job is ended; 0: off
    trace: str | None = None  # Chrome/Perfetto trace file

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return int(round(self.epochs * steps_per_epoch))
        return 600

    def validate(self):
        """Raise ValueError, one line naming the flag and what it expects, for any
        setting that cannot work; called before any work is done."""
        def need(cond, flag, what, value=None):
            if not cond:
                got = "" if value is None else f", got {value!r}"
                raise ValueError(f"{flag}: expected {what}{got}")

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def count(flag, value, low, allow_none=False):
            if value is None and allow_none:
                return
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            need(is_int(value) and value >= low, flag, what, value)

        def a_path(value):
            return isinstance(value, (str, os.PathLike)) and str(value).strip() != ""

        def positive_number(flag, value):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            need(ok and math.isfinite(value) and value > 0, flag, "a finite number > 0", value)

        need(self.cell in CELLS, "--cell", " or ".join(sorted(CELLS)), self.cell)
        need(self.dtype in ("float32", "float64"), "--dtype", "float32 or float64", self.dtype)
        need(self.device in ("cpu", "gpu", "auto"), "--device", "cpu, gpu or auto", self.device)
        check_precision(self.precision, self.dtype, self.device, self.deterministic)
        need(self.embed_reduce in ("auto", "dense", "sparse"), "--embed-reduce",
             "auto, dense or sparse", self.embed_reduce)
        # data
        need(self.data is None or a_path(self.data), "--data", "a data directory", self.data)
        count("--max-train", self.max_train, 1, allow_none=True)
        count("--feature-memory-budget-mb", self.feature_memory_budget_mb, 0)
        # model
        count("--wordvec-dim", self.wordvec_dim, 1)
        count("--hidden-dim", self.hidden_dim, 1)
        count("--max-length", self.max_length, 1)
        # optimisation
        count("--batch-size", self.batch_size, 1)
        positive_number("--lr", self.lr)
        positive_number("--lr-decay", self.lr_decay)
        if self.epochs is not None and self.steps is not None:
            raise ValueError("--epochs and --steps: give one, not both")
        count("--steps", self.steps, 0, allow_none=True)
        if self.epochs is not None:
            positive_number("--epochs", self.epochs)
        count("--seed", self.seed, 0)
        # evaluation, logging, checkpoints
        count("--eval-every", self.eval_every, 0)
        count("--eval-images", self.eval_images, 0)
        count("--eval-captions", self.eval_captions, 0)
        count("--log-every", self.log_every, 1)
        need(a_path(self.checkpoint_dir), "--checkpoint-dir", "a directory", self.checkpoint_dir)
        count("--checkpoint-every", self.checkpoint_every, 0)
        count("--keep-checkpoints", self.keep_checkpoints, 1)
        need(self.resume is None or a_path(self.resume), "--resume",
             "a checkpoint path, a directory or 'latest'", self.resume)
        need(self.init_from is None or a_path(self.init_from), "--init-from", "a checkpoint path",
             self.init_from)
        if self.resume is not None and self.init_from is not None:
            raise ValueError(
                "--init-from and --resume: give one, not both (--resume continues a run with its "
                "optimizer and data position; --init-from starts a new run from a checkpoint's "
                "parameters)"
            )
        # diagnostics
        ok = (isinstance(self.stall_timeout, numbers.Real)
              and not isinstance(self.stall_timeout, bool))
        need(ok and math.isfinite(self.stall_timeout) and self.stall_timeout >= 0,
             "--stall-timeout", "a non-negative number of seconds (0: off)", self.stall_timeout)
        need(self.trace is None or (a_path(self.trace) and not os.path.isdir(self.trace)),
             "--trace", "a file name (not a directory)", self.trace)
        # distributed
        count("--micro-batch", self.micro_batch, 1, allow_none=True)
        need(self.micro_batch is None or self.batch_size % self.micro_batch == 0, "--micro-batch",
             f"a divisor of --batch-size {self.batch_size}", self.micro_batch)
        count("--threads-per-rank", self.threads_per_rank, 1, allow_none=True)
        count("--buckets", self.buckets, 1)
        need(self.reduce_dtype in ("fp32", "bf16"), "--reduce-dtype", "fp32 or bf16",
             self.reduce_dtype)
        if self.deterministic and self.reduce_dtype != "fp32":
            raise ValueError("--reduce-dtype bf16: not with --deterministic (its sums are exact "
                             "int64; bf16 transport would round them)")
        if self.reduce_dtype == "bf16" and self.dtype != "float32":
            raise ValueError(f"--reduce-dtype bf16: expected --dtype float32, got {self.dtype}")
        if self.deterministic and self.overlap_reduce:
            raise ValueError("--overlap-reduce: not with --deterministic (its fixed-point sums "
                             "are reduced after every micro-shard)")
        count("--check-every", self.check_every, 0)

    def to_dict(self):
        return dataclasses.asdict(self)


# MKL_CBWR values under which MKL's bf16 GEMM was seen to give a row the same bits in GEMMs of
# any row count (2 or more), which --deterministic --precision bf16 relies on
# (docs/precision.md); under COMPATIBLE, for one, it does not
ROW_REPRODUCIBLE_CBWR = ("", "AUTO", "AUTO,STRICT")


def check_precision(precision, dtype="float32", device="cpu", deterministic=False):
    """ValueError (one line naming --precision) unless the GEMM precision can run here: bf16
    needs float32 on the CPU, MKL (the extra ``bf16``) and AMX-BF16 (``bf16.available``);
    with --deterministic, an MKL_CBWR under which its rows keep their bits."""
    if precision == "fp32":
        return
    if precision != "bf16":
        raise ValueError(f"--precision: expected fp32 or bf16, got {precision!r}")
    if dtype != "float32" or device != "cpu":
        raise ValueError(f"--precision bf16: expected --dtype float32 and --device cpu (the "
                         f"bf16 GEMMs are built for the CPU step), got {dtype} on {device}")
    from . import env
    from .kernels import bf16

    if env.flag("DTRAIN_NO_KERNELS"):
        raise ValueError("--precision bf16: runs on the fused CPU kernels, and DTRAIN_NO_KERNELS "
                         "is set")
    ok, why = bf16.available()
    if not ok:
        raise ValueError(f"--precision bf16: {why}")
    cbwr = os.environ.get("MKL_CBWR", "")
    if deterministic and cbwr.upper().replace(" ", "") not in ROW_REPRODUCIBLE_CBWR:
        raise ValueError(f"--deterministic --precision bf16: not with MKL_CBWR={cbwr} (under it "
                         "a row of MKL's bf16 GEMM has other bits in GEMMs of other row counts); "
                         "unset it or use AUTO")


def add_config_flags(parser: argparse.ArgumentParser):
    """One flag per field: --batch-size for batch_size, --no-x for booleans that default on."""
    defaults = TrainConfig()
    helps = {
        "data": "COCO-layout data directory (default: the built-in synthetic data set, "
                "generated once into a cache)",
        "batch_size": "global batch size, split evenly across ranks (default 128)",
        "lr_decay": "learning-rate factor applied once per epoch (default 1.0)",
        "steps": "training steps (default 600 when neither --steps nor --epochs is given)",
        "epochs": "training epochs (may be fractional)",
        "eval_every": "evaluate (val loss, BLEU) every N steps; 0: only at the end",
        "checkpoint_every": "write a checkpoint every N steps; 0: only at the end and on "
                            "SIGTERM/SIGUSR1",
        "resume": "resume from a checkpoint path, or 'latest' in --checkpoint-dir "
                  "(starts fresh if none)",
        "init_from": "start a new run (fresh Adam state and sampler) from this checkpoint's "
                     "parameters; the way to fine-tune",
        "threads_per_rank": "BLAS/kernel threads per rank (default: the node's cores / its ranks)",
        "embed_reduce": "how the word-embedding gradient is reduced: auto (by bytes), dense or "
                        "sparse",
        "check_every": "compare a parameter checksum across ranks every N steps (0: never)",
        "debug": "finite checks every step, a finite-difference gradient check on the first batch, "
                 "consistency check every step, per-rank timings, every collective checked for "
                 "agreement across ranks",
        "stall_timeout": "seconds ranks may wait for the others in one collective before the job "
                         "names the missing ranks, checkpoints the last completed step and ends "
                         "(exit 124); 0 turns it off (default 600)",
        "allow_changed_settings": "with --resume: continue with settings that change the results "
                                  "(seed, lr, ...; see dtrain/resume_settings.py), with a warning",
        "trace": "write a Chrome/Perfetto trace (JSON, one track per rank) to this file, and "
                 "timeline.png beside it; open in https://ui.perfetto.dev or chrome://tracing",
        "device": "cpu, gpu or auto",
        "micro_batch": "rows per micro-shard: the global batch is cut into B/m micro-shards by "
                       "position, run one after the other (gradient accumulation: activation "
                       "memory bounded by m); the number of ranks must divide B/m",
        "deterministic": "bitwise identical results for any number of ranks: per-micro-shard "
                         "gradients summed exactly in int64 fixed point (see docs/determinism.md); "
                         "BLAS threads default to 1 per rank",
        "max_train": "use only this many training captions",
        "reduce_dtype": "how the dense gradient travels between ranks: fp32, or bf16 (half the "
                        "bytes, float32 sums on arrival; not with --deterministic)",
        "overlap_reduce": "reduce W_vocab's and b_vocab's gradients while backpropagation through "
                          "time runs (same sums; CPU, one pass per step; not with --deterministic)",
        "precision": "GEMM operands: fp32 (default), or bf16 (rounded to bf16, float32 sums; "
                     "weights, Adam, softmax, reductions stay float32; CPU with AMX-BF16 and "
                     "the extra bf16, docs/precision.md)",
        "keep_checkpoints": "how many of the newest checkpoints to keep (at least 1; default 3)",
    }
    choices = {"cell": sorted(CELLS), "dtype": ["float32", "float64"],
               "device": ["cpu", "gpu", "auto"], "embed_reduce": ["auto", "dense", "sparse"],
               "reduce_dtype": ["fp32", "bf16"], "precision": ["fp32", "bf16"]}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", bool):
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                    action="store_false", help=helps.get(f.name))
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=helps.get(f.name))
            continue
        kind = str(f.type)
        conv = int if "int" in kind else float if "float" in kind else str
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, help=helps[f.name])
            continue
        parser.add_argument(flag, dest=f.name, type=conv, default=default,
                            choices=choices.get(f.name),
                            help=helps.get(f.name, f"(default {default})"))


def config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if hasattr(args, f.name)})
    cfg.validate()
    return cfg
