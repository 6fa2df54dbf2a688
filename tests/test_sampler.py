"""ShardedSampler: the global stream is independent of the world size; exact restore."""

import numpy as np
import pytest

from dtrain.parallel.sampler import ShardedSampler

N, B = 1000, 64  # 15 steps per epoch, 40 items dropped


def stream(world_size, steps, seed=3, replacement=False):
    """Per step, the concatenation of every rank's shard (what the ranks see together)."""
    samplers = [ShardedSampler(N, B, r, world_size, seed, replacement) for r in range(world_size)]
    out = []
    for _ in range(steps):
        shards = [s.next_shard() for s in samplers]
        assert all(len(x) == B // world_size for x in shards)
        out.append(np.concatenate(shards))
    return np.array(out)


@pytest.mark.parametrize("replacement", [False, True])
def test_stream_independent_of_world_size(replacement):
    steps = 2 * (N // B) + 5  # crosses two epoch boundaries
    ref = stream(1, steps, replacement=replacement)
    for p in (2, 4, 8):
        np.testing.assert_array_equal(stream(p, steps, replacement=replacement), ref)
    # the union of the shards is the global batch
    s = ShardedSampler(N, B, seed=3, replacement=replacement)
    for k in range(steps):
        e, t = divmod(k, s.steps_per_epoch)
        np.testing.assert_array_equal(ref[k], s.global_batch_indices(e, t))


def test_shards_are_contiguous_rows_of_the_global_batch():
    g = ShardedSampler(N, B, seed=1).global_batch_indices(0, 0)
    for r in range(8):
        s = ShardedSampler(N, B, rank=r, world_size=8, seed=1)
        np.testing.assert_array_equal(s.next_shard(), g[r * 8:(r + 1) * 8])


def test_epoch_is_a_permutation_and_drops_the_last_partial_batch():
    s = ShardedSampler(N, B, seed=0)
    assert s.steps_per_epoch == N // B
    seen = np.concatenate([s.next_shard() for _ in range(s.steps_per_epoch)])
    assert len(np.unique(seen)) == len(seen) == s.steps_per_epoch * B
    assert seen.min() >= 0 and seen.max() < N
    assert s.state_dict() == {"epoch": 1, "step_in_epoch": 0}
    nxt = np.concatenate([s.next_shard() for _ in range(s.steps_per_epoch)])
    assert not np.array_equal(seen, nxt)  # a new permutation each epoch
    # seeded by (seed, epoch) only
    perm = np.random.default_rng(np.random.SeedSequence([0, 1])).permutation(N)
    np.testing.assert_array_equal(nxt, perm[:len(nxt)])
    assert not np.array_equal(ShardedSampler(N, B, seed=1).next_shard(),
                              ShardedSampler(N, B, seed=0).next_shard())


@pytest.mark.parametrize("replacement", [False, True])
def test_restore_mid_epoch_continues_identically(replacement):
    a = ShardedSampler(N, B, rank=1, world_size=4, seed=7, replacement=replacement)
    for _ in range(20):  # into the second epoch
        a.next_shard()
    state = a.state_dict()
    assert state == {"epoch": 1, "step_in_epoch": 20 - a.steps_per_epoch}
    expected = [a.next_shard() for _ in range(30)]
    b = ShardedSampler(N, B, rank=1, world_size=4, seed=7, replacement=replacement)
    b.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(b.next_shard(), want)
    # restored under another world size, the global stream continues the same
    c = [ShardedSampler(N, B, rank=r, world_size=2, seed=7, replacement=replacement)
         for r in range(2)]
    g = ShardedSampler(N, B, seed=7, replacement=replacement)
    g.load_state_dict(state)
    for s in c:
        s.load_state_dict(state)
    for _ in range(5):
        np.testing.assert_array_equal(np.concatenate([s.next_shard() for s in c]),
                                      g.next_shard())


def test_replacement_draws_with_repeats():
    s = ShardedSampler(50, 40, seed=0, replacement=True)
    batches = [s.next_shard() for _ in range(5)]
    assert all(0 <= b.min() and b.max() < 50 for b in batches)
    assert any(len(np.unique(b)) < len(b) for b in batches)


def test_errors():
    with pytest.raises(ValueError, match="--batch-size 100 is not divisible .* 8"):
        ShardedSampler(N, 100, rank=0, world_size=8)
    with pytest.raises(ValueError, match="--batch-size 2000 is larger"):
        ShardedSampler(N, 2000)
    with pytest.raises(ValueError, match="--batch-size"):
        ShardedSampler(N, 0)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(N, B, rank=4, world_size=4)
    s = ShardedSampler(N, B)
    with pytest.raises(ValueError, match="steps per epoch"):
        s.load_state_dict({"epoch": 0, "step_in_epoch": s.steps_per_epoch})
    with pytest.raises(ValueError, match="step_in_epoch"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError):
        s.global_batch_indices(0, -1)
