"""The GPU half of ``dtrain bench``: graphed and eager runs of the trainer's ``TrainStep``.

Both runs are the one step path (``dtrain.step``) with the same model,
optimizer and reducer; one captures a CUDA graph per batch shape, the other
launches eagerly. Their device time (CUDA events around the step's kernels)
against their wall time gives the share of launch gaps.
"""

from __future__ import annotations

import statistics
import time

from ..nn.model import fixed_batch
from ..step import TrainStep
from ..step.gpu_graph import reduce_path


def run_gpu_bench(args, comm, model, adam, reducer, feats, caps, real_tokens, flops, torch_step=None,
                  torch_version=None):
    """Time graphed and eager GPU steps (and PyTorch, interleaved); report launch gaps."""
    import cupy as cp

    graphed = TrainStep(model, adam, reducer, graphs=True)
    eager = TrainStep(model, adam, reducer, graphs=False)
    for step in (graphed, eager):
        step.gpu.timing = True
    B = args.batch_size

    def run(step):
        t0 = time.perf_counter()
        r = step(feats, caps, B, 1e-3)
        cp.cuda.Stream.null.synchronize()
        wall = time.perf_counter() - t0
        return wall, cp.cuda.get_elapsed_time(step.gpu.ev_start, step.gpu.ev_end) / 1e3, r.compute_s

    for _ in range(max(2, args.warmup)):  # the first step of a shape runs eagerly and captures
        run(graphed)
        run(eager)
        if torch_step:
            torch_step()
    g_wall, g_gpu, g_host, e_wall, e_gpu, e_host, t_wall = [], [], [], [], [], [], []
    for _ in range(args.steps):
        if comm.size > 1:
            comm.barrier()
        w, gpu, hst = run(graphed)
        g_wall.append(w), g_gpu.append(gpu), g_host.append(hst)
        w, gpu, hst = run(eager)
        e_wall.append(w), e_gpu.append(gpu), e_host.append(hst)
        if torch_step:
            t0 = time.perf_counter()
            torch_step()
            t_wall.append(time.perf_counter() - t0)

    med = statistics.median
    gw, gg, ew, eg = med(g_wall), med(g_gpu), med(e_wall), med(e_gpu)
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    result = {
        "threads_per_rank": None, "device": f"gpu ({name})", "kernels": "cuda (CuPy RawModule)",
        "blas": {"library": "cuBLAS", "version": f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}",
                 "kernel": f"CuPy {cp.__version__}", "threads": None},
        "median_ms": gw * 1e3, "tokens_per_s": real_tokens / gw, "gflops": flops / gw / 1e9,
        "step_mode": graphed.describe(), "fixed_T": fixed_batch(caps, 0).T,
        "graph_wall_ms": gw * 1e3, "graph_gpu_ms": gg * 1e3, "graph_host_ms": med(g_host) * 1e3,
        "eager_wall_ms": ew * 1e3, "eager_gpu_ms": eg * 1e3, "eager_host_ms": med(e_host) * 1e3,
        # the graph replay keeps the GPU busy back to back: its event time is the
        # step's device work; whatever the eager step takes beyond it is launch gaps
        "eager_launch_gap_share": max(0.0, 1.0 - gg / ew),
        "graph_idle_share": max(0.0, 1.0 - gg / gw),
        "graphs_captured": graphed.gpu.captures, "graph_replays": graphed.gpu.replays,
        "reduce_path": reduce_path(comm),
    }
    if t_wall:
        tmed = med(t_wall)
        result.update({"torch_version": torch_version, "torch_median_ms": tmed * 1e3,
                       "torch_tokens_per_s": real_tokens / tmed, "speedup_vs_torch": tmed / gw})
    return result


def print_gpu_lines(r):
    print(f"  step   : {r['step_mode']}; fixed shape N={r['N'] // r['ranks']} x T={r['fixed_T']}; "
          f"gradient reduce: {r['reduce_path']}")
    print(f"  graphed: {r['graph_wall_ms']:8.3f} ms/step wall, {r['graph_gpu_ms']:.3f} ms device "
          f"(events) -> {100 * r['graph_idle_share']:.1f}% of the step is host work and launch/sync latency")
    print(f"  eager  : {r['eager_wall_ms']:8.3f} ms/step wall, {r['eager_gpu_ms']:.3f} ms first-to-last "
          f"kernel, {r['eager_host_ms']:.3f} ms host enqueue -> launch gaps "
          f"{100 * r['eager_launch_gap_share']:.1f}% of the eager step (1 - graph device time / eager wall)")
