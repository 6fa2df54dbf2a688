"""The subcommands: train (default), sample, evaluate, data, bench. Each module registers its parsers."""

from __future__ import annotations

from . import bench, data, inference, train

SUBCOMMANDS = ("train", "sample", "evaluate", "data", "bench")


def add_all(sub):
    train.add_parser(sub)
    inference.add_parsers(sub)
    data.add_data_parser(sub)
    bench.add_parser(sub)
