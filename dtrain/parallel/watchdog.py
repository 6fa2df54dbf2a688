"""The stall inspector: its thread, its messages, the stall protocol (docs/diagnostics.md).

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
* When the job stalls is decided in stall_rules.py (pure rules on the records
  the ranks exchange), the report's text is written by stall_report.py, and
  a rank whose launcher died is ended by orphan.py (``arm_orphan_exit``).

It knows nothing of the model: the checkpoint to write after a stall is a
callback given by the trainer, the trace an object with ``span`` and
``export``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np

from .. import signals
from ..errors import write_stderr
from .orphan import ORPHAN_EXIT_CODE, ORPHAN_SIGNAL, arm_orphan_exit, check_parent
from .stall_report import ranks, stall_report
from .stall_rules import Progress, stalled

__all__ = ["ORPHAN_EXIT_CODE", "STALL_EXIT_CODE", "Progress", "Watchdog", "arm_orphan_exit"]

STALL_EXIT_CODE = 124  # as timeout(1): a collective timed out
# s: after a stop signal, a collective waiting this long is checked for silent ranks
SIGNAL_GRACE = 10.0
WRITER_GRACE = 30.0  # s: how long the other ranks give the writer to end the job
STOP_SIGNALS = signals.STOP_SIGNALS  # SIGTERM, SIGINT, SIGUSR1, SIGHUP

_TAG_HEARTBEAT, _TAG_PING, _TAG_PONG, _TAG_STATUS, _TAG_TRACE = 7101, 7102, 7103, 7104, 7105


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

    def __init__(self, comm, progress: Progress, stall_timeout: float, checkpoint=None,
                 tracer=None):
        self.comm, self.progress, self.MPI = comm, progress, comm.MPI
        self.rank, self.size = comm.rank, comm.size
        self.timeout = float(stall_timeout)
        on = self.timeout > 0
        self.tick = min(1.0, max(0.05, self.timeout / 20)) if on else 1.0
        # how long to wait for answers from the others
        self.window = min(5.0, max(1.0, self.timeout / 2)) if on else 5.0
        self.grace = min(SIGNAL_GRACE, self.timeout) if on else SIGNAL_GRACE
        self.checkpoint, self.tracer = checkpoint, tracer
        self.wcomm = comm.comm.Dup()
        self.peers = self._identities()
        self.others = [r for r in range(self.size) if r != self.rank]
        self.neighbours = sorted({(self.rank - 1) % self.size, (self.rank + 1) % self.size}
                                 - {self.rank})
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
        """The watchdog makes MPI calls beside the main thread's: MPI_THREAD_MULTIPLE is
        required."""
        if comm.MPI.Query_thread() >= comm.MPI.THREAD_MULTIPLE:
            return True
        if comm.rank == 0:
            write_stderr("dtrain: warning: MPI was initialised without MPI_THREAD_MULTIPLE "
                         "(mpi4py.rc.thread_level); the stall inspector is off")
        return False

    def _identities(self):
        """(host, pid) of every rank."""
        rec = np.zeros(16, dtype=np.int64)
        rec[0] = os.getpid()
        host = socket.gethostname().encode()[:120]
        rec.view(np.uint8)[8 : 8 + len(host)] = np.frombuffer(host, dtype=np.uint8)
        table = np.empty((self.size, 16), dtype=np.int64)
        self.wcomm.Allgather(rec, table)
        return [(row.view(np.uint8)[8:].tobytes().rstrip(b"\0").decode(errors="replace"),
                 int(row[0]))
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
                write_stderr(f"dtrain: rank {self.rank}/{self.size}: the watchdog failed while "
                             f"ending a stalled job: {type(exc).__name__}: {exc}")
                self._abort(STALL_EXIT_CODE)
            write_stderr(f"dtrain: rank {self.rank}/{self.size}: warning: the stall watchdog "
                         f"stopped: {type(exc).__name__}: {exc}")

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
                check_parent()
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
        """The ranks that do not answer within the window (None if a stall protocol began
        meanwhile)."""
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

    def _somebody_stuck(self) -> bool:
        """After this rank waited --stall-timeout: is the job stalled, or only busy? Every other
        rank is asked where it is (twice if one is silent: an overloaded node can answer late
        once); stall_rules.stalled decides. Busy: the wait is looked at again a timeout later."""
        silent = self._ping()
        if silent:
            silent = self._ping()
        return stalled(self.pongs, silent, self.timeout)

    # ---------------------------------------------------------------- the stall protocol
    def _stall(self, why) -> None:
        """Agree on who is missing, checkpoint on the lowest waiting rank, end the job. Never
        returns."""
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
            write_stderr(f"dtrain: rank {self.rank}/{self.size}: stall: rank {writer} did not end "
                         f"the job within {WRITER_GRACE:.0f} s; aborting")
            self._abort(STALL_EXIT_CODE)
        lines = stall_report(why, records, got, waiting, now, heard=self.heard, peers=self.peers,
                             timeout=self.timeout)
        try:
            saved = self.checkpoint() if self.checkpoint is not None else None
            if saved is None:
                lines.append("dtrain: stall: no checkpoint written: no training step had completed")
            else:
                path, step = saved
                lines.append(f"dtrain: stall: checkpoint {path} written by rank {self.rank}: "
                             f"step {step}, the last step every rank completed; continue with "
                             "--resume latest")
        except Exception as exc:
            lines.append("dtrain: stall: the checkpoint could not be written: "
                         f"{type(exc).__name__}: {exc}")
        if self.tracer is not None:
            lines.append(self._write_trace(why, records))
        lines.append(f"dtrain: stall: ending the job (exit status {STALL_EXIT_CODE})")
        write_stderr("\n".join(lines))
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
            note = (f"stall ({why['why']}): job ended; tracks of rank(s) {ranks(missing)} missing"
                    if missing else f"stall ({why['why']}): job ended")
            path = self.tracer.write(tracks, note=note, timeline=False)
            return (f"dtrain: stall: trace of ranks {ranks(t['rank'] for t in tracks)} "
                    f"written to {path}")
        except Exception as exc:
            return f"dtrain: stall: the trace could not be written: {type(exc).__name__}: {exc}"

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
