"""The stall inspector, stop signals during a stall, and orphan exit (docs/diagnostics.md).

A data-parallel job hangs when one rank stops taking part: the others wait in
a collective for ever, spinning, and a stop signal cannot be acted on because
the Python handler only runs between bytecodes of the blocked main thread.
This module makes such a job end, saying why:

* The main thread publishes where it is, for nothing but a few attribute
  writes: the loop keeps a :class:`Progress` record (step, phase, the last
  completed step), the communicator publishes the collective in flight
  (``Communicator.call``: sequence number, operation, bytes, entry time).
* :class:`Watchdog`, one daemon thread per rank, wakes every ``tick`` seconds
  and talks to the other ranks' watchdogs with small point-to-point messages
  on its own duplicate of the communicator (mpi4py initialises MPI with
  MPI_THREAD_MULTIPLE; the main thread may be blocked in a collective
  meanwhile). Heartbeats go to the two ring neighbours, so a rank that
  stops is still "last seen" by someone.
* When its main thread has waited ``stall_timeout`` seconds in one
  collective, or a stop signal came and the wait outlived ``SIGNAL_GRACE``
  with some rank not answering a ping, the watchdog runs the stall protocol:
  park the main thread at its next collective boundary, send a STATUS to
  every rank, collect the others' for a short window, and then the lowest
  rank waiting in a collective writes the checkpoint of the last completed
  step (from its own buffers: parameters are identical on every rank after
  a completed step, and the blocked main thread is not changing them), the
  merged trace when ``--trace`` is on, prints the report and MPI-aborts the
  job with ``STALL_EXIT_CODE``.
* :func:`arm_orphan_exit`: when the launcher (the rank's parent process, e.g.
  hydra_pmi_proxy) dies, the rank exits: a parent-death signal
  (prctl(PR_SET_PDEATHSIG) through ctypes, on Linux) plus a thread that
  compares ``os.getppid()`` with the parent it started with, every second.

It knows nothing of the model: the checkpoint to write after a stall is a
callback given by the trainer, the trace an object with ``span`` and
``export``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np

from .. import signals

__all__ = ["ORPHAN_EXIT_CODE", "STALL_EXIT_CODE", "Progress", "Watchdog", "arm_orphan_exit"]

STALL_EXIT_CODE = 124  # as timeout(1): a collective timed out
ORPHAN_EXIT_CODE = 129  # 128 + SIGHUP: the launcher hung up
SIGNAL_GRACE = 10.0  # s: after a stop signal, a collective waiting this long is checked for silent ranks
WRITER_GRACE = 30.0  # s: how long the other ranks give the writer to end the job
STOP_SIGNALS = signals.STOP_SIGNALS  # SIGTERM, SIGINT, SIGUSR1, SIGHUP
ORPHAN_GRACE = 20.0  # s: an orphaned training rank checkpoints and exits within this, or is ended
ORPHAN_SIGNAL = signal.SIGUSR2  # the parent-death signal
_PR_SET_PDEATHSIG = 1

_TAG_HEARTBEAT, _TAG_PING, _TAG_PONG, _TAG_STATUS, _TAG_TRACE = 7101, 7102, 7103, 7104, 7105

PHASES = {
    "setup": "setting up (data, model, first broadcast)",
    "batch": "assembling its batch",
    "step": "in the training step (forward, backward, gradient reduce, Adam)",
    "after step": "after the step (log, consistency check)",
    "evaluation": "evaluating",
    "checkpoint": "writing or waiting for a checkpoint",
    "plot": "drawing the loss plot",
    "done": "finishing",
}
# Phases that may legitimately keep a rank away from the collectives for long (data loading,
# evaluation, plotting, checkpoint I/O, the end of the run); a rank's first training step
# (compiling kernels, possibly with a cold cache) counts too. The others are waited for in
# them, up to LONG_PHASE_LIMIT, however short --stall-timeout is.
LONG_PHASES = ("setup", "batch", "evaluation", "checkpoint", "plot", "done")
LONG_PHASE_LIMIT = 600.0  # s, or 10 x --stall-timeout when that is longer
SHORT_PHASE_LIMIT = 30.0  # s, or --stall-timeout when longer: a training step slower than a tiny
# --stall-timeout is slow, not stalled


class Progress:
    """Where the main thread is. Written by the training loop, read by the watchdog thread.

    ``done`` is ``(step, sampler_state)`` of the last step this rank completed
    (None before the first): what a checkpoint written after a stall saves.
    """

    __slots__ = ("step", "phase", "since", "done")

    def __init__(self):
        self.step, self.phase, self.since, self.done = 0, "setup", time.perf_counter(), None

    def enter(self, phase: str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.phase, self.since = phase, time.perf_counter()

    def completed(self, step: int, sampler_state: dict) -> None:
        self.done = (step, sampler_state)
        self.step, self.phase, self.since = step, "after step", time.perf_counter()


def _err(text: str) -> None:
    """One or more lines to stderr, never raising (the launcher's pipe may be gone)."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def _fmt_bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _ranks(rs) -> str:
    rs = list(rs)
    return ", ".join(map(str, rs)) if rs else "none"


# ---------------------------------------------------------------------- orphans
_ORPHAN = {"armed": False, "ppid": None, "who": "", "gone": False}
_LAUNCHER_ENV = ("PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


def _orphan_exit() -> None:
    """The launcher is gone (a closed terminal's SIGHUP to its process group, a pipe's SIGPIPE,
    a kill). A training rank stops as for SIGHUP: the ranks agree at the next step, checkpoint
    and exit, within ``ORPHAN_GRACE`` s or are ended then; any other process exits now."""
    if _ORPHAN["gone"]:
        return
    _ORPHAN["gone"] = True
    head = f"dtrain: {_ORPHAN['who']}: the launcher (parent process {_ORPHAN['ppid']}) is gone"
    if not signals.installed():
        _err(f"{head}; exiting (status {ORPHAN_EXIT_CODE})")
        os._exit(ORPHAN_EXIT_CODE)
    _err(f"{head}; stopping after this step with a checkpoint, as for SIGHUP")
    timer = threading.Timer(ORPHAN_GRACE, _orphan_deadline)
    timer.daemon = True
    timer.start()
    signals.request_stop("SIGHUP", signal.SIGHUP, why="orphan")


def _orphan_deadline() -> None:
    _err(f"dtrain: {_ORPHAN['who']}: no checkpoint within {ORPHAN_GRACE:.0f} s of the "
         f"launcher's end; exiting (status {ORPHAN_EXIT_CODE})")
    os._exit(ORPHAN_EXIT_CODE)


def _check_parent(*_args) -> None:
    if os.getppid() != _ORPHAN["ppid"]:
        _orphan_exit()


def _watch_parent() -> None:
    while not _ORPHAN["gone"]:
        time.sleep(1.0)
        _check_parent()


def _set_parent_death_signal(sig) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def arm_orphan_exit(rank: int, size: int) -> bool:
    """Make this rank exit when its launcher dies (once per process; a no-op for a lone process).

    The parent is the launcher's per-node proxy (hydra_pmi_proxy, prted,
    slurmstepd). Its death sends ``ORPHAN_SIGNAL`` (prctl PR_SET_PDEATHSIG);
    the handler, and a thread polling ``os.getppid()`` every second (for a
    main thread blocked in MPI, and where prctl is missing), exit with
    ``ORPHAN_EXIT_CODE`` once the parent is no longer the one we started with.
    A spurious signal (a parent thread ending, a user's kill) changes nothing.
    """
    if _ORPHAN["armed"] or not (size > 1 or any(k in os.environ for k in _LAUNCHER_ENV)):
        return False
    _ORPHAN.update(armed=True, ppid=os.getppid(), who=f"rank {rank}/{size} (pid {os.getpid()})")
    if threading.current_thread() is threading.main_thread():
        signal.signal(ORPHAN_SIGNAL, _check_parent)
        _set_parent_death_signal(ORPHAN_SIGNAL)
    threading.Thread(target=_watch_parent, name="dtrain-orphan-exit", daemon=True).start()
    _check_parent()  # the parent may have died before the signal was armed
    return True


def _park() -> None:
    """The main thread waits here, touching nothing, while the watchdog ends the job."""
    while True:
        time.sleep(60)


# ---------------------------------------------------------------------- watchdog
class Watchdog:
    """The stall inspector of one rank (see the module docstring). Collective to create.

    ``checkpoint()`` is called from the watchdog thread on the one rank that
    writes after a stall; it returns ``(path, step)`` or None (nothing
    completed yet). ``tracer`` (optional) gets a "stall wait" span, and its
    ``export()`` travels to the writer, which writes the merged trace.
    """

    def __init__(self, comm, progress: Progress, stall_timeout: float, checkpoint=None, tracer=None):
        self.comm, self.progress, self.MPI = comm, progress, comm.MPI
        self.rank, self.size = comm.rank, comm.size
        self.timeout = float(stall_timeout)
        on = self.timeout > 0
        self.tick = min(1.0, max(0.05, self.timeout / 20)) if on else 1.0
        self.window = min(5.0, max(1.0, self.timeout / 2)) if on else 5.0  # for answers from the others
        self.grace = min(SIGNAL_GRACE, self.timeout) if on else SIGNAL_GRACE
        self.checkpoint, self.tracer = checkpoint, tracer
        self.wcomm = comm.comm.Dup()
        self.peers = self._identities()
        self.others = [r for r in range(self.size) if r != self.rank]
        self.neighbours = sorted({(self.rank - 1) % self.size, (self.rank + 1) % self.size} - {self.rank})
        self.heard = {}  # rank -> (record, perf_counter when received): heartbeats
        self.statuses = {}  # rank -> (message, perf_counter when received): the stall protocol
        self.pongs, self.traces = {}, {}
        self.signal_at = self.signal_name = None
        self.stalling = False
        self._silent = []  # ranks that did not answer the last ping
        self._last_ping = self._last_beat = -1e9
        self._recheck_at = -1e9  # a long wait found legitimate is looked at again from then
        self._beat_key = None
        self._sends = []  # (request, buffer) until complete
        self._closing = threading.Event()
        self._thread = None
        self._wakeup = None

    @staticmethod
    def supported(comm) -> bool:
        """The watchdog makes MPI calls beside the main thread's: MPI_THREAD_MULTIPLE is required."""
        if comm.MPI.Query_thread() >= comm.MPI.THREAD_MULTIPLE:
            return True
        if comm.rank == 0:
            _err("dtrain: warning: MPI was initialised without MPI_THREAD_MULTIPLE (mpi4py.rc.thread_level); "
                 "the stall inspector is off")
        return False

    def _identities(self):
        """(host, pid) of every rank."""
        rec = np.zeros(16, dtype=np.int64)
        rec[0] = os.getpid()
        host = socket.gethostname().encode()[:120]
        rec.view(np.uint8)[8 : 8 + len(host)] = np.frombuffer(host, dtype=np.uint8)
        table = np.empty((self.size, 16), dtype=np.int64)
        self.wcomm.Allgather(rec, table)
        return [(row.view(np.uint8)[8:].tobytes().rstrip(b"\0").decode(errors="replace"), int(row[0]))
                for row in table]

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the thread (from the main thread: it also takes the signal wake-up fd)."""
        try:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            try:
                old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
                self._wakeup = (r, w, old)
            except ValueError:  # not the main thread: no early look at signals
                os.close(r)
                os.close(w)
        except OSError:
            pass
        self._thread = threading.Thread(target=self._run, name="dtrain-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and free its communicator (at the end of a run, on every rank)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._wakeup is not None:
            r, w, old = self._wakeup
            try:
                signal.set_wakeup_fd(old)
            except ValueError:
                pass
            os.close(r)
            os.close(w)
            self._wakeup = None
        deadline = time.perf_counter() + 2.0
        while self._sends and time.perf_counter() < deadline:
            self._sends = [(q, b) for q, b in self._sends if not q.Test()]
            time.sleep(0.001)
        try:
            self._poll()  # drop what is left
            self.wcomm.Free()
        except Exception:
            pass

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while not self._closing.wait(self.tick):
                self._tick()
        except Exception as exc:
            if self.stalling:
                _err(f"dtrain: rank {self.rank}/{self.size}: the watchdog failed while ending a stalled "
                     f"job: {type(exc).__name__}: {exc}")
                self._abort(STALL_EXIT_CODE)
            _err(f"dtrain: rank {self.rank}/{self.size}: warning: the stall watchdog stopped: "
                 f"{type(exc).__name__}: {exc}")

    def _tick(self) -> None:
        now = time.perf_counter()
        self._read_signals(now)
        self._poll()
        if self.statuses:  # another rank started the stall protocol
            self._stall(None)
        self._heartbeat(now)
        call = self.comm.call
        if call is None:
            return
        waited = now - call[5]
        if self.timeout > 0 and waited >= self.timeout and now >= self._recheck_at:
            if self._somebody_stuck():
                self._stall({"why": "timeout", "rank": self.rank, "timeout": self.timeout,
                             "waited": time.perf_counter() - call[5]})
            self._recheck_at = time.perf_counter() + self.timeout  # all busy: look again later
        if (self.signal_at is not None and now - max(call[5], self.signal_at) >= self.grace
                and now - self._last_ping >= self.grace):
            silent = self._ping()
            if silent:
                self._stall({"why": "signal", "rank": self.rank, "signal": self.signal_name,
                             "waited": time.perf_counter() - call[5], "silent": silent})

    def _read_signals(self, now) -> None:
        if self._wakeup is None:
            return
        try:
            data = os.read(self._wakeup[0], 512)
        except (BlockingIOError, InterruptedError):
            return
        for num in data:
            if num == ORPHAN_SIGNAL:
                _check_parent()
            elif num in STOP_SIGNALS and self.signal_at is None:
                self.signal_at, self.signal_name = now, signal.Signals(num).name

    # ---------------------------------------------------------------- messages
    def _record(self, now) -> dict:
        p, call = self.progress, self.comm.call
        rec = {"step": p.step, "phase": p.phase, "in_phase": now - p.since, "seq": self.comm.seq,
               "last_op": self.comm.last_op, "done": p.done[0] if p.done else None}
        if call is not None:
            rec.update(op=call[1], op_seq=call[0], nbytes=call[4], waited=now - call[5])
        return rec

    def _send(self, dest: int, tag: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        buf = np.frombuffer(data, dtype=np.uint8)
        self._sends.append((self.wcomm.Isend([buf, self.MPI.BYTE], dest=dest, tag=tag), buf))

    def _poll(self) -> None:
        """Receive everything pending; answer pings."""
        self._sends = [(q, b) for q, b in self._sends if not q.Test()]
        MPI, status = self.MPI, self.MPI.Status()
        while self.wcomm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
            src, tag = status.Get_source(), status.Get_tag()
            buf = bytearray(status.Get_count(MPI.BYTE))
            self.wcomm.Recv([buf, MPI.BYTE], source=src, tag=tag)
            now = time.perf_counter()
            if tag == _TAG_TRACE:
                self.traces[src] = bytes(buf)
                continue
            msg = json.loads(buf)
            if tag == _TAG_HEARTBEAT:
                self.heard[src] = (msg, now)
            elif tag == _TAG_PING:
                self._send(src, _TAG_PONG, self._record(now))
            elif tag == _TAG_PONG:
                self.pongs[src] = msg
            elif tag == _TAG_STATUS:
                self.statuses[src] = (msg, now)

    def _heartbeat(self, now) -> None:
        """Where this rank is, to its ring neighbours: on a change (at most 2/s), else every 5 s."""
        p = self.progress
        key = (p.step, p.phase, self.comm.seq)
        since = now - self._last_beat
        if (key != self._beat_key and since >= 0.5) or since >= 5.0:
            rec = self._record(now)
            for d in self.neighbours:
                self._send(d, _TAG_HEARTBEAT, rec)
            self._beat_key, self._last_beat = key, now

    def _ping(self):
        """The ranks that do not answer within the window (None if a stall protocol began meanwhile)."""
        self._last_ping, self.pongs = time.perf_counter(), {}
        for d in self.others:
            self._send(d, _TAG_PING, {})
        deadline = self._last_ping + self.window
        while time.perf_counter() < deadline and len(self.pongs) < len(self.others):
            time.sleep(0.02)
            self._poll()
            if self.statuses:
                return None
        self._silent = sorted(set(self.others) - set(self.pongs))
        return self._silent

    def _legitimately_away(self, rec) -> bool:
        """A rank outside the collectives that answers, and has not spent longer in its phase
        than that phase may take (a long one, or a training step)."""
        first_step = rec["phase"] == "step" and rec.get("done") is None  # compiling
        if rec["phase"] in LONG_PHASES or first_step:
            return rec["in_phase"] < max(LONG_PHASE_LIMIT, 10 * self.timeout)
        return rec["in_phase"] < max(SHORT_PHASE_LIMIT, self.timeout)

    def _somebody_stuck(self) -> bool:
        """After this rank waited --stall-timeout: is the job stalled, or only busy?

        Every other rank is asked where it is. Stalled: a rank does not answer (twice), a rank
        outside the collectives has spent longer in its phase than the phase may take, or every
        rank has waited --stall-timeout in a collective (calls that do not match). Busy: the
        ranks away are loading data, compiling, evaluating, plotting, writing a checkpoint
        (up to max(600 s, 10 x timeout)) or in a training step (up to max(30 s, timeout)); the
        wait is looked at again a timeout later.
        """
        silent = self._ping()
        if silent:
            silent = self._ping()  # an overloaded node can answer late once
        if silent is None:  # another rank began the stall protocol: join it
            return True
        if silent:
            return True
        away = [rec for rec in self.pongs.values() if rec.get("op") is None]
        if not away:
            return min(rec["waited"] for rec in self.pongs.values()) >= self.timeout
        return not all(self._legitimately_away(rec) for rec in away)

    # ---------------------------------------------------------------- the stall protocol
    def _stall(self, why) -> None:
        """Agree on who is missing, checkpoint on the lowest waiting rank, end the job. Never returns."""
        self.stalling = True
        self.comm.hold = _park  # the main thread stops at its next collective boundary
        now = time.perf_counter()
        mine = self._record(now)
        if why is None:  # joining a protocol another rank began
            why = min(self.statuses.items())[1][0]["why"]
        heard = {str(r): [rec, now - t] for r, (rec, t) in self.heard.items()}
        for d in self.others:
            self._send(d, _TAG_STATUS, {"rec": mine, "heard": heard, "why": why})
        expect = set(self.others) - set(self._silent) - set(why.get("silent", []))  # pinged already
        deadline = now + self.window
        while time.perf_counter() < deadline and not expect <= self.statuses.keys():
            time.sleep(0.02)
            self._poll()
        got = dict(self.statuses)
        records = {self.rank: mine} | {r: m["rec"] for r, (m, _) in got.items()}
        waiting = sorted(r for r, rec in records.items() if rec.get("op") is not None)
        writer = waiting[0] if waiting else None
        if self.tracer is not None:
            self._stall_trace(writer, sorted(records))
        if writer != self.rank:
            time.sleep(WRITER_GRACE)  # the writer's MPI_Abort ends this process meanwhile
            _err(f"dtrain: rank {self.rank}/{self.size}: stall: rank {writer} did not end the job "
                 f"within {WRITER_GRACE:.0f} s; aborting")
            self._abort(STALL_EXIT_CODE)
        lines = self._report(why, records, got, waiting, now)
        try:
            saved = self.checkpoint() if self.checkpoint is not None else None
            if saved is None:
                lines.append("dtrain: stall: no checkpoint written: no training step had completed")
            else:
                path, step = saved
                lines.append(f"dtrain: stall: checkpoint {path} written by rank {self.rank}: step {step}, "
                             "the last step every rank completed; continue with --resume latest")
        except Exception as exc:
            lines.append(f"dtrain: stall: the checkpoint could not be written: {type(exc).__name__}: {exc}")
        if self.tracer is not None:
            lines.append(self._write_trace(why, records))
        lines.append(f"dtrain: stall: ending the job (exit status {STALL_EXIT_CODE})")
        _err("\n".join(lines))
        self._abort(STALL_EXIT_CODE)

    def _stall_trace(self, writer, responders) -> None:
        """The "stall wait" span here; every responder's track to the writer."""
        call = self.comm.call
        if call is not None:
            self.tracer.span("stall wait", "waiting", call[5], time.perf_counter(),
                             {"op": call[1], "seq": call[0]})
        if writer is None:
            return
        if writer != self.rank:
            self._send(writer, _TAG_TRACE, json.dumps(self.tracer.export()).encode())
            deadline = time.perf_counter() + self.window  # let it leave before the abort comes
            while self._sends and time.perf_counter() < deadline:
                time.sleep(0.02)
                self._poll()
            return
        want = set(responders) - {self.rank}
        deadline = time.perf_counter() + self.window
        while time.perf_counter() < deadline and not want <= self.traces.keys():
            time.sleep(0.02)
            self._poll()

    def _write_trace(self, why, records) -> str:
        try:
            tracks = [self.tracer.export()]
            for _r, data in sorted(self.traces.items()):
                tracks.append(json.loads(data))
            missing = [r for r in range(self.size) if r not in {t["rank"] for t in tracks}]
            note = (f"stall ({why['why']}): job ended; tracks of rank(s) {_ranks(missing)} missing"
                    if missing else f"stall ({why['why']}): job ended")
            path = self.tracer.write(tracks, note=note, timeline=False)
            return f"dtrain: stall: trace of ranks {_ranks(t['rank'] for t in tracks)} written to {path}"
        except Exception as exc:
            return f"dtrain: stall: the trace could not be written: {type(exc).__name__}: {exc}"

    def _report(self, why, records, got, waiting, t_ref) -> list[str]:
        """Which ranks are missing, and where every rank was last seen.

        The ranks waiting in a collective are the victims; the missing ones are
        all the others: silent, or alive but not in a collective. (A rank can stop
        inside a collective that some ranks complete and others do not, so the
        waiting ranks need not all be in the same one.) Times are as of ``t_ref``,
        when this rank sent its STATUS, like the waiting ranks' times.
        """
        missing = [r for r in range(self.size) if r not in waiting]
        waited = max((records[r]["waited"] for r in waiting), default=0.0)
        seqs = sorted({records[r]["op_seq"] for r in waiting})
        where = "; ".join(
            f"#{q} {records[rs[0]]['op']} in step {records[rs[0]]['step']} on rank(s) {_ranks(rs)}"
            for q in seqs for rs in [[r for r in waiting if records[r]["op_seq"] == q]])
        if why.get("why") == "signal":
            head = (f"dtrain: stall: {why.get('signal')} received while rank(s) {_ranks(waiting)} waited up to "
                    f"{waited:.1f} s in collectives ({where}); rank(s) {_ranks(why.get('silent', []))} do not "
                    f"respond. Missing: rank(s) {_ranks(missing)}")
        elif missing:
            head = (f"dtrain: stall: rank(s) {_ranks(missing)} stopped taking part in collectives: rank(s) "
                    f"{_ranks(waiting)} waited up to {waited:.1f} s for them ({where}; --stall-timeout "
                    f"{self.timeout:g})")
        else:
            head = (f"dtrain: stall: every rank has waited up to {waited:.1f} s in a collective, but not in the "
                    f"same one ({where}): the ranks' collective calls do not match (--debug checks every "
                    "call and names the first mismatch)")
        lines = [head, "dtrain: stall: where every rank was last seen:"]
        # how far the silent ranks got: they entered every collective a waiting rank completed
        done_seq = max(waiting, key=lambda r: records[r]["op_seq"], default=None)
        # heartbeats, as heard by any responder: rank -> (record, seconds ago)
        last = {r: (rec, t_ref - t) for r, (rec, t) in self.heard.items()}
        for msg, t in got.values():
            for r, (rec, age) in msg.get("heard", {}).items():
                ago = max(age + (t_ref - t), 0.0)
                if int(r) not in last or ago < last[int(r)][1]:
                    last[int(r)] = (rec, ago)
        for r in range(self.size):
            host, pid = self.peers[r]
            who = f"  rank {r} ({host}, pid {pid}): "
            if r in records:
                lines.append(who + self._where(records[r]) + ("" if r in waiting else "  <- missing"))
                continue
            got_to = ""
            if done_seq is not None and records[done_seq]["op_seq"] > 1:
                rec = records[done_seq]
                got_to = (f"entered collective #{rec['op_seq'] - 1} ({rec['last_op']}), which rank {done_seq} "
                          "completed; ")
            heard_at = (f"last heard {last[r][1]:.1f} s ago: {self._where(last[r][0])}" if r in last
                        else "never heard from")
            lines.append(who + f"NOT RESPONDING; {got_to}{heard_at}  <- missing")
        return lines

    @staticmethod
    def _where(rec) -> str:
        text = f"step {rec['step']}, "
        if rec.get("op") is not None:
            return text + (f"waiting in collective #{rec['op_seq']} {rec['op']} ({_fmt_bytes(rec.get('nbytes'))}) "
                           f"for {rec['waited']:.1f} s")
        phase = PHASES.get(rec["phase"], rec["phase"])
        if rec["phase"] == "step" and rec.get("done") is None:
            phase = "in its first training step (compiling kernels)"
        text += f"{phase} for {rec['in_phase']:.1f} s"
        if rec.get("last_op"):
            text += f", after collective #{rec['seq']} {rec['last_op']}"
        return text

    def _abort(self, code: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        time.sleep(0.5)  # let the launcher relay the report before the abort tears things down
        timer = threading.Timer(10.0, os._exit, (code,))  # a bound on an abort that hangs
        timer.daemon = True
        timer.start()
        try:
            self.MPI.COMM_WORLD.Abort(code)
        finally:
            os._exit(code)
