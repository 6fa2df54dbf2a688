"""The training loop: shard -> step (forward, backward, reduce, Adam) -> log, eval, checkpoint.

Read top to bottom, one step of ``Trainer.train`` is:

    idx = sampler.next_shard()                       # this rank's rows of the global batch
    captions, features = train_split.batch(idx)
    result = step(features, captions, B, lr, stop)   # dtrain/step: the one step path

Every rank computes gradients of its summed token loss divided by the global
batch B, so the SUM over ranks is exactly the global batch's gradient, and
the run's results do not depend on the number of ranks. This module is the
only one that knows the data, the model, the communicator, the optimizer and
the checkpoints together.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import uuid
from pathlib import Path

import numpy as np

from . import backend, checkpoint, env, signals, testhooks
from .config import TrainConfig
from .errors import UserError
from .evaluate import evaluate
from .nn.gradcheck import finite_difference_check
from .parallel.sampler import ShardedSampler
from .parallel.watchdog import Progress, Watchdog
from .resume_settings import check_resume_settings
from .runlock import RunLock, check_writable_dir
from .runlog import DivergenceWatch, Interval, RunLog, fmt_time
from .runsetup import build_model, open_data
from .step import NonFiniteError, build_step, rank_threads
from .trace import Tracer

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal, resume with --resume latest


def diagnostics_settings(cfg):
    """(stall timeout in seconds, trace path or None): --stall-timeout / --trace, else the
    environment's DTRAIN_STALL_TIMEOUT / DTRAIN_TRACE. A flag given (not at its default) wins."""
    timeout = getattr(cfg, "stall_timeout", None)
    env_timeout = env.get("DTRAIN_STALL_TIMEOUT")
    if env_timeout and (timeout is None or timeout == 600.0):
        try:
            timeout = float(env_timeout)
        except ValueError:
            raise UserError("DTRAIN_STALL_TIMEOUT: expected a number of seconds, "
                            f"got {env_timeout!r}") from None
    timeout = 600.0 if timeout is None else float(timeout)
    if not timeout >= 0:
        raise UserError("--stall-timeout: expected a non-negative number of seconds (0: off), "
                        f"got {timeout}")
    trace = getattr(cfg, "trace", None) or env.get("DTRAIN_TRACE")
    if trace and Path(trace).is_dir():
        raise UserError(f"--trace: expected a file name, got the directory {trace}")
    return timeout, trace


class Trainer:
    """Holds the state of one data-parallel training run on this rank."""

    def __init__(self, cfg: TrainConfig, comm):
        self.cfg, self.comm = cfg, comm
        # stall watchdog, --trace, --debug collective checks (docs/diagnostics.md)
        self._start_diagnostics()
        self.threads = rank_threads(cfg, comm)  # before the model: its kernels use the pool
        self.device = backend.resolve_device(cfg.device)
        self.xp = backend.select(self.device, comm.local_rank)
        self.ckpt_dir = Path(cfg.checkpoint_dir)
        self.log = RunLog(self.ckpt_dir, enabled=comm.is_root, quiet=cfg.quiet)
        self._claim_output()
        self.data = open_data(cfg, comm)
        self.train_split = self.data.split("train")
        self.val_split = self.data.split("val")
        self.model = build_model(cfg, self.data, self.xp)
        # the step (dtrain/step): micro-shards, accumulator, reducer and Adam, as the bench's
        self.step_fn = build_step(cfg, comm, self.model, graphs=not env.flag("DTRAIN_NO_GRAPHS"))
        self.adam, self.accumulator = self.step_fn.optimizer, self.step_fn.accumulator
        try:
            self.sampler = ShardedSampler(self.train_split.num_captions, cfg.batch_size, comm.rank,
                                          comm.size, cfg.seed, cfg.replacement)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.step = 0
        self.total_steps = cfg.total_steps(self.sampler.steps_per_epoch)
        self.stop_signal = None
        self.resumed_from = None
        self._resume_or_broadcast()

    # ------------------------------------------------------------------ setup

    def _claim_output(self):
        """Before any work: rank 0 creates and write-tests the checkpoint directory and takes
        its lock (one run per directory); a failure is one line, on every rank (the abort)."""
        self.lock = None
        if not self.comm.is_root:
            return
        check_writable_dir(self.ckpt_dir, "--checkpoint-dir")
        if self.cfg.trace:
            check_writable_dir(Path(self.cfg.trace).resolve().parent, "--trace")
        self.lock = RunLock(self.ckpt_dir)
        message = self.lock.acquire()
        if message:
            self.log.say(message)

    def _data_fingerprint(self):
        splits = (self.train_split, self.val_split)
        return checkpoint.data_fingerprint({s.name: s.captions for s in splits},
                                           {s.name: s.image_idxs for s in splits})

    def _init_from(self):
        """--init-from: a new run (fresh Adam state and sampler) from a checkpoint's parameters."""
        path, ckpt = checkpoint.choose_checkpoint(self.cfg.init_from, self.ckpt_dir, "--init-from",
                                                  say=self.log.say, required=("params", "vocab"))
        checkpoint.check_compatible(ckpt, self.model.shapes, self.data.idx_to_word)
        for name in self.model.shapes:
            self.model.params[name] = np.asarray(ckpt["params"][name])
        self.log.say(f"--init-from {path}: parameters loaded; a new run (fresh Adam state and "
                     "sample stream)")

    def _read_resume_state(self):
        """Rank 0: the RunState --resume names, checked against this run, or None (a fresh
        start: --resume latest in an empty directory)."""
        path, ckpt = checkpoint.choose_checkpoint(self.cfg.resume, self.ckpt_dir, "--resume",
                                                  say=self.log.say, owner=True)
        if path is None:
            return None
        state = checkpoint.RunState.from_checkpoint(ckpt, path)
        state.check_resumable(self.model.shapes, self.data.idx_to_word, self.fingerprint,
                              self.cfg.batch_size)
        check_resume_settings(state.config, self.cfg.to_dict(), path,
                              self.cfg.allow_changed_settings, self.log.say)
        for name in self.model.shapes:
            self.model.params[name] = state.params[name]
        self.adam.load_state_dict({"m": state.adam_m, "v": state.adam_v, "t": state.adam_t})
        return state

    def _resume_or_broadcast(self):
        """Parameters and Adam state start identical: rank 0's, from a checkpoint or fresh."""
        cfg, comm = self.cfg, self.comm
        self.fingerprint = self._data_fingerprint() if comm.is_root else None
        if cfg.init_from and comm.is_root:
            self._init_from()
        state = self._read_resume_state() if cfg.resume and comm.is_root else None
        small = comm.bcast_obj(state.without_arrays() if state is not None else None)
        comm.bcast_array_(self.model.param_buffer)
        comm.bcast_array_(self.adam.m)
        comm.bcast_array_(self.adam.v)
        if small is not None:
            state = checkpoint.RunState.from_dict(small)
            self.step = state.step
            self.adam.t = state.adam_t
            self.sampler.load_state_dict(state.sampler)
            self.accumulator.load_state_dict(state.accumulator)
            self.resumed_from = str(state.path)
            self.log.say(f"resumed from {state.path} at step {self.step} "
                         f"(saved on {state.world_size} ranks, now {comm.size})")

    # ------------------------------------------------------------------ diagnostics

    def _start_diagnostics(self):
        """Before the run's first collective, so that a stall anywhere is caught."""
        cfg, comm = self.cfg, self.comm
        stall_timeout, trace = diagnostics_settings(cfg)
        self.progress = Progress()  # where this rank is: read by the watchdog thread
        comm.debug_collectives = bool(cfg.debug)
        self.tracer = self.watchdog = None
        if comm.size > 1 and Watchdog.supported(comm):
            self.watchdog = Watchdog(comm, self.progress, stall_timeout,
                                     checkpoint=self._stall_checkpoint)
            self.watchdog.start()
        if trace:
            self.tracer = Tracer(trace, comm.rank, comm.size)
            self.tracer.align(comm)
            comm.tracer = self.tracer
            comm.on_abort(self.tracer.write_own)
            if self.watchdog is not None:
                self.watchdog.tracer = self.tracer

    def _finish_diagnostics(self):
        """At the end of a run, on every rank: the merged trace (rank 0 writes); the watchdog
        stops."""
        self.progress.enter("done")
        if self.tracer is not None:
            written = self.tracer.finish(self.comm)
            if written:
                paths = written if isinstance(written, tuple) else (written,)
                self.log.say(f"trace: {paths[0]} (open in https://ui.perfetto.dev or chrome://tracing)"
                             + (f"; timeline: {paths[1]}" if len(paths) > 1 else ""))
        if self.watchdog is not None:
            self.watchdog.close()

    @contextlib.contextmanager
    def _phase(self, name, category):
        """A phase outside the step: the watchdog sees it, the trace gets a span."""
        self.progress.enter(name, self.step)
        t0 = time.perf_counter()
        yield
        if self.tracer is not None:
            self.tracer.span(name, category, t0, time.perf_counter(), {"step": self.step})

    def _on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name

    def _stop_requested(self):
        return self.stop_signal is not None

    # ------------------------------------------------------------------ loop

    def train(self):
        code = self._train()
        self._finish_diagnostics()
        return code

    def _train(self):
        cfg, comm = self.cfg, self.comm
        if self.tracer is not None:  # diagnostics: setup = from the aligned clocks' zero to here
            self.tracer.span("setup", "setup", self.tracer.origin, time.perf_counter())
        signals.on_stop(self._on_signal)  # handlers since main's first line (dtrain/signals.py)
        self.log.say(self.banner())
        self.log.start(uuid.uuid4().hex[:12], comm.size, self.step, self.resumed_from,
                       cfg.to_dict())
        B = cfg.batch_size
        interval = Interval()
        self.divergence = DivergenceWatch()
        start_step = self.step
        check = self._debug_check if cfg.debug else None
        while self.step < self.total_steps:
            epoch = self.sampler.epoch
            lr = cfg.lr * cfg.lr_decay**epoch
            self.progress.enter("batch", self.step + 1)  # diagnostics
            t_batch = time.perf_counter()
            captions, features = self.train_split.batch(self.sampler.next_shard())
            features = testhooks.corrupt_batch(comm.rank, self.step + 1, features)
            self._first = self.step == start_step
            self._batch = (features, captions)
            self.progress.enter("step")
            try:
                result = self.step_fn(features, captions, B, lr, stop=self._stop_requested(),
                                      check=check)
            except NonFiniteError as exc:  # not applied: parameters are still those of self.step
                last = checkpoint.latest_checkpoint(self.ckpt_dir) if comm.is_root else None
                # no update yet: the learning rate cannot be the cause, the data (or init) are
                hint = ("check the data: no update had been applied yet" if self.step == 0
                        else "lower --lr?")
                raise UserError(f"step {self.step + 1}: {exc}; the step was not applied and "
                                "training stopped; last good checkpoint: "
                                f"{last or 'none'} ({hint})") from None
            self.step += 1
            # diagnostics: what a stall saves
            self.progress.completed(self.step, self._resume_point())
            if self.tracer is not None:
                self.tracer.step(self.step, t_batch, result)
            if self.step == start_step + 1:
                self.divergence.start(result.loss)
            interval.add(result)
            if cfg.debug:
                print(f"[rank {comm.rank}] step {self.step}: "
                      f"compute {1e3 * result.compute_s:.1f} ms, "
                      f"comm {1e3 * result.comm_s:.1f} ms, total {1e3 * result.seconds:.1f} ms",
                      flush=True)
            checking = cfg.debug or (cfg.check_every and self.step % cfg.check_every == 0)
            if comm.size > 1 and checking:
                comm.check_consistent(self.model.param_buffer, "parameters")
            if self.step % cfg.log_every == 0 or self.step == self.total_steps or result.stop:
                mean_loss = self.log.interval(interval, self.step, self.total_steps, start_step,
                                              self.sampler.steps_per_epoch, lr, comm.size)
                self.divergence.observe(self.step, mean_loss, self.log)
                interval = Interval()
            testhooks.inject_fault(comm.rank, self.step)
            if result.stop:
                path = self.save_checkpoint()
                who = self.stop_signal or "a stop signal on another rank"
                signals.announce(comm.is_root, f"received {who}: "
                             f"checkpoint {path} written at step {self.step}; exiting with code "
                             f"{PREEMPTED_EXIT_CODE} (resume with --resume latest)")
                comm.barrier()
                return PREEMPTED_EXIT_CODE
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.evaluate_and_log(final=False)
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                    and self.step < self.total_steps):
                self.save_checkpoint()
        if comm.size > 1 and cfg.check_every:
            for arr, what in ((self.model.param_buffer, "parameters"),
                              (self.adam.m, "Adam first moments"),
                              (self.adam.v, "Adam second moments")):
                comm.check_consistent(arr, what)
        testhooks.dump_rank_state(comm.rank, {"params": self.model.param_buffer, "m": self.adam.m,
                                              "v": self.adam.v})
        path = self.save_checkpoint()
        self.log.say(f"training done: {self.step} steps in "
                     f"{fmt_time(time.perf_counter() - self.log.run_start)}; checkpoint {path}")
        if self.total_steps > 0 or cfg.eval_every:
            testhooks.at_final_evaluation(comm.rank)
            res = self.evaluate_and_log(final=True)
            if res.get("stopped"):
                who = self.stop_signal or "a stop signal"
                signals.announce(comm.is_root, f"received {who} during the final evaluation: "
                             f"stopped it; checkpoint {path} holds the trained model")
                comm.barrier()
                return PREEMPTED_EXIT_CODE
        self.progress.enter("plot")  # the others wait in the barrier meanwhile (diagnostics)
        self.log.plot()
        comm.barrier()
        return 0

    def banner(self):
        cfg, m = self.cfg, self.model
        blas = backend.blas_info()
        hosts = self.comm.describe_hosts(self.threads)  # a collective: every rank makes the banner
        return (f"dtrain: {self.comm.size} rank(s) x {self.threads} thread(s) on {hosts}, "
                f"device {self.device}, BLAS {blas.get('library')} ({blas.get('kernel')}); "
                f"{cfg.cell} W={cfg.wordvec_dim} H={cfg.hidden_dim} V={m.vocab_size} {cfg.dtype}, "
                f"{m.num_params:,} params\n"
                f"step: {self.step_fn.describe()}\n"
                f"data: {self.data.data_dir} ({self.train_split.num_captions:,} train captions, "
                f"{self.val_split.num_images:,} val images); global batch {cfg.batch_size} "
                f"({cfg.batch_size // self.comm.size} per rank), "
                f"{self.sampler.steps_per_epoch} steps/epoch, "
                f"training to step {self.total_steps}")

    # ------------------------------------------------------------------ debug

    def _debug_check(self, grads):
        """--debug: finite loss and gradients every step; finite differences on the first batch."""
        xp, step = self.xp, self.step + 1
        loss = float(grads.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"--debug: loss is {loss} at step {step} "
                                     f"(rank {self.comm.rank})")
        dense = grads.grad_buffer if grads.embed_dense else grads.grad_buffer[: grads.embed_offset]
        for what, arr in (("dense gradient", dense),
                          ("embedding gradient rows", grads.embed_rows)):
            if not bool(xp.isfinite(arr).all()):
                raise FloatingPointError(f"--debug: {what} not finite at step {step} "
                                         f"(rank {self.comm.rank})")
        if self._first:
            features, captions = self._batch
            err, n = finite_difference_check(self.model, backend.to_host(features), captions,
                                             self.cfg.batch_size,
                                             seed=self.cfg.seed + self.comm.rank)
            print(f"[rank {self.comm.rank}] --debug: finite-difference check of {n} gradient "
                  f"entries (float64): max relative error {err:.2e}", flush=True)
            if err > 1e-5:
                raise FloatingPointError(f"--debug: finite-difference gradient check failed: "
                                         f"relative error {err:.2e} > 1e-5")

    # ------------------------------------------------------------------ eval

    def evaluate_and_log(self, final):
        cfg = self.cfg
        with self._phase("evaluation", "compute"):
            res = evaluate(self.model, self.comm, self.val_split, self.data.idx_to_word,
                           cfg.eval_captions, cfg.eval_images, cfg.max_length,
                           should_stop=self._stop_requested)
        self.log.evaluation(res, self.step, final)
        return res

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self):
        """Rank 0 writes; everyone waits, so nobody exits before the file is complete."""
        path = checkpoint.checkpoint_path(self.ckpt_dir, self.step)
        with self._phase("checkpoint", "io"):
            if self.comm.is_root:
                self._run_state(self.step, self._resume_point()).write(path)
                checkpoint.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
            self.comm.barrier()
        return path

    def _resume_point(self):
        """What, besides parameters and Adam, a resume needs after the step just completed."""
        return self.sampler.state_dict(), self.accumulator.state_dict()

    def _run_state(self, step, resume_point):
        """The RunState after ``step`` (rank 0): this rank's parameters and Adam state."""
        sampler_state, accumulator_state = resume_point
        adam = self.adam.state_dict()
        return checkpoint.RunState(
            step=step, params={n: backend.to_host(v) for n, v in self.model.params.items()},
            adam_m=backend.to_host(adam["m"]), adam_v=backend.to_host(adam["v"]), adam_t=adam["t"],
            sampler=sampler_state,
            config=self.cfg.to_dict() | {"data_dir": str(self.data.data_dir)},
            idx_to_word=list(self.data.idx_to_word), seed=self.cfg.seed, world_size=self.comm.size,
            data_fingerprint=self.fingerprint, accumulator=accumulator_state)

    def _stall_checkpoint(self):
        """After a stall, on the rank the watchdog chose, from the watchdog thread: the last step
        this rank completed. Its main thread is blocked in (or parked at) a collective, so the
        parameters and Adam state are that step's: Adam runs only after the step's reduction."""
        done = self.progress.done
        if done is None:
            return None
        step, resume_point = done
        path = checkpoint.checkpoint_path(self.ckpt_dir, step)
        self._run_state(step, resume_point).write(path)
        checkpoint.prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        return path, step
