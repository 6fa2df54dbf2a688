"""Tooling beside dtrain, never imported by it: comparisons that run each contender in a process
of its own, alternating (PyTorch, ``dtrain train``, one rank against several), the PyTorch twin
of the captioner, the machine-load meter, and the step-hash check of refactors.

Run from the repository root: ``python -m benchmarks.compare_torch --batch-size 128`` (see
README.md here).
"""
