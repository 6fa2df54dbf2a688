"""``--trace FILE``: a Chrome/Perfetto timeline of the run, one track per rank
(docs/diagnostics.md).

Every rank keeps its spans in memory (one tuple each: a few hundred
nanoseconds); at the end rank 0 gathers the tracks, writes one JSON file in
the trace-event format (``{"traceEvents": [...]}``: open it in
https://ui.perfetto.dev or chrome://tracing) and, when matplotlib is
installed, ``timeline.png`` beside it: each rank's time split into compute,
communication, waiting, optimizer and I/O, so the slow rank stands out.

Spans: "step N" around each training step, and inside it batch assembly,
forward, backward (one "forward+backward" span where the step does not
measure the boundary: the GPU graph), the gradient reduce (with its mode,
dense or sparse, and bytes), each collective (operation, bytes, element
count, dtype, sequence number; the reduce mode for those of the step) and
the optimizer; evaluation and checkpoints; "stall wait" when the watchdog
ends a stalled job. Clocks: every rank's zero is the end of the same barrier
(``align``), so the tracks line up to within the barrier's exit skew.

Time inside a collective is split, when the tracks are merged, into waiting
(until the last rank arrived at the same collective, matched by sequence
number) and communication (the rest).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np

from .atomic import write_text_atomic

__all__ = ["CATEGORIES", "Tracer", "summarize"]

# the categories of timeline.png; "other" is what no span claims (logging, checks, gaps)
CATEGORIES = ("compute", "communication", "waiting", "optimizer", "io", "other")
COLORS = {"compute": "#4C72B0", "communication": "#DD8452", "waiting": "#C44E52",
          "optimizer": "#55A868", "io": "#8172B3", "other": "#BBBBBB"}
# span category -> the category its own time (children excluded) counts as
_SELF_CATEGORY = {"compute": "compute", "reduce": "compute", "communication": "communication",
                  "waiting": "waiting", "optimizer": "optimizer", "io": "io", "step": "other",
                  "setup": "other"}
MAX_EVENTS = 2_000_000  # per rank; later spans are counted, not kept


class Tracer:
    """This rank's spans; ``finish`` merges them on rank 0."""

    def __init__(self, path, rank: int, size: int, limit: int = MAX_EVENTS):
        self.path = Path(path)
        self.rank, self.size, self.limit = rank, size, limit
        self.host, self.pid = socket.gethostname(), os.getpid()
        # (name, category, t0, t1, args, reduce mode); args: a dict or a collective's call tuple
        self.events = []
        self.dropped = 0
        self.origin = time.perf_counter()
        self.wall_origin = time.time()

    def align(self, comm) -> None:
        """Time zero: the end of a barrier (two: the first absorbs late arrivals)."""
        comm.barrier()
        comm.barrier()
        self.origin, self.wall_origin = time.perf_counter(), time.time()

    # ---------------------------------------------------------------- recording
    def span(self, name: str, category: str, t0: float, t1: float, args=None) -> None:
        if len(self.events) < self.limit:
            self.events.append((name, category, t0, t1, args, None))
        else:
            self.dropped += 1

    def collective(self, call, t1: float) -> None:
        """One collective (called by the communicator):
        call = (seq, op, count, dtype, nbytes, t0)."""
        if len(self.events) < self.limit:
            self.events.append((call[1], "communication", call[5], t1, call, None))
        else:
            self.dropped += 1

    def step(self, step: int, t_batch: float, result) -> None:
        """The spans of one training step, from its StepResult's phase marks."""
        m, mode = result.marks, result.mode
        ev = self.events
        i = len(ev) - 1  # this step's collectives (the last events): tag them with the reduce mode
        while i >= 0 and ev[i][1] == "communication" and ev[i][2] >= m["start"]:
            ev[i] = ev[i][:5] + (mode,)
            i -= 1
        self.span(f"step {step}", "step", t_batch, m["end"], {"step": step})
        self.span("batch assembly", "io", t_batch, m["start"], {"step": step})
        if m.get("forward_end"):
            self.span("forward", "compute", m["start"], m["forward_end"], {"step": step})
            self.span("backward", "compute", m["forward_end"], m["backward_end"], {"step": step})
        else:
            self.span("forward+backward", "compute", m["start"], m["backward_end"], {"step": step})
        self.span(f"gradient reduce ({mode})", "reduce", m["backward_end"], m["reduce_end"],
                  {"step": step, "mode": mode, "bytes": int(result.bytes)})
        self.span("optimizer", "optimizer", m["reduce_end"], m["end"], {"step": step})

    # ---------------------------------------------------------------- output
    def export(self) -> dict:
        """This rank's track: JSON-able, times in microseconds from the aligned zero."""
        o = self.origin
        out = []
        for name, cat, t0, t1, args, mode in self.events:
            if isinstance(args, tuple):  # a collective's call tuple
                seq, op, count, dtype, nbytes, _ = args
                args = {"seq": seq, "bytes": int(nbytes), "count": int(count),
                        "dtype": None if dtype is None else np.dtype(dtype).name}
            elif args is None:
                args = {}
            if mode is not None:
                args = dict(args, mode=mode)
            out.append([name, cat, round((t0 - o) * 1e6, 3),
                        round(max(t1 - t0, 0.0) * 1e6, 3), args])
        return {"rank": self.rank, "host": self.host, "pid": self.pid,
                "wall_origin": self.wall_origin, "dropped": self.dropped, "events": out}

    def finish(self, comm):
        """Collective: every track to rank 0, which writes the trace (and timeline.png).
        Returns paths on rank 0."""
        parts = comm.gather_bytes(json.dumps(self.export()).encode())
        if parts is None:
            return None
        return self.write([json.loads(p) for p in parts], timeline=True)

    def write(self, tracks, note=None, timeline=True):
        """The merged trace from ``tracks`` (exports); ``timeline.png`` beside it. Returns the
        trace path (and the png's, when written: a tuple)."""
        merged = merge(tracks, self.size, note)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(merged, separators=(",", ":")))
        if not timeline:
            return self.path
        png = plot_timeline(merged, self.path.with_name("timeline.png"))
        return (self.path, png) if png else self.path

    def write_own(self) -> None:
        """On an abort of this rank: its own track, to FILE on rank 0, FILE.rank<R>.json
        elsewhere."""
        if self.rank != 0:
            self.path = self.path.with_name(f"{self.path.name}.rank{self.rank}.json")
        self.write([self.export()], note=f"rank {self.rank} aborted; only its own track",
                   timeline=False)


# -------------------------------------------------------------------- merging
def merge(tracks, size: int, note=None) -> dict:
    """One trace-event document from the ranks' tracks; collectives get wait_us (see the
    module doc)."""
    arrivals = {}  # collective seq -> latest start over ranks
    for t in tracks:
        for _name, cat, ts, _dur, args in t["events"]:
            if cat == "communication" and "seq" in args:
                arrivals[args["seq"]] = max(arrivals.get(args["seq"], ts), ts)
    events = []
    for t in sorted(tracks, key=lambda t: t["rank"]):
        r = t["rank"]
        label = f"rank {r} ({t['host']}, pid {t['pid']})"
        events += [{"ph": "M", "name": "process_name", "pid": r, "tid": r,
                    "args": {"name": f"rank {r}"}},
                   {"ph": "M", "name": "process_sort_index", "pid": r, "tid": r,
                    "args": {"sort_index": r}},
                   {"ph": "M", "name": "thread_name", "pid": r, "tid": r,
                    "args": {"name": label}}]
        for name, cat, ts, dur, args in t["events"]:
            if cat == "communication" and "seq" in args:
                args = dict(args, wait_us=round(min(max(arrivals[args["seq"]] - ts, 0.0), dur), 3))
            events.append({"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur,
                           "pid": r, "tid": r, "args": args})
        if note:
            events.append({"name": note, "cat": "note", "ph": "i", "s": "g", "pid": r, "tid": r,
                           "ts": max((e[2] + e[3] for e in t["events"]), default=0.0)})
    ranks = sorted(t["rank"] for t in tracks)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "dtrain --trace", "ranks": ranks, "world_size": size,
                          "clock": "microseconds since the end of a barrier on every rank",
                          "dropped_events": {str(t["rank"]): t["dropped"] for t in tracks},
                          "note": note or ""}}


def summarize(doc) -> dict:
    """Seconds per category for each rank of a merged trace: each span's own time (children
    excluded) goes to its category; collective time splits into waiting (wait_us) and
    communication."""
    per_rank = {}
    spans = {}
    for e in doc["traceEvents"]:
        if e.get("ph") == "X":
            spans.setdefault(e["pid"], []).append(e)
    for r, evs in spans.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        own = [e["dur"] for e in evs]
        stack = []  # indices of the enclosing spans
        for i, e in enumerate(evs):
            while stack and evs[stack[-1]]["ts"] + evs[stack[-1]]["dur"] <= e["ts"] + 1e-3:
                stack.pop()
            if stack:
                parent = evs[stack[-1]]
                own[stack[-1]] -= min(e["dur"], parent["ts"] + parent["dur"] - e["ts"])
            stack.append(i)
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for e, t in zip(evs, own):
            t = max(t, 0.0)
            cat = _SELF_CATEGORY.get(e["cat"], "other")
            if cat == "communication":
                wait = min(e["args"].get("wait_us", 0.0), t)
                totals["waiting"] += wait * 1e-6
                t -= wait
            totals[cat] += t * 1e-6
        per_rank[r] = totals
    return per_rank


def plot_timeline(doc, out: Path, last_steps: int = 3):
    """timeline.png: per rank, total seconds by category, and the last few steps as a Gantt chart.
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    totals = summarize(doc)
    ranks = sorted(totals)
    if not ranks:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 2.0 + 1.1 * len(ranks)),
                                   gridspec_kw={"height_ratios": [1, 1.3]})
    left = np.zeros(len(ranks))
    for cat in CATEGORIES:
        vals = np.array([totals[r][cat] for r in ranks])
        ax1.barh(ranks, vals, left=left, color=COLORS[cat], label=cat)
        left += vals
    ax1.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds (whole run)")
    ax1.legend(ncol=len(CATEGORIES), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0),
               frameon=False)
    # Gantt of the last steps, from rank 0's step spans
    steps = sorted((e for e in doc["traceEvents"] if e.get("ph") == "X" and e["cat"] == "step"),
                   key=lambda e: e["ts"])
    if steps:
        lo = min(e["ts"] for e in steps[-last_steps * len(ranks):])
        hi = max(e["ts"] + e["dur"] for e in steps)
        for e in sorted((e for e in doc["traceEvents"] if e.get("ph") == "X" and e["cat"] != "step"
                         and e["ts"] + e["dur"] >= lo and e["ts"] <= hi), key=lambda e: -e["dur"]):
            cat = _SELF_CATEGORY.get(e["cat"], "other")
            x0, w = (e["ts"] - lo) * 1e-3, e["dur"] * 1e-3
            if cat == "communication":
                wait = e["args"].get("wait_us", 0.0) * 1e-3
                ax2.broken_barh([(x0, wait)], (e["pid"] - 0.4, 0.8), color=COLORS["waiting"])
                ax2.broken_barh([(x0 + wait, w - wait)], (e["pid"] - 0.4, 0.8),
                                color=COLORS["communication"])
            else:
                ax2.broken_barh([(x0, w)], (e["pid"] - 0.4, 0.8), color=COLORS[cat])
        ax2.set_yticks(ranks, [f"rank {r}" for r in ranks])
        ax2.invert_yaxis()
        ax2.set_xlim(0, (hi - lo) * 1e-3)
        ax2.set_xlabel(f"milliseconds (the last {min(last_steps, len(steps))} steps)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
