"""The training loop: shard -> loss/grads -> reduce -> Adam; eval; logs; checkpoints.

Read top to bottom, one step is:

    idx = sampler.next_shard()                      # this rank's rows of the global batch
    captions, features = train.batch(idx)
    loss = model.loss(features, captions, B)        # gradients of (shard token loss / B)
    comm.allreduce_sum_(grad_buffer[:embed])        # one fused SUM: the global gradient
    comm.reduce_embedding_grad_(ids, rows, ...)     # row-sparse W_embed (or dense)
    adam.step(param_buffer, grad_buffer)            # same arithmetic on every rank

Every rank computes gradients of its summed token loss divided by the global
batch B, so the SUM over ranks is exactly the global batch's gradient, and
the run's results do not depend on the number of ranks.

trainer.py is the only module that knows the data, the model, the
communicator, the optimizer and the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import backend, checkpoint
from .config import TrainConfig, add_config_flags, config_from_args

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on SIGTERM/SIGUSR1, resume with --resume latest


class UserError(RuntimeError):
    """Bad input or flags: printed as one line, no traceback, non-zero exit on every rank."""

    user_error = True


def _user_errors():
    from .checkpoint import CheckpointError
    from .data import DataError

    return (DataError, CheckpointError, backend.DeviceError)


def node_threads(comm, requested=None):
    """BLAS/kernel threads for this rank: --threads-per-rank, else Slurm's
    cpus-per-task, else this rank's usable cores divided among the node's ranks."""
    if requested:
        return int(requested)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = total
    if usable < total:  # the launcher already bound this rank to its own cores
        return max(1, usable)
    return max(1, total // max(1, comm.local_size))


def set_threads(n):
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except Exception:
        pass
    from . import kernels

    kernels.set_num_threads(n)


def _fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Trainer:
    """Holds the state of one data-parallel training run on this rank."""

    def __init__(self, cfg: TrainConfig, comm):
        self.cfg = cfg
        self.comm = comm
        self.log = print if comm.is_root and not cfg.quiet else (lambda *a, **k: None)
        self.threads = node_threads(comm, cfg.threads_per_rank)
        set_threads(self.threads)
        device = backend.resolve_device(cfg.device)
        self.device = device
        self.xp = backend.select(device, comm.local_rank)
        self.data = open_data(cfg, comm)
        self.train_split = self.data.split("train")
        self.val_split = self.data.split("val")
        self.model = build_model(cfg, self.data, self.xp)
        from . import kernels
        from .data import ShardedSampler
        from .optim import Adam

        self.adam = Adam(self.model.num_params, lr=cfg.lr, xp=self.xp, dtype=self.model.dtype,
                         kernels=kernels.for_arrays(self.xp, self.model.dtype))
        # GPU: the fixed-shape step, one CUDA graph per batch shape (gpu_graph.py); on one
        # rank Adam is inside the graph and the loss stays on the device until logged
        self.gpu_step = None
        if device == "gpu":
            from .gpu_graph import GpuTrainStep

            self.gpu_step = GpuTrainStep(self.model, self.adam, graphs=not os.environ.get("DTRAIN_NO_GRAPHS"))
        self.loss_on_device = self.gpu_step is not None and comm.size == 1
        try:
            self.sampler = ShardedSampler(self.train_split.num_captions, cfg.batch_size, comm.rank,
                                          comm.size, cfg.seed, cfg.replacement)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.step = 0
        self.total_steps = cfg.total_steps(self.sampler.steps_per_epoch)
        self.ckpt_dir = Path(cfg.checkpoint_dir)
        self.metrics_path = self.ckpt_dir / "metrics.jsonl"
        self.stop_signal = None
        self.history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        self._resume_or_broadcast()

    # ------------------------------------------------------------------ setup

    def _resume_or_broadcast(self):
        """Parameters and Adam state start identical: rank 0's, from a checkpoint or fresh."""
        cfg, comm, model = self.cfg, self.comm, self.model
        info = {"path": None}
        ckpt = None
        if cfg.resume and comm.is_root:
            path = None
            if cfg.resume == "latest":
                path = checkpoint.latest_checkpoint(self.ckpt_dir)
                if path is None:
                    self.log(f"--resume latest: no checkpoint in {self.ckpt_dir}; starting fresh")
            else:
                path = checkpoint.resolve_resume(cfg.resume, self.ckpt_dir)
            if path is not None:
                ckpt = checkpoint.load_checkpoint(path, required=("params", "adam/m", "adam/v", "adam/t",
                                                                  "sampler", "step", "vocab"))
                checkpoint.check_compatible(ckpt, model.shapes, self.data.idx_to_word)
                saved_b = int(ckpt["config"].get("batch_size", cfg.batch_size)) if "config" in ckpt else cfg.batch_size
                if saved_b != cfg.batch_size:
                    raise checkpoint.CheckpointError(
                        f"checkpoint {path}: trained with --batch-size {saved_b}, now {cfg.batch_size}; "
                        "the sample stream continues only with the same global batch")
                info = {"path": str(path), "step": int(ckpt["step"]), "t": int(ckpt["adam"]["t"]),
                        "sampler": {k: int(v) for k, v in ckpt["sampler"].items()},
                        "world_size": int(ckpt.get("world_size", 0)) if "world_size" in ckpt else None}
                for name in model.shapes:
                    model.params[name] = np.asarray(ckpt["params"][name])
                self.adam.load_state_dict({"m": np.asarray(ckpt["adam"]["m"]),
                                           "v": np.asarray(ckpt["adam"]["v"]), "t": int(ckpt["adam"]["t"])})
        info = comm.bcast_obj(info)
        comm.bcast_array_(model.param_buffer)
        comm.bcast_array_(self.adam.m)
        comm.bcast_array_(self.adam.v)
        if info["path"] is not None:
            self.step = info["step"]
            self.adam.t = info["t"]
            self.sampler.load_state_dict(info["sampler"])
            self.log(f"resumed from {info['path']} at step {self.step} "
                     f"(saved on {info.get('world_size')} ranks, now {comm.size})")

    def _on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name

    # ------------------------------------------------------------------ loop

    def train(self):
        cfg, comm, model, xp = self.cfg, self.comm, self.model, self.xp
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.log(self.banner())
        if self.gpu_step is not None:
            from .gpu_graph import reduce_path

            self.log(f"gpu step: {self.gpu_step.describe()}; gradient reduce: {reduce_path(comm)}")
        B = cfg.batch_size
        dense_embed = comm.size == 1 or cfg.embed_reduce == "dense"
        interval = {"loss": 0.0, "tokens": 0.0, "steps": 0, "time": 0.0, "comm": 0.0, "bytes": 0,
                    "modes": {}}
        run_start = time.perf_counter()
        start_step = self.step
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            epoch = self.sampler.epoch
            idx = self.sampler.next_shard()
            captions, features = self.train_split.batch(idx)
            lr = cfg.lr * cfg.lr_decay ** epoch
            if self.gpu_step is not None:  # batch in through pinned memory, one graph replay
                loss = self.gpu_step.forward_backward(features, captions, B, lr, fuse_adam=comm.size == 1)
                if comm.size > 1:
                    loss = float(loss)  # the gradient reduce below synchronises anyway
            else:
                features = backend.to_device(features, xp)
                loss, _ = model.loss(features, captions, normalizer=B,
                                     embed_grad="dense" if dense_embed else "sparse")
            tokens = int((captions[:, 1:] != model._null).sum())
            if cfg.debug:
                self._debug_checks(loss, features, captions, first=self.step == start_step)
            t1 = time.perf_counter()
            comm.reset_stats()
            loss, tokens, stop, mode = reduce_gradients(
                comm, model, loss, tokens, self.stop_signal is not None, cfg.embed_reduce, cfg.buckets,
                dense_filled=dense_embed or self.gpu_step is not None)
            comm_s = time.perf_counter() - t1
            if not self.loss_on_device:  # (one GPU rank: Adam ran inside the step's graph)
                self.adam.step(model.param_buffer, model.grad_buffer, lr=lr)
            self.step += 1
            dt = time.perf_counter() - t0

            interval["loss"] += loss
            interval["tokens"] += tokens
            interval["steps"] += 1
            interval["time"] += dt
            interval["comm"] += comm_s
            interval["bytes"] += comm.bytes_moved
            interval["modes"][mode] = interval["modes"].get(mode, 0) + 1
            if not self.loss_on_device:  # a device loss is recorded when it is logged
                self.history["step"].append(self.step)
                self.history["loss"].append(loss)
            if cfg.debug:
                print(f"[rank {comm.rank}] step {self.step}: compute {1e3 * (t1 - t0):.1f} ms, "
                      f"comm {1e3 * comm_s:.1f} ms, total {1e3 * dt:.1f} ms", flush=True)
            if comm.size > 1 and (cfg.debug or (cfg.check_every and self.step % cfg.check_every == 0)):
                comm.check_consistent(model.param_buffer, "parameters")
            if self.step % cfg.log_every == 0 or self.step == self.total_steps or stop:
                self._log_interval(interval, run_start, start_step)
                interval = {"loss": 0.0, "tokens": 0.0, "steps": 0, "time": 0.0, "comm": 0.0,
                            "bytes": 0, "modes": {}}
            self._inject_fault()
            if stop:
                path = self.save_checkpoint()
                self.log(f"received {self.stop_signal or 'a stop signal on another rank'}: "
                         f"checkpoint {path} written at step {self.step}; exiting with code "
                         f"{PREEMPTED_EXIT_CODE} (resume with --resume latest)")
                comm.barrier()
                return PREEMPTED_EXIT_CODE
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate_and_log(final=False)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        if self.comm.size > 1 and self.cfg.check_every:
            for arr, what in ((model.param_buffer, "parameters"), (self.adam.m, "Adam first moments"),
                              (self.adam.v, "Adam second moments")):
                comm.check_consistent(arr, what)
        self._dump_rank_state()
        path = self.save_checkpoint()
        self.log(f"training done: {self.step} steps in {_fmt_time(time.perf_counter() - run_start)}; "
                 f"checkpoint {path}")
        if self.total_steps > 0 or cfg.eval_every:
            self.evaluate_and_log(final=True)
        self._plot()
        comm.barrier()
        return 0

    def _inject_fault(self):
        """Test hook: DTRAIN_FAULT="raise@R:S" raises on rank R after step S;
        "signal@R:S" sends SIGTERM to rank R itself after step S."""
        spec = os.environ.get("DTRAIN_FAULT")
        if not spec:
            return
        kind, _, where = spec.partition("@")
        rank, _, step = where.partition(":")
        if int(rank) != self.comm.rank or int(step) != self.step:
            return
        if kind == "raise":
            raise RuntimeError(f"injected fault (DTRAIN_FAULT={spec})")
        if kind == "signal":
            os.kill(os.getpid(), signal.SIGTERM)

    def _dump_rank_state(self):
        """Test hook: DTRAIN_DUMP_DIR gets each rank's params and Adam moments (.npy)."""
        out = os.environ.get("DTRAIN_DUMP_DIR")
        if not out:
            return
        os.makedirs(out, exist_ok=True)
        for name, arr in (("params", self.model.param_buffer), ("m", self.adam.m), ("v", self.adam.v)):
            np.save(os.path.join(out, f"rank{self.comm.rank}-{name}.npy"), backend.to_host(arr))

    def banner(self):
        cfg, m = self.cfg, self.model
        blas = {}
        try:
            from .bench import blas_info

            blas = blas_info()
        except Exception:
            pass
        return (f"dtrain: {self.comm.size} rank(s) x {self.threads} thread(s), device {self.device}, "
                f"BLAS {blas.get('library')} ({blas.get('kernel')}); {cfg.cell} W={cfg.wordvec_dim} "
                f"H={cfg.hidden_dim} V={m.vocab_size} {cfg.dtype}, {m.num_params:,} params\n"
                f"data: {self.data.data_dir} ({self.train_split.num_captions:,} train captions, "
                f"{self.val_split.num_images:,} val images); global batch {cfg.batch_size} "
                f"({cfg.batch_size // self.comm.size} per rank), {self.sampler.steps_per_epoch} steps/epoch, "
                f"training to step {self.total_steps}")

    def _log_interval(self, iv, run_start, start_step):
        if iv["steps"] == 0:
            return
        cfg = self.cfg
        # compute share of communication across ranks: average of every rank's
        comm_share = iv["comm"] / iv["time"] if iv["time"] else 0.0
        step_ms = 1e3 * iv["time"] / iv["steps"]
        tok_s = iv["tokens"] / iv["time"] if iv["time"] else 0.0
        if self.comm.size == 1:
            pass  # tokens are already global
        done = self.step - start_step
        elapsed = time.perf_counter() - run_start
        eta = elapsed / max(done, 1) * (self.total_steps - self.step)
        loss = float(iv["loss"]) / iv["steps"]  # on one GPU: the one copy of the loss out
        if self.loss_on_device:
            self.history["step"].append(self.step)
            self.history["loss"].append(loss)
        epoch = self.step / self.sampler.steps_per_epoch
        mode = max(iv["modes"], key=iv["modes"].get) if iv["modes"] else "local"
        self.log(f"step {self.step:>6}/{self.total_steps} | epoch {epoch:6.2f} | loss {loss:7.4f} | "
                 f"{tok_s:8.0f} tok/s | {step_ms:6.1f} ms/step (comm {100 * comm_share:4.1f}%) | "
                 f"eta {_fmt_time(eta)}", flush=True)
        self._write_metrics({"kind": "train", "step": self.step, "epoch": epoch, "loss": loss,
                             "lr": cfg.lr * cfg.lr_decay ** self.sampler.epoch, "tokens_per_s": tok_s,
                             "step_ms": step_ms, "comm_ms": 1e3 * iv["comm"] / iv["steps"],
                             "comm_share": comm_share, "embed_reduce": mode,
                             "bytes_per_step": iv["bytes"] / iv["steps"], "ranks": self.comm.size})

    def _write_metrics(self, record):
        if not self.comm.is_root:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ debug

    def _debug_checks(self, loss, features, captions, first):
        model, xp = self.model, self.xp
        if not math.isfinite(loss):
            raise FloatingPointError(f"--debug: loss is {loss} at step {self.step + 1}")
        for name, g in model.grads.items():
            if name == "W_embed" and model.embed_grad_sparse is not None and self.comm.size > 1:
                g = model.embed_grad_sparse[1]
            if not bool(xp.isfinite(g).all()):
                raise FloatingPointError(f"--debug: gradient of {name} is not finite at step {self.step + 1}")
        if first:
            err, n = finite_difference_check(model, backend.to_host(features), captions, self.cfg.batch_size,
                                             seed=self.cfg.seed + self.comm.rank)
            print(f"[rank {self.comm.rank}] --debug: finite-difference check of {n} gradient entries "
                  f"(float64): max relative error {err:.2e}", flush=True)
            if err > 1e-5:
                raise FloatingPointError(f"--debug: finite-difference gradient check failed: "
                                         f"relative error {err:.2e} > 1e-5")

    # ------------------------------------------------------------------ eval

    def evaluate_and_log(self, final):
        res = evaluate(self.model, self.comm, self.val_split, self.data.idx_to_word, self.cfg)
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(res["val_loss"])
        b = res["bleu"]
        self.log(f"eval @ step {self.step}: val loss {res['val_loss']:.4f} "
                 f"({res['val_loss_per_token']:.4f}/token) | BLEU-1 {b[0]:.3f} BLEU-2 {b[1]:.3f} "
                 f"BLEU-3 {b[2]:.3f} BLEU-4 {b[3]:.3f} ({res['images']} images)", flush=True)
        self._write_metrics({"kind": "eval", "step": self.step, "val_loss": res["val_loss"],
                             "val_loss_per_token": res["val_loss_per_token"],
                             "bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3],
                             "final": final})
        if final:
            for hyp, refs in res["examples"][:5]:
                self.log(f"  sample : {hyp}\n  refs   : {refs[0]} | {refs[1] if len(refs) > 1 else ''}")
        return res

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self):
        """Rank 0 writes; everyone waits, so nobody exits before the file is complete."""
        path = checkpoint.checkpoint_path(self.ckpt_dir, self.step)
        if self.comm.is_root:
            state = {
                "step": self.step,
                "params": {n: backend.to_host(v) for n, v in self.model.params.items()},
                "adam": {"m": backend.to_host(self.adam.m), "v": backend.to_host(self.adam.v),
                         "t": self.adam.t},
                "sampler": self.sampler.state_dict(),
                "rng": {"seed": self.cfg.seed},
                "config": self.cfg.to_dict() | {"data_dir": str(self.data.data_dir)},
                "vocab": {"idx_to_word": list(self.data.idx_to_word)},
                "world_size": self.comm.size,
            }
            checkpoint.save_checkpoint(path, state)
            checkpoint.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        self.comm.barrier()
        return path

    def _plot(self):
        if not self.comm.is_root or not self.history["loss"]:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.history["step"], self.history["loss"], lw=0.8, label="train loss")
        if self.history["val_loss"]:
            ax.plot(self.history["val_step"], self.history["val_loss"], "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (sum over tokens / captions)")
        ax.legend()
        fig.tight_layout()
        out = self.ckpt_dir / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        self.log(f"loss curves: {out}")


# ---------------------------------------------------------------------------
# Pieces shared by train, sample, evaluate and bench


def reduce_gradients(comm, model, loss, tokens, stop, embed_reduce="auto", buckets=1,
                     dense_filled=False):
    """Sum the gradients, loss, token count and stop flag of one step over the ranks.

    The dense gradient lives in ``model.grad_buffer``; W_embed's is there too when
    ``dense_filled``, and always in ``model.embed_grad_sparse`` as (ids, rows) otherwise.
    With --embed-reduce dense: one Allreduce of the whole buffer (and one of the
    scalars). Otherwise one small Allgather carries every rank's embedding row count
    (which decides sparse or dense) with its loss, tokens and stop flag; dense then
    means one Allreduce of the whole buffer, sparse the dense prefix plus the
    (ids, rows) Allgathervs. Returns the global (loss, tokens, stop, mode).
    """
    if comm.size == 1:
        return loss, tokens, stop, "local"
    if embed_reduce == "dense":
        comm.allreduce_sum_(model.grad_buffer, buckets=buckets)
        totals = comm.allreduce_scalars(np.array([loss, tokens, 1.0 if stop else 0.0]))
        return float(totals[0]), float(totals[1]), bool(totals[2] > 0), "dense"
    ids, rows = model.embed_grad_sparse
    meta = comm.allgather_scalars([ids.shape[0], loss, tokens, 1.0 if stop else 0.0])
    counts = meta[:, 0].astype(np.int64)
    g_embed = model.grads["W_embed"]
    mode, _ = comm.choose_embedding_mode(counts, *g_embed.shape, g_embed.dtype.itemsize, embed_reduce)
    if mode == "dense":
        if not dense_filled:  # scatter locally, then one fused call for all
            g_embed.fill(0)
            g_embed[ids] = rows
        comm.allreduce_sum_(model.grad_buffer, buckets=buckets)
    else:
        comm.allreduce_sum_(model.grad_buffer[: model.embed_offset], buckets=buckets)
        comm.reduce_embedding_grad_(ids, rows, g_embed, mode="sparse", counts=counts)
    return float(meta[:, 1].sum()), float(meta[:, 2].sum()), bool(meta[:, 3].any()), mode


def open_data(cfg, comm):
    """The COCO-layout data: --data, or the built-in set.

    The built-in set is generated once per node (by its first local rank, so
    nodes without a shared home directory each get a copy; generation is
    deterministic and safe against a concurrent writer), the other ranks wait.
    """
    from .data import CocoData
    from .synthetic import ensure_builtin_data

    data_dir = cfg.data
    if data_dir is None:
        if comm.local_rank == 0:
            t0 = time.perf_counter()
            data_dir = str(ensure_builtin_data())
            if comm.is_root and time.perf_counter() - t0 > 1 and not cfg.quiet:
                print(f"built-in data set ready in {data_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
        comm.barrier()
        if data_dir is None:
            data_dir = str(ensure_builtin_data())  # already there: returns at once
    return CocoData(data_dir, pca_features=cfg.pca_features, max_train=cfg.max_train,
                    feature_memory_budget=cfg.feature_memory_budget_mb << 20)


def build_model(cfg, data, xp):
    from .model import CaptioningModel

    return CaptioningModel(data.word_to_idx, input_dim=data.feature_dim, wordvec_dim=cfg.wordvec_dim,
                           hidden_dim=cfg.hidden_dim, cell_type=cfg.cell, dtype=np.dtype(cfg.dtype),
                           seed=cfg.seed, xp=xp)


def finite_difference_check(model, features, captions, normalizer, seed=0, per_param=3, h=1e-5):
    """Centred differences in float64 on a few entries of every parameter's gradient."""
    from .model import CaptioningModel

    m64 = CaptioningModel(model.word_to_idx, model.input_dim, model.wordvec_dim, model.hidden_dim,
                          model.cell_type, dtype=np.float64, seed=0, xp=np, use_kernels=False)
    m64.param_buffer[...] = backend.to_host(model.param_buffer)
    _, grads = m64.loss(features, captions, normalizer=normalizer)
    grads = {k: v.copy() for k, v in grads.items()}
    rng = np.random.default_rng(seed)
    worst, n = 0.0, 0
    for name, p in m64.params.items():
        flat = p.reshape(-1)
        g = grads[name].reshape(-1)
        picks = list(rng.choice(flat.size, size=min(per_param, flat.size), replace=False))
        if np.any(g != 0):
            picks.append(int(np.argmax(np.abs(g))))  # the largest entry is always checked
        scale = max(float(np.max(np.abs(g))), 1e-12)
        for k in picks:
            old = flat[k]
            flat[k] = old + h
            lp = m64.loss(features, captions, normalizer=normalizer, forward_only=True)[0]
            flat[k] = old - h
            lm = m64.loss(features, captions, normalizer=normalizer, forward_only=True)[0]
            flat[k] = old
            num = (lp - lm) / (2 * h)
            worst = max(worst, abs(num - g[k]) / scale)
            n += 1
    return worst, n


def evaluate(model, comm, split, idx_to_word, cfg):
    """Val loss and corpus BLEU-1..4 with the val set sharded across ranks.

    Each rank computes the loss of its block of captions and samples captions
    for its block of images; sums and sampled ids are reduced/gathered, so
    the result is the same for any number of ranks.
    """
    from .data import caption_tokens, decode_captions
    from .metrics import corpus_bleu

    xp = model.xp
    n_caps = min(cfg.eval_captions, split.num_captions)
    mine = np.array_split(np.arange(n_caps), comm.size)[comm.rank]
    loss_sum, tokens = 0.0, 0
    for chunk in np.array_split(mine, max(1, math.ceil(len(mine) / 256))):
        if chunk.size == 0:
            continue
        caps, feats = split.batch(chunk)
        loss, _ = model.loss(backend.to_device(feats, xp), caps, normalizer=1.0, forward_only=True)
        loss_sum += loss
        tokens += int((caps[:, 1:] != model._null).sum())
    totals = comm.allreduce_scalars(np.array([loss_sum, tokens]))

    image_ids, refs = split.image_references()
    n_img = min(cfg.eval_images, len(image_ids))
    my_images = np.array_split(np.arange(n_img), comm.size)[comm.rank]
    sampled = np.zeros((0, cfg.max_length), dtype=np.int64)
    parts = []
    for chunk in np.array_split(my_images, max(1, math.ceil(len(my_images) / 256))):
        if chunk.size == 0:
            continue
        feats = backend.to_device(split.features(image_ids[chunk]), xp)
        parts.append(backend.to_host(model.sample(feats, max_length=cfg.max_length)).astype(np.int64))
    if parts:
        sampled = np.concatenate(parts)
    all_sampled = comm.allgatherv(sampled)
    hyps = [caption_tokens(row, idx_to_word) for row in all_sampled]
    bleu = corpus_bleu(hyps, refs[:n_img]) if n_img else [0.0] * 4
    examples = [(decode_captions(all_sampled[i], idx_to_word), [" ".join(r) for r in refs[i]])
                for i in range(min(5, n_img))]
    return {"val_loss": float(totals[0]) / max(n_caps, 1),
            "val_loss_per_token": float(totals[0]) / max(float(totals[1]), 1.0),
            "bleu": [float(b) for b in bleu], "images": n_img, "examples": examples,
            "sampled": all_sampled}


# ---------------------------------------------------------------------------
# Subcommands


def add_train_parsers(sub):
    p = sub.add_parser("train", help="train (the default subcommand)",
                       description="Train the captioner data-parallel; run under mpirun/mpiexec/srun "
                                   "for several ranks.")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    for name, helptext in (("sample", "print greedy captions of a checkpoint beside their references"),
                           ("evaluate", "val loss and BLEU-1..4 of a checkpoint")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--checkpoint", required=True, help="checkpoint file (or 'latest' with --checkpoint-dir)")
        q.add_argument("--checkpoint-dir", default="checkpoints")
        q.add_argument("--data", default=None, help="data directory (default: the one the checkpoint used)")
        q.add_argument("--split", choices=["train", "val"], default="val")
        q.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
        q.add_argument("--max-length", type=int, default=16)
        q.add_argument("--threads-per-rank", type=int, default=None)
        if name == "sample":
            q.add_argument("-n", "--num", type=int, default=10, help="images to caption (default 10)")
        else:
            q.add_argument("--eval-images", type=int, default=1000)
            q.add_argument("--eval-captions", type=int, default=5000)
        q.set_defaults(func=cmd_sample if name == "sample" else cmd_evaluate)


def _guarded(fn):
    """Run fn(comm) so that an error on any rank ends the whole job."""
    from .comm import Communicator, run_guarded

    comm = Communicator()

    def body():
        try:
            return fn(comm)
        except _user_errors() as exc:
            raise UserError(str(exc)) from None

    return run_guarded(comm, body)


def cmd_train(args):
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    return _guarded(lambda comm: Trainer(cfg, comm).train())


def _load_for_inference(args, comm):
    from types import SimpleNamespace

    info = None
    ckpt = None
    if comm.is_root:
        path = checkpoint.resolve_resume(args.checkpoint, Path(args.checkpoint_dir))
        ckpt = checkpoint.load_checkpoint(path, required=("params", "config", "vocab"))
        info = {"path": str(path), "config": dict(ckpt["config"])}
    info = comm.bcast_obj(info)
    saved = info["config"]
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    cfg.data = args.data or saved.get("data_dir")
    cfg.device = args.device
    cfg.max_length = args.max_length
    cfg.quiet = True
    set_threads(node_threads(comm, args.threads_per_rank))
    xp = backend.select(backend.resolve_device(cfg.device), comm.local_rank)
    data = open_data(cfg, comm)
    model = build_model(cfg, data, xp)
    if comm.is_root:
        checkpoint.check_compatible(ckpt, model.shapes, data.idx_to_word)
        for name in model.shapes:
            model.params[name] = np.asarray(ckpt["params"][name])
    comm.bcast_array_(model.param_buffer)
    return SimpleNamespace(cfg=cfg, data=data, model=model, path=info["path"])


def cmd_sample(args):
    def body(comm):
        from .data import decode_captions

        run = _load_for_inference(args, comm)
        split = run.data.split(args.split)
        image_ids, refs = split.image_references()
        n = min(args.num, len(image_ids))
        mine = np.array_split(np.arange(n), comm.size)[comm.rank]
        feats = backend.to_device(split.features(image_ids[mine]), run.model.xp)
        sampled = backend.to_host(run.model.sample(feats, max_length=args.max_length)).astype(np.int64) \
            if len(mine) else np.zeros((0, args.max_length), np.int64)
        all_sampled = comm.allgatherv(sampled)
        if comm.is_root:
            print(f"{n} {args.split} images, checkpoint {run.path}")
            for i in range(n):
                print(f"[image {int(image_ids[i])}]")
                print(f"  sampled : {decode_captions(all_sampled[i], run.data.idx_to_word)}")
                for r in refs[i][:2]:
                    print(f"  ref     : {' '.join(r)}")
        return 0

    return _guarded(body)


def cmd_evaluate(args):
    def body(comm):
        run = _load_for_inference(args, comm)
        run.cfg.eval_images = args.eval_images
        run.cfg.eval_captions = args.eval_captions
        res = evaluate(run.model, comm, run.data.split(args.split), run.data.idx_to_word, run.cfg)
        if comm.is_root:
            b = res["bleu"]
            print(json.dumps({"checkpoint": run.path, "split": args.split, "ranks": comm.size,
                              "val_loss": res["val_loss"], "val_loss_per_token": res["val_loss_per_token"],
                              "bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3],
                              "images": res["images"]}))
        return 0

    return _guarded(body)
