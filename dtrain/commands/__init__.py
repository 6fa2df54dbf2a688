"""The subcommands: train (default), sample, evaluate, score, data, bench. Each module
registers its parsers."""

from __future__ import annotations

from . import bench, data, inference, score, train

SUBCOMMANDS = ("train", "sample", "evaluate", "score", "data", "bench")


def add_all(sub):
    train.add_parser(sub)
    inference.add_parsers(sub)
    score.add_parser(sub)
    data.add_data_parser(sub)
    bench.add_parser(sub)
