"""Data parallelism: the MPI transport (comm), gradient reducers (one class per strategy),
micro-shard accumulators (accumulate: pass-through, float, fixed point), the sampler."""
