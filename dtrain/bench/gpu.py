"""The GPU half of ``dtrain bench``: graphed and eager runs of the trainer's ``TrainStep``.

Both runs are the one step path (``dtrain.step``) with the same model,
optimizer and reducer; one captures a CUDA graph per batch shape, the other
launches eagerly. Each timed iteration assembles one batch (as the trainer
does) and runs it through both. Their device time (CUDA events around the
step's kernels) against their wall time gives the share of launch gaps.
PyTorch runs in a process of its own (benchmarks/compare_torch.py).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..nn.model import fixed_batch
from ..step import build_step
from ..step.gpu_graph import reduce_path
from .workload import mean_step_flops


def run_gpu(args, comm, build, batches, gates, settings):
    """Time graphed and eager GPU steps; report launch gaps (a result dict, milliseconds).
    Both are the trainer's step (``build``), on one model and one Adam."""
    import cupy as cp

    model, adam, _, graphed = build(None, None, None)
    eager = build_step(settings, comm, model, optimizer=adam, graphs=False)
    for step in (graphed, eager):
        step.gpu.timing = True
    B = args.batch_size

    def run(step, captions, features, t_batch):
        t0 = time.perf_counter()
        r = step(features, captions, B, 1e-3)
        cp.cuda.Stream.null.synchronize()
        wall = time.perf_counter() - t0 + t_batch
        return wall, cp.cuda.get_elapsed_time(step.gpu.ev_start, step.gpu.ev_end) / 1e3, r

    for _ in range(max(2, args.warmup)):  # the first step of a shape runs eagerly and captures
        captions, features = batches.next()
        run(graphed, captions, features, 0.0)
        run(eager, captions, features, 0.0)
    g_wall, g_gpu, g_host, e_wall, e_gpu, e_host, tokens, fixed_T, kept = ([] for _ in range(9))
    for _ in range(args.steps):
        if comm.size > 1:
            comm.barrier()
        t0 = time.perf_counter()
        captions, features = batches.next()
        t_batch = time.perf_counter() - t0
        w, gpu, r = run(graphed, captions, features, t_batch)
        g_wall.append(w), g_gpu.append(gpu), g_host.append(r.compute_s)
        w, gpu, r = run(eager, captions, features, t_batch)
        e_wall.append(w), e_gpu.append(gpu), e_host.append(r.compute_s)
        tokens.append(r.tokens)
        fixed_T.append(fixed_batch(captions, model.null_idx).T)
        kept.append(captions)

    med = statistics.median
    gw, gg, ew, eg = med(g_wall), med(g_gpu), med(e_wall), med(e_gpu)
    tok = float(np.mean(tokens))
    flops = float(comm.allreduce_scalars(np.array([mean_step_flops(model, kept, gates)]))[0])
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {
        "threads_per_rank": None, "device": f"gpu ({name})", "kernels": "cuda (CuPy RawModule)",
        "blas": {"library": "cuBLAS",
                 "version": f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}",
                 "kernel": f"CuPy {cp.__version__}", "threads": None},
        "median_ms": gw * 1e3, "tokens_per_step": tok, "tokens_per_s": tok / gw,
        "gflops": flops / gw / 1e9, "gflop_per_step": flops / 1e9,
        "step_times_ms": [x * 1e3 for x in g_wall], "T": int(captions.shape[1]) - 1,
        "real_token_fraction": tok / (B * (int(captions.shape[1]) - 1)),
        "step_mode": graphed.describe(), "fixed_T": int(max(fixed_T)),
        "graph_wall_ms": gw * 1e3, "graph_gpu_ms": gg * 1e3, "graph_host_ms": med(g_host) * 1e3,
        "eager_wall_ms": ew * 1e3, "eager_gpu_ms": eg * 1e3, "eager_host_ms": med(e_host) * 1e3,
        # the graph replay keeps the GPU busy back to back: its event time is the
        # step's device work; whatever the eager step takes beyond it is launch gaps
        "eager_launch_gap_share": max(0.0, 1.0 - gg / ew),
        "graph_idle_share": max(0.0, 1.0 - gg / gw),
        "graphs_captured": graphed.gpu.captures, "graph_replays": graphed.gpu.replays,
        "reduce_path": reduce_path(comm),
    }


def print_gpu_lines(r):
    print(f"  step   : {r['step_mode']}; fixed shape N={r['N'] // r['ranks']} x T<={r['fixed_T']}; "
          f"gradient reduce: {r['reduce_path']}")
    print(f"  graphed: {r['graph_wall_ms']:8.3f} ms/step wall, {r['graph_gpu_ms']:.3f} ms device "
          f"(events) -> {100 * r['graph_idle_share']:.1f}% of the step is host work and "
          "launch/sync latency")
    print(f"  eager  : {r['eager_wall_ms']:8.3f} ms/step wall, {r['eager_gpu_ms']:.3f} ms "
          f"first-to-last kernel, {r['eager_host_ms']:.3f} ms host enqueue -> launch gaps "
          f"{100 * r['eager_launch_gap_share']:.1f}% of the eager step "
          "(1 - graph device time / eager wall)")
