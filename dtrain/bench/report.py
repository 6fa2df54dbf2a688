"""What ``dtrain bench`` prints: one run, the GEMM floor and breakdown, and isolated comparisons."""

from __future__ import annotations

import statistics

from .floor import CATEGORIES
from .load import NOISY_SHARE, cores


def print_header(r, title="dtrain bench"):
    print(f"{title}: {r['cell']} {r['dtype']} N={r['N']} T={r['T']} D={r['D']} W={r['W']} "
          f"H={r['H']} V={r['V']} ranks={r['ranks']} device={r['device']}")
    print(f"  batches: {r['batches']}")
    b = r["blas"]
    threads = f"{r['ranks']} rank(s) x {r['threads_per_rank']} thread(s)" if r.get("threads_per_rank") else ""
    print(f"  BLAS: {b.get('library')} {b.get('version', '')} kernel={b.get('kernel')} "
          f"threads={b.get('threads')}; fused kernels: {r['kernels']}{'; ' + threads if threads else ''}")
    print(f"  step: {r['step_mode']}")
    print(f"  real tokens: {100 * r['real_token_fraction']:.1f}% of target slots; peak memory "
          f"{r['peak_rss_mb']:.0f} MB per rank; micro-batch {r['micro_batch'] or 'none'}"
          f"{', deterministic' if r['deterministic'] else ''}")


def print_dtrain_line(r, label="dtrain "):
    extra = ""
    if "batch_ms" in r:
        extra = (f" (batch assembly {r['batch_ms']:.2f} ms + step {r['step_only_ms']:.1f} ms, "
                 "the part the trainer logs)")
    print(f"  {label}: {r['median_ms']:8.1f} ms/step  {r['tokens_per_s']:9,.0f} tokens/s  "
          f"{r['gflops']:6.1f} GFLOP/s{extra}")


def print_comm(r):
    if "comm_ms" in r:
        print(f"  comm   : {r['comm_ms']:8.2f} ms/step ({100 * r['comm_share']:.1f}% of the step): "
              f"waiting for the slowest rank {r['comm_wait_ms']:.2f} ms, transfer "
              f"{r['comm_transfer_ms']:.2f} ms; compute {r['compute_ms']:.1f} ms; embedding reduce "
              f"{r['embed_reduce']}, {r['bytes_per_step'] / 1e6:.2f} MB/step per rank")
    elif r.get("reduce_mode"):
        print(f"  reduce : {r['reduce_mode']}, {r.get('bytes_per_step', 0) / 1e6:.2f} MB/step per rank")


def print_floor(r):
    if "floor_ms" not in r:
        return
    ms = r["breakdown_ms"]
    total = r["profiled_step_ms"]
    timed = r["median_ms"] / r["floor_ms"] if r["floor_ms"] else float("nan")
    print(f"  GEMM floor: {r['floor_ms']:.1f} ms = the step's {r['floor_gemms']} GEMMs alone (same shapes, "
          f"layouts and order; median of {r['floor_repeats']} replays, {r['floor_batches']} batches) "
          f"-> the step is {r['step_over_floor']:.2f}x its GEMM floor (each profiled step against the "
          f"replay of its own GEMMs, side by side; timed median / floor: {timed:.2f}x)")
    if r.get("not_gemm_over_floor"):
        print(f"  floor + the step's own time outside GEMMs, over the floor: {r['not_gemm_over_floor']:.2f}x "
              f"(the step as it would be if its GEMMs ran at their replayed speed; steadier on a shared host)")
    print(f"  where the step goes (profiled steps, {total:.1f} ms with batch assembly; medians):")
    for key, label in CATEGORIES:
        if key not in ms:
            continue
        note = ""
        if key == "gemm":
            note = f"  ({ms[key] - r['floor_ms']:+.1f} ms against the floor)"
        elif key == "python":
            note = (f"  ({r['python_us_per_time_step']:.0f} us per time step, forward and backward, "
                    f"{r['time_steps']:.0f} time steps)")
        print(f"    {label:<56} {ms[key]:7.2f} ms {100 * ms[key] / total:5.1f}%{note}")
    rest = total - ms.get("gemm", 0.0)
    print(f"    not GEMM: {rest:.1f} ms ({100 * rest / total:.1f}%); the same steps at width 4 (nothing but "
          f"per-call overhead) take {r['tiny_step_ms']:.1f} ms")


def print_load(r):
    """Other processes' share of the machine during the timed steps (a warning above NOISY_SHARE)."""
    share = r.get("foreign_load")
    if share is None:
        return
    warn = "; a busy machine: do not quote these timings" if share > NOISY_SHARE else ""
    print(f"  others : other processes used {100 * share:.1f}% of the {cores()} cores during the timed "
          f"steps{warn}")


def print_result(r):
    print_header(r)
    print_dtrain_line(r)
    print_load(r)
    print_comm(r)
    print_floor(r)


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
            out[key] = {k: statistics.median(v[k] for v in vals) for k in value if all(k in v for v in vals)}
        elif isinstance(value, list) and key.endswith("_ms"):
            out[key] = [t for v in vals for t in v]
    return with_rounds(out, results)


def with_rounds(result, rounds):
    """``result`` with its median the median of the ``rounds``' medians, and what follows from it."""
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


def merge_rounds(results):
    """{label: [result per round]} -> {label: median result}."""
    return {label: _median_over(rs) for label, rs in results.items()}


def print_rounds(labels, results, ratio, ratio_name):
    """Per round, each configuration's median; ``ratio`` = (a, b): a's median / b's per round;
    and the most that other processes used of the machine during that round's timed steps."""
    width = max(12, *(len(x) for x in labels)) + 2
    print("  round " + "".join(f"{x:>{width}}" for x in labels) + f"  {ratio_name}  others' CPU")
    a, b = ratio
    worst = 0.0
    for k in range(len(results[labels[0]])):
        row = "".join(f"{results[x][k]['median_ms']:>{width - 3}.1f} ms" for x in labels)
        loads = [results[x][k].get("foreign_load") for x in labels]
        known = [x for x in loads if x is not None]
        others = f"{100 * max(known):10.1f}%" if known else "          ?"
        worst = max([worst, *known])
        print(f"  {k + 1:>5} {row}  {results[a][k]['median_ms'] / results[b][k]['median_ms']:{len(ratio_name)}.3f}"
              f"  {others}")
    if worst > NOISY_SHARE:
        print(f"  WARNING: other processes used up to {100 * worst:.0f}% of the cores during some timed "
              "steps; rerun on a quiet machine before quoting these figures")


def ratio_range(results, a, b):
    """(min, max) over rounds of b's median / a's median."""
    rs = [rb["median_ms"] / ra["median_ms"] for ra, rb in zip(results[a], results[b])]
    return min(rs), max(rs)
