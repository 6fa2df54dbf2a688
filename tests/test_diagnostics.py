"""Diagnostics end to end, with real mpiexec jobs: the stall inspector, orphan exit, a stop
signal during a stall, --trace, and --debug's collective check (docs/diagnostics.md).

Every job runs in its own session; the ranks (which hydra puts in sessions of their own) are
found through /proc by their PMI_RANK and, at the end of each test, continued and killed
by pid, whatever happened.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtrain.checkpoint import latest_checkpoint, load_checkpoint
from dtrain.loop import diagnostics_settings
from dtrain.parallel.watchdog import STALL_EXIT_CODE
from dtrain.trace import merge, summarize
from dtrain_run import dtrain_cmd, run_dtrain

WORKERS = Path(__file__).parent / "mpi_workers"
SMALL = ["--batch-size", "8", "--hidden-dim", "12", "--wordvec-dim", "8", "--dtype", "float64",
         "--log-every", "1", "--eval-images", "8", "--eval-captions", "16", "--max-length", "6"]
STEP_LINE = re.compile(r"^step\s+(\d+)/")


def _children():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def alive(pid):
    """Running (a zombie left to an init that does not reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Job:
    """An mpiexec job in its own session, its output collected by a thread."""

    def __init__(self, ranks, *args, env=None):
        full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full.setdefault("DTRAIN_CACHE", str(Path(__file__).parent / ".cache"))
        self.proc = subprocess.Popen(dtrain_cmd(ranks, *map(str, args)), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=full,
                                     start_new_session=True)
        self.lines, self.pids, self.proxies = [], {}, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def steps_done(self):
        return max((int(m.group(1)) for m in map(STEP_LINE.match, self.lines) if m), default=0)

    def wait_for_step(self, step, timeout=90):
        deadline = time.monotonic() + timeout
        while self.steps_done() < step:
            assert self.proc.poll() is None, (
                f"job ended early ({self.proc.returncode}):\n{self.output[-3000:]}")
            assert time.monotonic() < deadline, (
                f"no step {step} within {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def find_ranks(self, n):
        """{rank: pid} of the ranks (children of the launcher's proxy), and the proxies."""
        deadline = time.monotonic() + 30
        while len(self.pids) < n and time.monotonic() < deadline:
            kids = _children()
            self.proxies = kids.get(self.proc.pid, [])
            for proxy in self.proxies:
                for pid in kids.get(proxy, []):
                    try:
                        with open(f"/proc/{pid}/environ", "rb") as f:
                            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
                    except OSError:
                        continue
                    if b"PMI_RANK" in env:
                        self.pids[int(env[b"PMI_RANK"])] = pid
            time.sleep(0.05)
        assert len(self.pids) == n, (self.pids, self.output[-2000:])
        return self.pids

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self):
        for pid in list(self.pids.values()) + self.proxies + [self.proc.pid]:
            if alive(pid):
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def jobs():
    started = []
    yield lambda *a, **k: started.append(Job(*a, **k)) or started[-1]
    for job in started:
        job.cleanup()


def train_args(data_dir, out, *extra):
    return ["train", "--data", data_dir, "--checkpoint-dir", out, *SMALL, *extra]


# ------------------------------------------------------------------ the stall inspector
@pytest.mark.timeout(240)
def test_stopped_rank_is_named_job_ends_and_resumes(tiny_data, tmp_path, jobs):
    """SIGSTOP rank 2 of 4 with --stall-timeout 10: every process ends within 40 s, the report
    names rank 2, the last completed step is checkpointed, the trace has what the healthy ranks
    had, and --resume latest on 2 ranks continues."""
    trace = tmp_path / "trace.json"
    job = jobs(4, *train_args(tiny_data, tmp_path / "ck", "--steps", 100000),
               env={"DTRAIN_STALL_TIMEOUT": "10", "DTRAIN_TRACE": str(trace)})
    pids = job.find_ranks(4)
    job.wait_for_step(3)
    os.kill(pids[2], signal.SIGSTOP)
    t0 = time.monotonic()
    last_printed = job.steps_done()
    code = job.wait(timeout=60)
    elapsed = time.monotonic() - t0
    while any(alive(p) for p in pids.values()) and time.monotonic() - t0 < 45:
        time.sleep(0.1)
    gone = time.monotonic() - t0
    out = job.output
    assert code == STALL_EXIT_CODE, (code, out[-3000:])
    assert elapsed < 40 and gone < 40, (elapsed, gone)
    assert "rank(s) 2 stopped taking part in collectives: rank(s) 0, 1, 3 waited" in out, (
        out[-3000:])
    assert re.search(rf"rank 2 \(.*pid {pids[2]}\): NOT RESPONDING", out), out[-3000:]
    for r in (0, 1, 3):
        assert re.search(rf"rank {r} \(.*pid {pids[r]}\): step \d+, waiting in collective", out)
    m = re.search(r"checkpoint (\S+) written by rank 0: step (\d+)", out)
    assert m, out[-3000:]
    step = int(m.group(2))
    assert step >= last_printed
    assert int(load_checkpoint(latest_checkpoint(tmp_path / "ck"))["step"]) == step
    # the trace: what the healthy ranks had, with their stall waits
    doc = json.loads(trace.read_text())
    ranks = {e["pid"] for e in doc["traceEvents"] if e.get("ph") == "X"}
    assert ranks == {0, 1, 3}
    assert {e["pid"] for e in doc["traceEvents"] if e.get("name") == "stall wait"} == {0, 1, 3}
    # resume on 2 ranks: two more steps from the stall checkpoint
    run_dtrain(2, *train_args(tiny_data, tmp_path / "ck", "--steps", step + 2,
                              "--resume", "latest", "--quiet"),
               timeout=120)
    assert int(load_checkpoint(latest_checkpoint(tmp_path / "ck"))["step"]) == step + 2


@pytest.mark.timeout(180)
def test_sigterm_while_a_rank_is_stopped_ends_job(tiny_data, tmp_path, jobs):
    """SIGTERM to mpiexec while rank 1 of 3 is stopped (stall timeout far away): the job ends
    within 30 s, and the healthy ranks checkpoint the last completed step."""
    job = jobs(3, *train_args(tiny_data, tmp_path, "--steps", 100000, "--batch-size", 12),
               env={"DTRAIN_STALL_TIMEOUT": "600"})
    pids = job.find_ranks(3)
    job.wait_for_step(3)
    os.kill(pids[1], signal.SIGSTOP)
    time.sleep(1.0)  # the others block in the step's reduction
    last_printed = job.steps_done()
    job.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    code = job.wait(timeout=45)
    while any(alive(p) for p in pids.values()) and time.monotonic() - t0 < 45:
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    out = job.output
    assert code is not None and code != 0, out[-3000:]
    assert elapsed < 30, (elapsed, out[-3000:])
    assert "SIGTERM received" in out and "rank(s) 1 do not respond" in out, out[-3000:]
    m = re.search(r"checkpoint \S+ written by rank 0: step (\d+)", out)
    assert m and int(m.group(1)) >= last_printed, out[-3000:]
    assert int(load_checkpoint(latest_checkpoint(tmp_path))["step"]) == int(m.group(1))


# ------------------------------------------------------------------ orphans
@pytest.mark.timeout(120)
def test_ranks_exit_when_the_launcher_proxy_dies(tiny_data, tmp_path, jobs):
    job = jobs(2, *train_args(tiny_data, tmp_path, "--steps", 100000))
    pids = job.find_ranks(2)
    job.wait_for_step(2)
    assert job.proxies
    for proxy in job.proxies:
        os.kill(proxy, signal.SIGKILL)
    t0 = time.monotonic()
    while any(alive(p) for p in pids.values()) and time.monotonic() - t0 < 40:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids.values()), "orphaned ranks still running"
    assert time.monotonic() - t0 < 30
    # as for SIGHUP: the ranks agreed on a last step and checkpointed it (the run is not lost)
    last = latest_checkpoint(tmp_path)
    assert last is not None and int(load_checkpoint(last)["step"]) >= 2, job.output[-2000:]


def test_report_labels_each_ranks_true_phase():
    from dtrain.parallel.stall_report import where

    rec = {"step": 4, "phase": "plot", "in_phase": 3.0, "seq": 40, "last_op": "barrier", "done": 4}
    assert "drawing the loss plot for 3.0 s" in where(rec)
    rec |= {"phase": "step", "done": None, "step": 1}
    assert "first training step (compiling kernels)" in where(rec)
    rec |= {"done": 7}
    assert "in the training step" in where(rec)


# ------------------------------------------------------------------ --trace
@pytest.mark.timeout(180)
def test_trace_has_every_phase_of_both_ranks(tiny_data, tmp_path):
    trace = tmp_path / "out" / "trace.json"
    steps = 4
    run_dtrain(2, *train_args(tiny_data, tmp_path / "ck", "--steps", steps, "--eval-every", 2,
                              "--checkpoint-every", 2, "--quiet"),
               env={"DTRAIN_TRACE": str(trace)}, timeout=150)
    doc = json.loads(trace.read_text())
    spans = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    names = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert len(names) == 2
    for r in (0, 1):
        mine = [e for e in spans if e["pid"] == r]
        for step in range(1, steps + 1):
            at = {e["name"] for e in mine if e["args"].get("step") == step}
            assert {f"step {step}", "batch assembly", "forward", "backward", "optimizer"} <= at, (
                r, step, at)
            assert any(n.startswith("gradient reduce (") for n in at)
            box = next(e for e in mine if e["name"] == f"step {step}")
            colls = [e for e in mine if e["cat"] == "communication"
                     and box["ts"] <= e["ts"] <= box["ts"] + box["dur"]]
            assert colls, (r, step)
            for c in colls:
                assert c["args"]["bytes"] > 0 and c["args"]["mode"] in ("dense", "sparse")
                assert {"seq", "count", "dtype", "wait_us"} <= c["args"].keys()
        assert {"evaluation", "checkpoint", "setup"} <= {e["name"] for e in mine}
        assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in mine)
    # the same collective (by sequence number) starts at nearly the same aligned time on both ranks
    starts = {}
    for e in spans:
        if e["cat"] == "communication":
            starts.setdefault(e["args"]["seq"], {})[e["pid"]] = e["ts"]
    assert len(starts) > 10 and all(len(v) == 2 for v in starts.values())
    assert min(abs(v[0] - v[1]) for v in starts.values()) < 50_000  # microseconds
    pytest.importorskip("matplotlib")
    assert (trace.parent / "timeline.png").stat().st_size > 1000


def test_summarize_splits_collective_time_into_waiting_and_communication():
    ev = lambda name, cat, ts, dur, **args: [name, cat, ts, dur, args]  # noqa: E731
    tracks = [{"rank": 0, "host": "h", "pid": 1, "dropped": 0, "events": [
                  ev("step 1", "step", 0, 100, step=1), ev("forward", "compute", 0, 60),
                  ev("allreduce_sum_", "communication", 60, 40, seq=1, bytes=8),
                  ev("optimizer", "optimizer", 100, 10)]},
              {"rank": 1, "host": "h", "pid": 2, "dropped": 0, "events": [
                  ev("step 1", "step", 0, 100, step=1), ev("forward", "compute", 0, 90),
                  ev("allreduce_sum_", "communication", 90, 10, seq=1, bytes=8)]}]
    doc = merge(tracks, 2, note="x")
    json.dumps(doc)
    s = summarize(doc)
    assert s[0]["waiting"] == pytest.approx(30e-6) and s[0]["communication"] == pytest.approx(10e-6)
    assert s[1]["waiting"] == 0 and s[1]["compute"] == pytest.approx(90e-6)
    assert s[0]["optimizer"] == pytest.approx(10e-6) and s[0]["other"] == pytest.approx(0.0)


def test_settings_flag_wins_over_environment(monkeypatch):
    class Cfg:
        stall_timeout, trace = 600.0, None

    monkeypatch.setenv("DTRAIN_STALL_TIMEOUT", "7")
    monkeypatch.setenv("DTRAIN_TRACE", "t.json")
    assert diagnostics_settings(Cfg()) == (7.0, "t.json")
    Cfg.stall_timeout, Cfg.trace = 30.0, "flag.json"
    assert diagnostics_settings(Cfg()) == (30.0, "flag.json")
    monkeypatch.delenv("DTRAIN_STALL_TIMEOUT")
    monkeypatch.delenv("DTRAIN_TRACE")
    assert diagnostics_settings(object()) == (600.0, None)


# ------------------------------------------------------------------ --debug
@pytest.mark.timeout(90)
@pytest.mark.parametrize("nprocs,bad,kind,theirs,odd", [
    (3, 1, "op", "allgather_scalars(count=2, float64)", "barrier(count=0)"),
    (2, 1, "count", "allreduce_sum_(count=8, float64)", "allreduce_sum_(count=5, float64)")])
def test_debug_names_the_rank_of_a_mismatched_collective(nprocs, bad, kind, theirs, odd):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    res = subprocess.run([mpiexec, "-n", str(nprocs), sys.executable,
                          str(WORKERS / "mismatch_worker.py"), str(bad), kind],
                         capture_output=True, text=True, timeout=60, cwd=WORKERS)
    assert res.returncode != 0
    assert "UNREACHABLE" not in res.stdout
    assert (f"collective #2 does not match across ranks: rank {bad} calls {odd} at "
            "mismatch_worker.py:" in res.stderr), res.stderr[-3000:]
    assert "but rank 0" in res.stderr and f"calls {theirs}" in res.stderr


# ------------------------------------------------------------------ no false stall alarms
# 8 ranks on this machine's cores, a tiny --stall-timeout: every legitimate long wait (rank 0's
# data check and checkpoint writes, a cold Numba cache's first-step compilation on some ranks,
# evaluation, the loss plot before the final barrier) must pass without an alarm.
FALSE_ALARM_CASES = [(1, "one cold"), (2, "half cold")]  # every case has warm ranks too


@pytest.mark.timeout(300)
@pytest.mark.parametrize("timeout,cache", FALSE_ALARM_CASES,
                         ids=[f"{t}s-{c.replace(' ', '-')}" for t, c in FALSE_ALARM_CASES])
def test_healthy_oversubscribed_job_is_never_called_stalled(tiny_data, tmp_path, timeout, cache):
    cold = {"warm": 0, "one cold": 1, "half cold": 4}[cache]
    run = train_args(tiny_data, tmp_path / "ck", "--steps", 4, "--checkpoint-every", 2,
                     "--eval-every", 2, "--stall-timeout", timeout)
    args = [sys.executable, "-m", "dtrain", *map(str, run)]
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec]
    if cold:  # MPMD: the first ranks compile into empty caches of their own
        cold_cache = ["-env", "NUMBA_CACHE_DIR", str(tmp_path / "cold-cache")]
        cmd += ["-n", str(cold), *cold_cache, *args, ":"]
    cmd += ["-n", str(8 - cold), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    assert "stall" not in p.stderr and "training done: 4 steps" in p.stdout, p.stdout[-2000:]


def test_stall_decision_waits_for_busy_ranks_and_not_for_silent_ones():
    """The rules of Watchdog._somebody_stuck, on the records the other ranks answer with."""
    from dtrain.parallel.watchdog import Watchdog

    def decide(answers, timeout=1.0):
        wd = object.__new__(Watchdog)
        wd.timeout, wd.others = timeout, list(range(1, 1 + len(answers)))

        def ping():
            wd.pongs = {r: rec for r, rec in zip(wd.others, answers) if rec is not None}
            return [r for r, rec in zip(wd.others, answers) if rec is None]

        wd._ping = ping
        return wd._somebody_stuck()

    def away(phase, seconds, done=3):
        return {"phase": phase, "in_phase": seconds, "done": done, "op": None}

    waiting = {"phase": "step", "in_phase": 2.0, "done": 3, "op": "barrier", "waited": 2.0}
    assert decide([waiting, None])  # a silent rank
    assert decide([waiting, dict(waiting, waited=0.2)]) is False  # collectives still completing
    assert decide([waiting, dict(waiting, waited=1.5)])  # every rank waits: calls differ
    assert not decide([waiting, away("plot", 20.0)])
    assert not decide([away("step", 8.0, done=None)])  # first step: compiling
    assert not decide([away("evaluation", 500.0)])
    assert not decide([away("step", 5.0)])  # a slow step is not a stall
    assert decide([away("step", 45.0)]) and decide([away("after step", 31.0)])
    assert decide([away("checkpoint", 700.0)])
