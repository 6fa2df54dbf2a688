"""Rounds of a comparison: each contender's median of round medians, the ratio, and the load.

A round is one block (or one process) of each contender; a contender's figure
is the median of its round medians, so one disturbed round moves it little.
"""

from __future__ import annotations

import statistics

from .load import NOISY_SHARE


def with_rounds(result, rounds):
    """``result`` with its median the median of the ``rounds``' medians, and what follows."""
    out = dict(result)
    out["median_ms"] = statistics.median(x["median_ms"] for x in rounds)
    t = out["median_ms"] / 1e3
    out["tokens_per_s"] = out["tokens_per_step"] / t
    if "gflop_per_step" in out:
        out["gflops"] = out["gflop_per_step"] / t
    if "comm_ms" in out:
        out["comm_share"] = out["comm_ms"] / out["median_ms"]
    if out.get("floor_ms"):
        out["timed_over_floor"] = out["median_ms"] / out["floor_ms"]
    out["round_medians_ms"] = [x["median_ms"] for x in rounds]
    loads = [x.get("foreign_load") for x in rounds if x.get("foreign_load") is not None]
    out["foreign_load_max"] = max(loads) if loads else None
    return out


def _median_over(results):
    """One result from several runs of the same configuration: numbers by their median."""
    out = dict(results[-1])
    for key, value in results[-1].items():
        vals = [x.get(key) for x in results]
        if isinstance(value, bool) or any(v is None for v in vals) or all(v == value for v in vals):
            continue
        if isinstance(value, (int, float)):
            out[key] = statistics.median(vals)
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            out[key] = {k: statistics.median(v[k] for v in vals)
                        for k in value if all(k in v for v in vals)}
        elif isinstance(value, list) and key.endswith("_ms"):
            out[key] = [t for v in vals for t in v]
    return with_rounds(out, results)


def merge_rounds(results):
    """{label: [result per round]} -> {label: median result}."""
    return {label: _median_over(rs) for label, rs in results.items()}


def print_rounds(labels, results, ratio, ratio_name, names=None):
    """Per round, each contender's median; ``ratio`` = (a, b): a's median / b's per round; and
    the most that other processes used of the machine during that round's timed steps.
    ``names``: {label: column heading} where a heading says more than the label."""
    heads = [(names or {}).get(x, x) for x in labels]
    width = max(12, *(len(x) for x in heads)) + 2
    print("  round " + "".join(f"{x:>{width}}" for x in heads) + f"  {ratio_name}  others' CPU")
    a, b = ratio
    worst = 0.0
    for k in range(len(results[labels[0]])):
        row = "".join(f"{results[x][k]['median_ms']:>{width - 3}.1f} ms" for x in labels)
        known = [v for v in (results[x][k].get("foreign_load") for x in labels) if v is not None]
        others = f"{100 * max(known):10.1f}%" if known else "          ?"
        worst = max([worst, *known])
        r = results[a][k]["median_ms"] / results[b][k]["median_ms"]
        print(f"  {k + 1:>5} {row}  {r:{len(ratio_name)}.3f}  {others}")
    if worst > NOISY_SHARE:
        print(f"  WARNING: other processes used up to {100 * worst:.0f}% of the cores during some "
              "rounds; rerun on a quiet machine before quoting these figures")


def ratio_range(results, a, b):
    """(min, max) over rounds of b's median / a's median."""
    rs = [rb["median_ms"] / ra["median_ms"] for ra, rb in zip(results[a], results[b])]
    return min(rs), max(rs)


def isolation_line(args, labels):
    """How the fresh-process comparisons were run, in one line."""
    print(f"  isolation: every run a process of its own, alternating {', '.join(labels)}, ... "
          f"over {args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps; "
          "medians of the round medians; others' CPU: over each whole run")
