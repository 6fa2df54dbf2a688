"""The stall report: which ranks are missing, and where every rank was last seen.

Pure text from the records the ranks exchanged (stall_rules.py describes them); the
watchdog prints it before it ends the job.
"""

from __future__ import annotations

from .stall_rules import PHASES


def fmt_bytes(n) -> str:
    """A byte count for a reader: "512 B", "1.5 KB", ..., at most GB."""
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def ranks(rs) -> str:
    """"0, 2, 3", or "none"."""
    rs = list(rs)
    return ", ".join(map(str, rs)) if rs else "none"


def where(rec: dict) -> str:
    """Where a rank was, in words, from its record."""
    text = f"step {rec['step']}, "
    if rec.get("op") is not None:
        return text + (f"waiting in collective #{rec['op_seq']} {rec['op']} "
                       f"({fmt_bytes(rec.get('nbytes'))}) for {rec['waited']:.1f} s")
    phase = PHASES.get(rec["phase"], rec["phase"])
    if rec["phase"] == "step" and rec.get("done") is None:
        phase = "in its first training step (compiling kernels)"
    text += f"{phase} for {rec['in_phase']:.1f} s"
    if rec.get("last_op"):
        text += f", after collective #{rec['seq']} {rec['last_op']}"
    return text


def stall_report(why, records, got, waiting, t_ref, *, heard, peers, timeout) -> list[str]:
    """Which ranks are missing, and where every rank was last seen.

    The ranks waiting in a collective are the victims; the missing ones are
    all the others: silent, or alive but not in a collective. (A rank can stop
    inside a collective that some ranks complete and others do not, so the
    waiting ranks need not all be in the same one.) Times are as of ``t_ref``,
    when this rank sent its STATUS, like the waiting ranks' times.

    ``records``: rank -> record of every rank that answered (this one's included);
    ``got``: rank -> (STATUS message, receive time); ``heard``: rank -> (heartbeat
    record, receive time) as heard here; ``peers``: (host, pid) of every rank.
    """
    missing = [r for r in range(len(peers)) if r not in waiting]
    waited = max((records[r]["waited"] for r in waiting), default=0.0)
    seqs = sorted({records[r]["op_seq"] for r in waiting})
    places = "; ".join(
        f"#{q} {records[rs[0]]['op']} in step {records[rs[0]]['step']} on rank(s) {ranks(rs)}"
        for q in seqs for rs in [[r for r in waiting if records[r]["op_seq"] == q]])
    if why.get("why") == "signal":
        head = (f"dtrain: stall: {why.get('signal')} received while rank(s) {ranks(waiting)} "
                f"waited up to {waited:.1f} s in collectives ({places}); rank(s) "
                f"{ranks(why.get('silent', []))} do not respond. Missing: rank(s) {ranks(missing)}")
    elif missing:
        head = (f"dtrain: stall: rank(s) {ranks(missing)} stopped taking part in collectives: "
                f"rank(s) {ranks(waiting)} waited up to {waited:.1f} s for them ({places}; "
                f"--stall-timeout {timeout:g})")
    else:
        head = (f"dtrain: stall: every rank has waited up to {waited:.1f} s in a collective, but "
                f"not in the same one ({places}): the ranks' collective calls do not match "
                "(--debug checks every call and names the first mismatch)")
    lines = [head, "dtrain: stall: where every rank was last seen:"]
    # how far the silent ranks got: they entered every collective a waiting rank completed
    done_seq = max(waiting, key=lambda r: records[r]["op_seq"], default=None)
    # heartbeats, as heard by any responder: rank -> (record, seconds ago)
    last = {r: (rec, t_ref - t) for r, (rec, t) in heard.items()}
    for msg, t in got.values():
        for r, (rec, age) in msg.get("heard", {}).items():
            ago = max(age + (t_ref - t), 0.0)
            if int(r) not in last or ago < last[int(r)][1]:
                last[int(r)] = (rec, ago)
    for r in range(len(peers)):
        host, pid = peers[r]
        who = f"  rank {r} ({host}, pid {pid}): "
        if r in records:
            lines.append(who + where(records[r]) + ("" if r in waiting else "  <- missing"))
            continue
        got_to = ""
        if done_seq is not None and records[done_seq]["op_seq"] > 1:
            rec = records[done_seq]
            got_to = (f"entered collective #{rec['op_seq'] - 1} ({rec['last_op']}), which rank "
                      f"{done_seq} completed; ")
        heard_at = (f"last heard {last[r][1]:.1f} s ago: {where(last[r][0])}" if r in last
                    else "never heard from")
        lines.append(who + f"NOT RESPONDING; {got_to}{heard_at}  <- missing")
    return lines
