"""Which rows of the data each rank trains on, step by step.

The global order is a permutation drawn from (seed, epoch), identical on every
rank and independent of the world size, so a run's sample stream (and its
checkpoints) do not depend on the number of ranks.
"""

from __future__ import annotations

import numpy as np


class ShardedSampler:
    """The global batch of step s in epoch e is rows [s*B, (s+1)*B) of a permutation of
    range(num_items) drawn from SeedSequence([seed, e]): the same on every rank, for
    every world size. Rank r of p takes rows [r*B/p, (r+1)*B/p) of it. The incomplete
    last batch of an epoch is dropped.

    With replacement=True (as CS231n's sample_coco_minibatch), each global batch is B
    draws with replacement from SeedSequence([seed, e, s]); an "epoch" is still
    num_items // B steps.
    """

    def __init__(self, num_items, global_batch, rank=0, world_size=1, seed=0, replacement=False):
        num_items, global_batch = int(num_items), int(global_batch)
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if global_batch < 1:
            raise ValueError(f"--batch-size must be at least 1, got {global_batch}")
        if global_batch % world_size:
            raise ValueError(
                f"--batch-size {global_batch} is not divisible by the number of ranks "
                f"{world_size}; use a multiple of {world_size}")
        if global_batch > num_items:
            raise ValueError(
                f"--batch-size {global_batch} is larger than the data set ({num_items} items)")
        self.num_items = num_items
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.replacement = bool(replacement)
        self.steps_per_epoch = num_items // global_batch
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm_epoch = None
        self._perm = None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._perm = rng.permutation(self.num_items).astype(np.int64)
            self._perm_epoch = epoch
        return self._perm

    def global_batch_indices(self, epoch, step) -> np.ndarray:
        epoch, step = int(epoch), int(step)
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} of epoch {epoch} is outside "
                             f"[0, {self.steps_per_epoch}) steps per epoch")
        B = self.global_batch
        if self.replacement:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, step]))
            return rng.integers(0, self.num_items, size=B, dtype=np.int64)
        return self._permutation(epoch)[step * B:(step + 1) * B].copy()

    def shard_of(self, global_indices) -> np.ndarray:
        b = self.local_batch
        return global_indices[self.rank * b:(self.rank + 1) * b]

    def next_shard(self) -> np.ndarray:
        """This rank's rows of the current step's global batch; then advance one step."""
        shard = self.shard_of(self.global_batch_indices(self.epoch, self.step_in_epoch))
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return shard

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "step_in_epoch": int(self.step_in_epoch)}

    def load_state_dict(self, state) -> None:
        try:
            epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("sampler state needs integer 'epoch' and 'step_in_epoch', "
                             f"got {state!r}") from None
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"sampler state epoch {epoch}, step {step} does not fit {self.steps_per_epoch} "
                f"steps per epoch (was --batch-size or the data set changed?)")
        self.epoch, self.step_in_epoch = epoch, step
