"""Where the bench's batches come from: the trainer's data path, or one fixed synthetic batch.

By default every timed step assembles its batch exactly as ``Trainer.train``
does (loop.py): ``split.batch(sampler.next_shard())`` on the ``train`` split of
a COCO-layout data set (``--data``, or the built-in set the trainer uses,
generated once into the cache), with a :class:`ShardedSampler` of the same
seed. So the bench's first steps see the trainer's first batches, and the
sizes (V, D, T, caption lengths) are those of the data.

``--synthetic`` (implied by -T, -D or -V) times one fixed synthetic batch of
COCO-like caption lengths instead, every step (``workload.synthetic_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .workload import synthetic_batch, vocab

# Sizes of the synthetic workload when -T/-D/-V are not given.
SYNTHETIC_DEFAULTS = {"seq_len": 16, "input_dim": 512, "vocab_size": 1004}


class _OneProcess:
    """What ``open_data`` needs of a communicator, for a process outside MPI (the PyTorch twin)."""

    rank, size, local_rank, local_size, is_root = 0, 1, 0, 1, True

    def barrier(self):
        pass


@dataclass
class Workload:
    """The sizes of the model the data implies, and how batches are made."""

    word_to_idx: dict
    input_dim: int  # D
    seq_len: int  # T (target slots)
    source: str  # one line for the report


def synthetic_mode(args) -> bool:
    """--synthetic, or any of the synthetic workload's sizes given explicitly."""
    return bool(args.synthetic) or any(getattr(args, k) is not None for k in SYNTHETIC_DEFAULTS)


class DataBatches:
    """The trainer's batches: this rank's rows from the sampler, assembled from the split."""

    def __init__(self, split, sampler):
        self.split, self.sampler = split, sampler

    def next(self):
        """(captions (n, T+1) int32, features (n, D) float32), as ``Trainer.train`` gets them."""
        return self.split.batch(self.sampler.next_shard())


class FixedBatches:
    """The same synthetic batch every step (``--synthetic``)."""

    def __init__(self, captions, features):
        self.captions, self.features = captions, features

    def next(self):
        return self.captions, self.features


def open_batches(args, comm=None):
    """(batch source, Workload) for this rank (``comm`` None: a single process outside MPI)."""
    comm = comm if comm is not None else _OneProcess()
    B = args.batch_size
    if synthetic_mode(args):
        T, D, V = (getattr(args, k) or SYNTHETIC_DEFAULTS[k]
                   for k in ("seq_len", "input_dim", "vocab_size"))
        features, captions = synthetic_batch(B, T, V, D, np.random.default_rng(args.seed))
        shard = B // comm.size
        lo, hi = comm.rank * shard, (comm.rank + 1) * shard
        src = FixedBatches(captions[lo:hi], features[lo:hi])
        return src, Workload(vocab(V), D, T,
                             f"one fixed synthetic batch (seed {args.seed}), every step")
    from ..config import TrainConfig
    from ..errors import UserError
    from ..parallel.sampler import ShardedSampler
    from ..runsetup import open_data

    data = open_data(TrainConfig(data=args.data, quiet=not comm.is_root), comm)
    split = data.split("train")
    try:
        sampler = ShardedSampler(split.num_captions, B, comm.rank, comm.size, args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    T = int(split.captions.shape[1]) - 1
    source = (f"{data.data_dir} (train split, {split.num_captions:,} captions), ShardedSampler "
              f"seed {args.seed}: assembled in every timed step, as the trainer does")
    return DataBatches(split, sampler), Workload(dict(data.word_to_idx), data.feature_dim, T,
                                                 source)
