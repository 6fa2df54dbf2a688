"""RunState: everything a run saves, and the one mapping to and from a checkpoint's keys.

On disk (unchanged since checkpoints carried a data fingerprint):

    step                 int, the number of steps applied
    params/<name>        every parameter, host arrays
    adam/m, adam/v       Adam's moments (flat, the model's layout); adam/t its step count
    sampler/<key>        ShardedSampler.state_dict(): a global position (ints)
    rng/seed             the run's seed
    config               JSON: the settings (TrainConfig.to_dict()) and data_dir
    vocab                JSON: {"idx_to_word": [...]}
    world_size           the number of ranks that wrote it (information only)
    data_fingerprint     the training data's (fingerprint.py)
    extra                JSON, only with --deterministic: {"reducer": the fixed-point scales}

Nothing in it depends on the number of ranks (parameters and Adam moments are
global, the sampler's position is a global step), so a run saved on p ranks
resumes on any other number. Older checkpoints without config, world size,
fingerprint or extra still load: those fields are None (or {}) here, and
nowhere else is a key tested for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compat import check_params, check_vocab, saved_vocab
from .errors import CheckpointError
from .fingerprint import check_fingerprint
from .read import load_checkpoint
from .write import save_checkpoint

# what a resume cannot do without; the rest is optional (older checkpoints)
RESUME_KEYS = ("params", "adam/m", "adam/v", "adam/t", "sampler", "step", "vocab")


@dataclass
class RunState:
    """One run's state after ``step`` applied steps, on the host.

    ``params``, ``adam_m`` and ``adam_v`` are None in the copy that travels to
    the other ranks (``without_arrays``): the arrays go by broadcast into their buffers.
    ``accumulator`` is the accumulator's state_dict (stored under "extra/reducer").
    """

    step: int
    params: dict | None  # name -> array
    adam_m: np.ndarray | None
    adam_v: np.ndarray | None
    adam_t: int
    sampler: dict  # ShardedSampler.state_dict()
    config: dict  # settings, and data_dir
    idx_to_word: list
    seed: int | None = None
    world_size: int | None = None  # ranks that wrote it
    data_fingerprint: str | None = None
    accumulator: dict | None = None  # --deterministic: the fixed-point scales
    path: Path | None = None  # the file it was read from

    def to_checkpoint(self) -> dict:
        """The checkpoint's nested dict (save_checkpoint's input), keys in their on-disk order."""
        state = {
            "step": int(self.step),
            "params": dict(self.params),
            "adam": {"m": self.adam_m, "v": self.adam_v, "t": int(self.adam_t)},
            "sampler": dict(self.sampler),
            "rng": {"seed": self.seed},
            "config": dict(self.config),
            "vocab": {"idx_to_word": list(self.idx_to_word)},
            "world_size": self.world_size,
            "data_fingerprint": self.data_fingerprint,
        }
        if self.accumulator is not None:
            state["extra"] = {"reducer": self.accumulator}
        return state

    @classmethod
    def from_checkpoint(cls, ckpt, path=None) -> RunState:
        """From a loaded checkpoint (load_checkpoint's dict); CheckpointError naming the file
        and key for a missing required key."""
        path = Path(path if path is not None else getattr(ckpt, "path", "<state>"))
        for key in RESUME_KEYS:
            node = ckpt
            for part in key.split("/"):
                if not isinstance(node, dict) or part not in node:
                    raise CheckpointError(f"checkpoint {path}: missing key '{key}'", path=path,
                                          reason=f"missing key '{key}'")
                node = node[part]
        vocab = saved_vocab(ckpt)
        if vocab is None:
            raise CheckpointError(f"checkpoint {path}: missing key 'vocab/idx_to_word'")
        rng, extra = ckpt.get("rng") or {}, ckpt.get("extra") or {}
        world_size = ckpt.get("world_size")
        return cls(
            step=int(ckpt["step"]),
            params={name: np.asarray(value) for name, value in ckpt["params"].items()},
            adam_m=np.asarray(ckpt["adam"]["m"]),
            adam_v=np.asarray(ckpt["adam"]["v"]),
            adam_t=int(ckpt["adam"]["t"]),
            sampler={k: int(v) for k, v in ckpt["sampler"].items()},
            config=dict(ckpt.get("config") or {}),
            idx_to_word=list(vocab),
            seed=None if rng.get("seed") is None else int(rng["seed"]),
            world_size=None if world_size is None else int(world_size),
            data_fingerprint=ckpt.get("data_fingerprint"),
            accumulator=dict(extra).get("reducer"),
            path=path,
        )

    @classmethod
    def read(cls, path) -> RunState:
        """Load and verify ``path`` (CheckpointError, one line, for any fault)."""
        return cls.from_checkpoint(load_checkpoint(path, required=RESUME_KEYS), path)

    def write(self, path) -> Path:
        """Atomically, verified (save_checkpoint); on rank 0 only."""
        return save_checkpoint(path, self.to_checkpoint())

    def check_resumable(self, params_shapes: dict, idx_to_word, fingerprint,
                        batch_size: int) -> None:
        """CheckpointError unless this state continues a run of this model, vocabulary, data
        and global batch (the sample stream continues only with the same global batch)."""
        check_params(self.path, self.params, params_shapes)
        check_vocab(self.path, self.idx_to_word, idx_to_word)
        check_fingerprint(self.data_fingerprint, fingerprint, self.path)
        saved = int(self.config.get("batch_size", batch_size))
        if saved != batch_size:
            raise CheckpointError(
                f"checkpoint {self.path}: trained with --batch-size {saved}, now {batch_size}; "
                "the sample stream continues only with the same global batch")

    def without_arrays(self) -> dict:
        """This state without the large arrays, JSON-able: what the other ranks receive by
        object broadcast (the arrays go by broadcast into their buffers)."""
        small = dataclasses.replace(self, params=None, adam_m=None, adam_v=None)
        return dataclasses.asdict(small) | {"path": None if self.path is None else str(self.path)}

    @classmethod
    def from_dict(cls, small: dict) -> RunState:
        """The inverse of ``without_arrays``."""
        path = small.get("path")
        return cls(**(small | {"path": None if path is None else Path(path)}))
