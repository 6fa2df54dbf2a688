"""All training settings in one dataclass; the CLI flags map onto its fields."""

from __future__ import annotations

import argparse
import dataclasses
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
    # distributed
    threads_per_rank: int | None = None
    embed_reduce: str = "auto"  # auto | dense | sparse
    micro_batch: int | None = None  # rows per micro-shard (gradient accumulation); None: one pass
    deterministic: bool = False  # bitwise identical for any number of ranks (fixed-point sums)
    buckets: int = 1
    check_every: int = 100
    debug: bool = False
    quiet: bool = False

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return int(round(self.epochs * steps_per_epoch))
        return 600

    def validate(self):
        """Raise ValueError naming the flag for settings that cannot work."""
        def need(cond, flag, what):
            if not cond:
                raise ValueError(f"{flag}: expected {what}")

        need(self.cell in CELLS, "--cell", " or ".join(sorted(CELLS)))
        need(self.dtype in ("float32", "float64"), "--dtype", "float32 or float64")
        need(self.device in ("cpu", "gpu", "auto"), "--device", "cpu, gpu or auto")
        need(self.embed_reduce in ("auto", "dense", "sparse"), "--embed-reduce", "auto, dense or sparse")
        need(self.batch_size >= 1, "--batch-size", f"a positive integer, got {self.batch_size}")
        need(self.lr > 0, "--lr", f"a positive number, got {self.lr}")
        need(self.lr_decay > 0, "--lr-decay", f"a positive number, got {self.lr_decay}")
        need(self.steps is None or self.steps >= 0, "--steps", f"a non-negative integer, got {self.steps}")
        need(self.epochs is None or self.epochs > 0, "--epochs", f"a positive number, got {self.epochs}")
        need(self.hidden_dim >= 1 and self.wordvec_dim >= 1, "--hidden-dim/--wordvec-dim", "positive sizes")
        need(self.log_every >= 1, "--log-every", "at least 1")
        need(self.buckets >= 1, "--buckets", "at least 1")
        need(self.micro_batch is None or self.micro_batch >= 1, "--micro-batch",
             f"a positive integer, got {self.micro_batch}")
        need(self.micro_batch is None or self.batch_size % self.micro_batch == 0, "--micro-batch",
             f"a divisor of --batch-size {self.batch_size}, got {self.micro_batch}")
        need(self.threads_per_rank is None or self.threads_per_rank >= 1, "--threads-per-rank", "at least 1")
        need(self.max_length >= 1, "--max-length", "at least 1")

    def to_dict(self):
        return dataclasses.asdict(self)


def add_config_flags(parser: argparse.ArgumentParser):
    """One flag per field: --batch-size for batch_size, --no-x for booleans that default on."""
    defaults = TrainConfig()
    helps = {
        "data": "COCO-layout data directory (default: the built-in synthetic data set, generated once into a cache)",
        "batch_size": "global batch size, split evenly across ranks (default 128)",
        "lr_decay": "learning-rate factor applied once per epoch (default 1.0)",
        "steps": "training steps (default 600 when neither --steps nor --epochs is given)",
        "epochs": "training epochs (may be fractional)",
        "eval_every": "evaluate (val loss, BLEU) every N steps; 0: only at the end",
        "checkpoint_every": "write a checkpoint every N steps; 0: only at the end and on SIGTERM/SIGUSR1",
        "resume": "resume from a checkpoint path, or 'latest' in --checkpoint-dir (starts fresh if none)",
        "threads_per_rank": "BLAS/kernel threads per rank (default: the node's cores / its ranks)",
        "embed_reduce": "how the word-embedding gradient is reduced: auto (by bytes), dense or sparse",
        "check_every": "compare a parameter checksum across ranks every N steps (0: never)",
        "debug": "finite checks every step, a finite-difference gradient check on the first batch, "
                 "consistency check every step, per-rank timings",
        "device": "cpu, gpu or auto",
        "micro_batch": "rows per micro-shard: the global batch is cut into B/m micro-shards by position, "
                       "run one after the other (gradient accumulation: activation memory bounded by m); "
                       "the number of ranks must divide B/m",
        "deterministic": "bitwise identical results for any number of ranks: per-micro-shard gradients "
                         "summed exactly in int64 fixed point (see docs/determinism.md); BLAS threads "
                         "default to 1 per rank",
        "max_train": "use only this many training captions",
    }
    choices = {"cell": sorted(CELLS), "dtype": ["float32", "float64"], "device": ["cpu", "gpu", "auto"],
               "embed_reduce": ["auto", "dense", "sparse"]}
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
        parser.add_argument(flag, dest=f.name, type=conv, default=default, choices=choices.get(f.name),
                            help=helps.get(f.name, f"(default {default})"))


def config_from_args(args) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    cfg.validate()
    return cfg
