"""Data parallelism: the MPI transport (comm), gradient reducers (one class per strategy), the sampler."""
