"""bf16 GEMMs with float32 results on the training step's shapes, library against library.

Candidates (issue 24): MKL's ``cblas_gemm_bf16bf16f32`` (pip ``mkl``), oneDNN's bf16 GEMM
(``dnnl_gemm_bf16bf16f32``) and its matmul primitive (pip ``onednn``), against float32 sgemm:
OpenBLAS as NumPy calls it (dtrain's fp32 path) and MKL's ``cblas_sgemm``. Each library runs in
its own process, pinned to the first ``threads`` cores, and the processes alternate round by
round, so a neighbour's load falls on every library alike; the table gives, per shape, the
median over rounds of each round's median call time, and the spread (lowest and highest round).

    python benchmarks/bf16_gemm.py --rounds 5 --threads 1 2 --json bf16_gemm.json
    python benchmarks/bf16_gemm.py --isa avx512_bf16   # as on a CPU without AMX
    python benchmarks/bf16_gemm.py --isa avx512        # ... nor AVX512-BF16

``--isa`` caps what each library dispatches to (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA,
OPENBLAS_CORETYPE), to see what an older CPU would get. Run it with a Python whose environment
has the libraries (``pip install mkl onednn numpy``); a library that does not load is reported
and left out. Calls go through ctypes (a few microseconds each, under 2% of the smallest shape).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# (label, M, K, N, trans_a, trans_b, beta): C (M, N) = op(A) op(B) + beta C at N=128 rows,
# T=16 steps, D=512, W=256, H=512 (LSTM: 4H=2048), V=1004; 1600 target tokens
SHAPES = [
    ("input proj x Wx", 2048, 256, 2048, False, False, 0.0),
    ("recurrent h Wh (+=)", 128, 512, 2048, False, False, 1.0),
    ("vocab scores", 1600, 512, 1004, False, False, 0.0),
    ("issue 512x2048x512", 512, 2048, 512, False, False, 0.0),
    ("recurrent bwd d Wh^T", 128, 2048, 512, False, True, 0.0),
    ("dx = d Wx^T", 2048, 2048, 256, False, True, 0.0),
    ("dh = dscores Wv^T", 1600, 1004, 512, False, True, 0.0),
    ("dWx = x^T d", 256, 2048, 2048, True, False, 0.0),
    ("dWh = h^T d", 512, 2048, 2048, True, False, 0.0),
    ("dWvocab = h^T dscores", 512, 1600, 1004, True, False, 0.0),
]
# calls of each shape in one training step (T = 16: the recurrent GEMMs once per time step,
# each at all 128 rows, though captions that have ended drop out: an upper estimate)
STEP_CALLS = {"input proj x Wx": 1, "recurrent h Wh (+=)": 16, "vocab scores": 1,
              "recurrent bwd d Wh^T": 16, "dx = d Wx^T": 1, "dh = dscores Wv^T": 1,
              "dWx = x^T d": 1, "dWh = h^T d": 1, "dWvocab = h^T dscores": 1}
LIBRARIES = ["openblas-sgemm", "mkl-sgemm", "mkl-bf16", "onednn-gemm-bf16", "onednn-matmul-bf16"]
ISA_CAPS = {  # --isa: (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, OPENBLAS_CORETYPE)
    "avx512_bf16": ("AVX512_E3", "AVX512_CORE_BF16", "COOPERLAKE"),
    "avx512": ("AVX512", "AVX512_CORE", "SKYLAKEX"),
    "avx2": ("AVX2", "AVX2", "HASWELL"),
}
CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even (finite data only)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def operands(M, K, N, trans_a, trans_b, rng):
    """A stored (K, M) when transposed, B stored (N, K) when transposed; C (M, N)."""
    a = rng.standard_normal((K, M) if trans_a else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if trans_b else (K, N), dtype=np.float32)
    return a, b, np.zeros((M, N), np.float32)


def lib_dir():
    return os.path.join(sys.prefix, "lib")


class Mkl:
    """MKL through its single dynamic library (LP64 integers: 32 bits)."""

    def __init__(self, threading_layer=None):
        self.lib = ctypes.CDLL(os.path.join(lib_dir(), "libmkl_rt.so.3"))
        if threading_layer is not None:  # MKL_THREADING_*: 0 intel, 1 sequential, 3 gnu
            self.lib.MKL_Set_Threading_Layer(threading_layer)
        buf = ctypes.create_string_buffer(512)
        self.lib.mkl_get_version_string(buf, 512)
        self.version = buf.value.decode(errors="replace").strip()
        i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        args = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        self.lib.cblas_sgemm.argtypes = args
        self.lib.cblas_sgemm.restype = None
        self.lib.cblas_gemm_bf16bf16f32.argtypes = args
        self.lib.cblas_gemm_bf16bf16f32.restype = None

    def call(self, fn, a, b, c, trans_a, trans_b, beta):
        M, N = c.shape
        K = a.shape[0] if trans_a else a.shape[1]
        fn(CBLAS_ROW_MAJOR, CBLAS_TRANS if trans_a else CBLAS_NO_TRANS,
           CBLAS_TRANS if trans_b else CBLAS_NO_TRANS, M, N, K, 1.0, a.ctypes.data, a.shape[1],
           b.ctypes.data, b.shape[1], beta, c.ctypes.data, N)


class OneDnn:
    """oneDNN's C API: its bf16 GEMM, and matmul primitives made once per shape."""

    def __init__(self):
        self.lib = ctypes.CDLL(os.path.join(lib_dir(), "libdnnl.so.3"))
        lib, p, i64 = self.lib, ctypes.c_void_p, ctypes.c_int64

        class Version(ctypes.Structure):
            _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                        ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                        ("gpu_runtime", ctypes.c_uint)]

        lib.dnnl_version.restype = ctypes.POINTER(Version)
        v = lib.dnnl_version().contents
        runtime = {1: "seq", 2: "omp", 4: "tbb", 8: "threadpool"}.get(v.cpu_runtime, v.cpu_runtime)
        self.version = f"oneDNN {v.major}.{v.minor}.{v.patch} (cpu runtime {runtime})"
        lib.dnnl_gemm_bf16bf16f32.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64,
                                              ctypes.c_float, p, i64, p, i64, ctypes.c_float,
                                              p, i64]
        lib.dnnl_gemm_bf16bf16f32.restype = ctypes.c_int
        self.engine, self.stream = p(), p()
        self.check(lib.dnnl_engine_create(ctypes.byref(self.engine), 1, 0))  # dnnl_cpu
        self.check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, 1))
        lib.dnnl_primitive_execute.argtypes = [p, p, ctypes.c_int, p]
        self.impl = {}

    @staticmethod
    def check(status, what="oneDNN call"):
        if status != 0:
            raise RuntimeError(f"{what} failed with status {status}")

    def gemm(self, a, b, c, trans_a, trans_b, beta):
        M, N = c.shape
        K = a.shape[0] if trans_a else a.shape[1]
        self.check(self.lib.dnnl_gemm_bf16bf16f32(
            b"T" if trans_a else b"N", b"T" if trans_b else b"N", M, N, K, 1.0, a.ctypes.data,
            a.shape[1], b.ctypes.data, b.shape[1], beta, c.ctypes.data, N))

    def desc(self, rows, cols, dtype, transposed):
        dims = (ctypes.c_int64 * 12)(rows, cols)
        strides = (ctypes.c_int64 * 12)(*((1, rows) if transposed else (cols, 1)))
        md = ctypes.c_void_p()
        self.check(self.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), 2, dims, dtype, strides), "memory descriptor")
        return md

    def matmul(self, a, b, c, trans_a, trans_b, beta):
        """A primitive for this shape and layout (dnnl_bf16 = 2, dnnl_f32 = 3), its memories
        bound to these arrays; returns the function that executes it."""
        lib, p = self.lib, ctypes.c_void_p
        M, N = c.shape
        K = a.shape[0] if trans_a else a.shape[1]
        src, wei = self.desc(M, K, 2, trans_a), self.desc(K, N, 2, trans_b)
        dst = self.desc(M, N, 3, False)
        attr = p()
        if beta:
            post_ops = p()
            self.check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)))
            lib.dnnl_post_ops_append_sum.argtypes = [p, ctypes.c_float, ctypes.c_int32,
                                                     ctypes.c_int]
            self.check(lib.dnnl_post_ops_append_sum(post_ops, beta, 0, 0))
            self.check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)))
            self.check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops))
        pd, prim = p(), p()
        self.check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), self.engine, src, wei,
                                                         None, dst, attr), "matmul descriptor")
        info = ctypes.c_char_p()
        lib.dnnl_primitive_desc_query(pd, 8, 0, ctypes.byref(info))  # dnnl_query_impl_info_str
        self.impl[(M, K, N, trans_a, trans_b)] = (info.value or b"?").decode()
        self.check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "matmul primitive")
        mems = []
        for md, arr in ((src, a), (wei, b), (dst, c)):
            mem = p()
            self.check(lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine,
                                              p(arr.ctypes.data)))
            mems.append(mem)

        class ExecArg(ctypes.Structure):
            _fields_ = [("arg", ctypes.c_int), ("memory", p)]

        args = (ExecArg * 3)(ExecArg(1, mems[0]), ExecArg(33, mems[1]), ExecArg(17, mems[2]))

        def run():
            self.check(lib.dnnl_primitive_execute(prim, self.stream, 3, args), "matmul")
            lib.dnnl_stream_wait(self.stream)

        return run


def rows_split():
    """dtrain's bf16 GEMM with MKL sequential, each of the Numba pool's threads (GNU OpenMP
    layer) computing its block of rows: how the kernels' pool would run it."""
    parts = int(os.environ.get("MKL_NUM_THREADS", "1"))
    os.environ.update(NUMBA_THREADING_LAYER="omp", NUMBA_NUM_THREADS=str(parts))
    from numba import njit, prange

    from dtrain.kernels import bf16

    gemm_rows = bf16.gemm_rows

    @njit(parallel=True)
    def split(fn, a, b, out, trans_a, trans_b, beta, parts):
        m = out.shape[0]
        for p in prange(parts):
            gemm_rows(fn, a, b, out, trans_a, trans_b, 1.0, beta, p * m // parts,
                      (p + 1) * m // parts)

    return split, parts, bf16.load("sequential").gemm_address


def median_call_s(run, budget_s):
    """Median seconds of one call, wall-clock and CPU time of this process (all its threads):
    two calls to warm up, then calls until budget_s (5 at least). On one pinned core shared
    with other people's work, the CPU time leaves out the time they had the core."""
    run()
    run()
    wall, cpu, start = [], [], time.perf_counter()
    while len(wall) < 5 or time.perf_counter() - start < budget_s:
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def worker(library, budget_s):
    """Time every shape with one library in this process; print one JSON line."""
    rng = np.random.default_rng(0)
    out = {"library": library, "results": {}}
    if library.startswith("mkl"):
        mkl = Mkl(3 if library == "mkl-bf16-gnu" else None)
        out["version"] = mkl.version
        fn = mkl.lib.cblas_sgemm if library == "mkl-sgemm" else mkl.lib.cblas_gemm_bf16bf16f32
    elif library == "dtrain-bf16-rows":
        split, parts, address = rows_split()
        out["version"] = f"dtrain.kernels.bf16, sequential MKL, rows split in {parts} (Numba)"
    elif library.startswith("onednn"):
        dnn = OneDnn()
        out["version"] = dnn.version
    else:
        from threadpoolctl import threadpool_info

        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        out["version"] = " ".join(f"{i.get('internal_api')} {i.get('version')} "
                                  f"{i.get('architecture')}" for i in info)
    for label, M, K, N, ta, tb, beta in SHAPES:
        a, b, c = operands(M, K, N, ta, tb, rng)
        if "bf16" in library:
            a, b = to_bf16_bits(a), to_bf16_bits(b)
        if library == "openblas-sgemm":  # NumPy's matmul: sgemm with beta = 0
            run = functools.partial(np.matmul, a.T if ta else a, b.T if tb else b, out=c)
        elif library.startswith("mkl"):
            run = functools.partial(mkl.call, fn, a, b, c, ta, tb, beta)
        elif library == "dtrain-bf16-rows":
            run = functools.partial(split, address, a, b, c, ta, tb, beta, parts)
        elif library == "onednn-gemm-bf16":
            run = functools.partial(dnn.gemm, a, b, c, ta, tb, beta)
        else:
            run = dnn.matmul(a, b, c, ta, tb, beta)
        s, cpu_s = median_call_s(run, budget_s)
        flop = 2.0 * M * K * N
        out["results"][label] = {"s": s, "gflops": flop / s / 1e9, "cpu_s": cpu_s,
                                 "cpu_gflops": flop / max(cpu_s, 1e-9) / 1e9}
    if library == "onednn-matmul-bf16":
        out["impl"] = sorted(set(dnn.impl.values()))
    print(json.dumps(out), flush=True)


def code_path(library, env):
    """What the library says it dispatched to (its verbose mode, one small call)."""
    env = dict(env, MKL_VERBOSE="1", ONEDNN_VERBOSE="1")
    code = ("import benchmarks.bf16_gemm as g, numpy as np\n"
            f"lib = {library!r}\n"
            "a = g.to_bf16_bits(np.ones((64, 64), np.float32))\n"
            "c = np.zeros((64, 64), np.float32)\n"
            "if lib.startswith('mkl'): m = g.Mkl(); m.call(m.lib.cblas_gemm_bf16bf16f32, a, a, c,"
            " False, False, 0.0)\n"
            "else: g.OneDnn().matmul(a, a, c, False, False, 0.0)()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if "MKL_VERBOSE" in ln or ",exec," in ln
             or ",info,cpu,isa" in ln]
    return lines[:3] or [proc.stderr.strip().splitlines()[-1:] or "no verbose output"]


def run_rounds(libraries, threads, rounds, budget_s, env):
    """{library: [worker output per round]}: libraries alternate inside every round."""
    runs = {lib: [] for lib in libraries}
    cpus = ",".join(str(i) for i in range(threads))
    env = dict(env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_DYNAMIC="FALSE")
    for r in range(rounds):
        order = libraries if r % 2 == 0 else libraries[::-1]
        for lib in order:
            load = os.getloadavg()[0]
            proc = subprocess.run(["taskset", "-c", cpus, sys.executable, os.path.abspath(__file__),
                                   "--worker", lib, "--budget", str(budget_s)],
                                  env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"# {lib}: left out ({last})", file=sys.stderr)
                runs[lib] = None
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            out["load_before"] = load
            runs[lib].append(out)
        libraries = [lib for lib in libraries if runs[lib] is not None]
    return {lib: r for lib, r in runs.items() if r}


def table(runs, threads, metric="gflops"):
    """Markdown: GFLOP/s per shape and library (median over rounds, [lowest-highest]), and
    the milliseconds of one step's GEMMs (STEP_CALLS of each shape, medians)."""
    libs = list(runs)
    clock = "CPU time" if metric == "cpu_gflops" else "wall clock"
    lines = [f"| M x K x N ({threads} thread{'s' * (threads > 1)}, {clock}) | "
             + " | ".join(libs) + " |", "|---" * (len(libs) + 1) + "|"]
    step_ms = dict.fromkeys(libs, 0.0)
    for label, M, K, N, ta, tb, beta in SHAPES:
        cells = []
        for lib in libs:
            g = sorted(r["results"][label][metric] for r in runs[lib])
            cells.append(f"{statistics.median(g):.0f} [{g[0]:.0f}-{g[-1]:.0f}]")
            step_ms[lib] += STEP_CALLS.get(label, 0) * 2e-6 * M * K * N / statistics.median(g)
        op = f"{'T' if ta else 'N'}{'T' if tb else 'N'}{', beta=1' if beta else ''}"
        lines.append(f"| {M}x{K}x{N} {op} ({label}) | " + " | ".join(cells) + " |")
    lines.append("| one step's GEMMs, ms (x16 recurrent, all 128 rows: an upper estimate) | "
                 + " | ".join(f"{step_ms[lib]:.1f}" for lib in libs) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of calls per shape")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--libraries", nargs="+", default=LIBRARIES,
                    choices=LIBRARIES + ["mkl-bf16-gnu", "dtrain-bf16-rows"],
                    help="also: MKL on GNU OpenMP; dtrain's rows split over Numba's threads")
    ap.add_argument("--isa", choices=sorted(ISA_CAPS), help="cap the dispatched instruction set")
    ap.add_argument("--json", help="write every round's numbers here")
    ap.add_argument("--render", help="print the tables of a --json file made before")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.budget)
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        for t, runs in report["threads"].items():
            print(table(runs, int(t)))
            first = next(iter(runs.values()))[0]["results"][SHAPES[0][0]]
            if int(t) == 1 and "cpu_gflops" in first:
                print(table(runs, 1, "cpu_gflops"))
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.isa:
        mkl_isa, dnnl_isa, core = ISA_CAPS[args.isa]
        env.update(MKL_ENABLE_INSTRUCTIONS=mkl_isa, ONEDNN_MAX_CPU_ISA=dnnl_isa,
                   OPENBLAS_CORETYPE=core)
    env["LD_LIBRARY_PATH"] = lib_dir() + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    # pip's onednn is built for SYCL: its CPU engine is the OpenCL CPU runtime that pip
    # installs (intel-opencl-rt) but does not register (its .icd names a build path)
    env.setdefault("OCL_ICD_FILENAMES", os.path.join(lib_dir(), "libintelocl.so"))
    report = {"isa_cap": args.isa, "paths": {}, "threads": {}}
    for lib in ("mkl-bf16", "onednn-matmul-bf16"):
        if lib in args.libraries:
            report["paths"][lib] = code_path(lib, env)
            print(f"# {lib} code path: {report['paths'][lib]}")
    for t in args.threads:
        runs = run_rounds(list(args.libraries), t, args.rounds, args.budget, env)
        report["threads"][t] = runs
        for lib, rs in runs.items():
            extra = f", impl {rs[0]['impl']}" if "impl" in rs[0] else ""
            loads = [f"{r['load_before']:.2f}" for r in rs]
            print(f"# {lib}: {rs[0]['version']}{extra}; 1-min load before each round {loads}")
        print(table(runs, t), flush=True)
        if t == 1:
            print(table(runs, t, "cpu_gflops"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
