"""Building a run's parts from its settings: data, model (shared by train, sample, evaluate)."""

from __future__ import annotations

import time

import numpy as np

from .data.coco import CocoData
from .data.synthetic import ensure_builtin_data
from .nn.model import CaptioningModel


def open_data(cfg, comm):
    """The COCO-layout data: --data, or the built-in set.

    The built-in set is generated once per node (by its first local rank, so
    nodes without a shared home directory each get a copy; generation is
    deterministic and safe against a concurrent writer), the other ranks wait.
    """
    data_dir = cfg.data
    if data_dir is None:
        if comm.local_rank == 0:
            t0 = time.perf_counter()
            data_dir = str(ensure_builtin_data())
            if comm.is_root and time.perf_counter() - t0 > 1 and not cfg.quiet:
                print(f"built-in data set ready in {data_dir} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        comm.barrier()
        if data_dir is None:
            data_dir = str(ensure_builtin_data())  # already there: returns at once
    return CocoData(data_dir, pca_features=cfg.pca_features, max_train=cfg.max_train,
                    feature_memory_budget=cfg.feature_memory_budget_mb << 20)


def build_model(cfg, data, xp):
    return CaptioningModel(data.word_to_idx, input_dim=data.feature_dim,
                           wordvec_dim=cfg.wordvec_dim, hidden_dim=cfg.hidden_dim,
                           cell_type=cfg.cell, dtype=np.dtype(cfg.dtype),
                           seed=cfg.seed, xp=xp, precision=getattr(cfg, "precision", "fp32"))
