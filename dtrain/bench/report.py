"""What ``dtrain bench`` prints: one run, its communication, the GEMM floor and breakdown.

The comparisons in benchmarks/ print their runs with these too.
"""

from __future__ import annotations

from .floor import CATEGORIES


def print_header(r, title="dtrain bench"):
    gemms = " bf16-GEMMs" if r.get("precision", "fp32") != "fp32" else ""
    print(f"{title}: {r['cell']} {r['dtype']}{gemms} N={r['N']} T={r['T']} D={r['D']} W={r['W']} "
          f"H={r['H']} V={r['V']} ranks={r['ranks']} device={r['device']}")
    print(f"  batches: {r['batches']}")
    b = r["blas"]
    threads = (f"{r['ranks']} rank(s) x {r['threads_per_rank']} thread(s)"
               if r.get("threads_per_rank") else "")
    print(f"  BLAS: {b.get('library')} {b.get('version', '')} kernel={b.get('kernel')} "
          f"threads={b.get('threads')}; fused kernels: {r['kernels']}"
          f"{'; ' + threads if threads else ''}")
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
              f"{r['comm_transfer_ms']:.2f} ms; compute {r['compute_ms']:.1f} ms; embedding "
              f"reduce {r['embed_reduce']}, {r['bytes_per_step'] / 1e6:.2f} MB/step per rank")
    elif r.get("reduce_mode"):
        print(f"  reduce : {r['reduce_mode']}, {r.get('bytes_per_step', 0) / 1e6:.2f} MB/step "
              "per rank")


def _print_floor_lines(r):
    timed = r["median_ms"] / r["floor_ms"] if r["floor_ms"] else float("nan")
    print(f"  GEMM floor: {r['floor_ms']:.1f} ms = the step's {r['floor_gemms']} GEMMs alone "
          f"(same shapes, layouts and order; median of {r['floor_repeats']} replays, "
          f"{r['floor_batches']} batches) -> the step is {r['step_over_floor']:.2f}x its GEMM "
          f"floor (each profiled step against the replay of its own GEMMs, side by side; "
          f"timed median / floor: {timed:.2f}x)")
    if r.get("not_gemm_over_floor"):
        print(f"  floor + the step's own time outside GEMMs, over the floor: "
              f"{r['not_gemm_over_floor']:.2f}x (the step as it would be if its GEMMs ran at "
              "their replayed speed; steadier on a shared host)")


def print_floor(r):
    """The GEMM floor and where the rest of the step goes (one CPU rank; nothing otherwise)."""
    if "floor_ms" not in r:
        return
    _print_floor_lines(r)
    ms = r["breakdown_ms"]
    total = r["profiled_step_ms"]
    print(f"  where the step goes (profiled steps, {total:.1f} ms with batch assembly; medians):")
    for key, label in CATEGORIES:
        if key not in ms:
            continue
        note = ""
        if key == "gemm":
            note = f"  ({ms[key] - r['floor_ms']:+.1f} ms against the floor)"
        elif key == "python":
            note = (f"  ({r['python_us_per_time_step']:.0f} us per time step, forward and "
                    f"backward, {r['time_steps']:.0f} time steps)")
        print(f"    {label:<56} {ms[key]:7.2f} ms {100 * ms[key] / total:5.1f}%{note}")
    rest = total - ms.get("gemm", 0.0)
    print(f"    not GEMM: {rest:.1f} ms ({100 * rest / total:.1f}%); the same steps at width 4 "
          f"(nothing but per-call overhead) take {r['tiny_step_ms']:.1f} ms")


def print_result(r):
    print_header(r)
    print_dtrain_line(r)
    print_comm(r)
    print_floor(r)
