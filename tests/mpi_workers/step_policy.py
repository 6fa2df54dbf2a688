"""build_step's policy on a real communicator: which accumulator, how many micro-shards,
which errors; and the trainer's and the bench's settings give the same step.

Usage: step_policy.py   (under mpiexec -n 2; asserts on every rank, prints OK on rank 0)
"""

import argparse

import numpy as np

from dtrain.bench import step_settings
from dtrain.config import TrainConfig
from dtrain.errors import UserError
from dtrain.nn.model import CaptioningModel
from dtrain.parallel.accumulate import FixedPointAccumulator, FloatAccumulator, PassThrough
from dtrain.parallel.comm import Communicator, run_guarded
from dtrain.step import build_step

VOCAB = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, **{f"w{i}": i for i in range(4, 20)}}


def model():
    return CaptioningModel(VOCAB, 6, 4, 5, "lstm", dtype=np.float64, seed=0)


def main(comm):
    assert comm.size == 2
    cases = [  # (settings, accumulator class, rows per micro-shard or None, reducer mode)
        (dict(batch_size=8), PassThrough, None, "auto"),
        (dict(batch_size=8, embed_reduce="dense"), PassThrough, None, "dense"),
        (dict(batch_size=8, micro_batch=2), FloatAccumulator, 2, "auto"),
        (dict(batch_size=8, micro_batch=4), PassThrough, None, "auto"),  # 4 rows per rank: one pass
        (dict(batch_size=32, deterministic=True), FixedPointAccumulator, 8, "deterministic"),
        (dict(batch_size=16, deterministic=True, micro_batch=8), FixedPointAccumulator, None,
         "deterministic"),
    ]
    for settings, cls, micro, mode in cases:
        step = build_step(TrainConfig(**settings), comm, model())
        assert type(step.accumulator) is cls, (settings, step.accumulator)
        assert step.micro_batch == micro and step.accumulator.mode == mode, (
            settings, step.describe())
        assert not step.adam_in_pass and step.gpu is None
    if_fixed = build_step(TrainConfig(batch_size=32, deterministic=True), comm, model()).accumulator
    assert if_fixed.total_micro == 4  # gcd(32, 8) = 8 rows: 4 micro-shards in the global batch
    for settings, text in ((dict(batch_size=8, deterministic=True), "the 1 micro-shards"),
                           (dict(batch_size=8, micro_batch=3), "expected a divisor")):
        try:
            build_step(TrainConfig(**settings), comm, model())
        except UserError as exc:
            assert str(exc).startswith("--micro-batch") and text in str(exc), exc
        else:
            raise AssertionError(f"{settings}: no error")
    # the bench's flags become the trainer's settings: the same step
    bench = argparse.Namespace(batch_size=16, micro_batch=None, deterministic=True,
                               embed_reduce="sparse", threads=None)
    a = build_step(step_settings(bench), comm, model())
    b = build_step(TrainConfig(batch_size=16, deterministic=True, embed_reduce="sparse"), comm,
                   model())
    assert a.describe() == b.describe() and a.micro_batch == b.micro_batch
    assert a.accumulator.total_micro == b.accumulator.total_micro == 2
    if comm.rank == 0:
        print("OK", flush=True)


if __name__ == "__main__":
    comm = Communicator()
    raise SystemExit(run_guarded(comm, main, comm) or 0)
