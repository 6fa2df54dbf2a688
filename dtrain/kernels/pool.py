"""One pool of threads for OpenBLAS and the fused kernels (CPU, a rank with several threads).

A training step alternates GEMMs (OpenBLAS, on every thread of the rank) with
fused kernels (Numba). Run on one thread, the kernels leave the rank's other
cores idle for a sixth of the step; run on Numba's threads beside OpenBLAS's
own, the two pools' idle threads keep spinning on the same cores and steal
them from each other (docs/performance.md). OpenBLAS (0.3.27 and later)
lets the program run its parallel jobs instead
(``openblas_set_threads_callback_function``): ``install`` hands them to Numba's
threads, so one pool of threads does both, and the kernels may split their rows
across it (``CpuKernels`` does so while ``shared()`` is true).

OpenBLAS decides the jobs (how a GEMM is split, which thread packs what)
exactly as with its own threads, so every GEMM gives the same bits; ``install``
checks that on a GEMM before it keeps the callback. The jobs of one GEMM wait
for each other, so they must run at the same time on distinct threads: the
callback runs them as a ``prange`` over Numba's threads when there are enough
of them (each thread one job: the OpenMP and workqueue layers guarantee it, TBB
does not, so ``install`` refuses TBB), and otherwise on Python threads
(slower, never stuck).

A child forked from a process with the pool (``multiprocessing``'s default on
Linux) goes back to OpenBLAS's own threads and serial kernels: Numba's GNU
OpenMP runtime is not fork-safe. Set ``DTRAIN_BLAS_POOL=openblas`` to keep
OpenBLAS's own threads (and serial kernels) everywhere.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from .. import cores, env
from . import openblas

# void (*dojob)(int thread_num, void *jobdata, int dojob_data)
_DOJOB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
# void callback(int sync, dojob, int numjobs, size_t jobdata_elsize, void *jobdata, int dojob_data)
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t,
                             ctypes.c_void_p, ctypes.c_int)
_LAYERS = ("omp", "workqueue")  # each chunk of a prange on a thread of its own
_FALLBACK_SYMBOL = "dtrain_blas_jobs_on_python_threads"

_FORKED = "OpenBLAS's own threads (a forked child of a process with the pool)"

_state = {"shared": False, "threads": 1, "setters": [], "callback": None, "fallback": None,
          "forked": False, "why": "OpenBLAS's own threads"}


def shared() -> bool:
    """True while OpenBLAS runs its jobs on Numba's threads (the kernels may split too)."""
    return _state["shared"]


def threads() -> int:
    """The shared pool's threads (1 while OpenBLAS keeps its own: the kernels stay serial)."""
    return _state["threads"] if _state["shared"] else 1


def status() -> str:
    """One line for logs and the bench: which threads run the GEMMs' jobs, and why."""
    return _state["why"]


def note(why: str) -> None:
    """Set the line ``status()`` gives (why the pool is not in use)."""
    _state["why"] = why


def _run_on_python_threads(sync, dojob, numjobs, elsize, jobdata, data):
    # More jobs than Numba threads: a thread each (ctypes releases the GIL in dojob).
    job = _DOJOB(dojob)
    workers = [threading.Thread(target=job, args=(i, jobdata + i * elsize, data))
               for i in range(1, numjobs)]
    for worker in workers:
        worker.start()
    job(0, jobdata, data)
    for worker in workers:
        worker.join()


def _build_callback():
    """The C callback (a Numba cfunc) and the Python fallback it calls, kept alive together."""
    from llvmlite import binding as llvm
    from llvmlite import ir
    from numba import cfunc, njit, prange, types
    from numba.extending import intrinsic

    # the callback's C signature, pointers as integers (the same registers)
    signature = types.void(types.int32, types.intp, types.int32, types.intp, types.intp,
                           types.int32)

    @intrinsic
    def call_dojob(typingctx, fn, thread, jobdata, data):
        # dojob(thread, (void *) jobdata, data) through the pointer OpenBLAS passed
        def codegen(context, builder, signature, args):
            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32), i8p, ir.IntType(32)])
            target = builder.inttoptr(args[0], fnty.as_pointer())
            builder.call(target, [args[1], builder.inttoptr(args[2], i8p), args[3]])
            return context.get_dummy_value()
        return types.void(types.intp, types.int32, types.intp, types.int32), codegen

    @njit(parallel=True, nogil=True, cache=True)
    def run_jobs(dojob, numjobs, elsize, jobdata, data):
        # numjobs <= the pool's threads: the scheduler gives each thread at most one job
        for i in prange(numjobs):
            call_dojob(dojob, np.int32(i), jobdata + i * elsize, data)

    # fixed uuids, so that the callback caches (kernels/cpu.py)
    for helper in (call_dojob, run_jobs):
        try:
            helper._set_uuid(f"dtrain.kernels.pool.{helper.__name__}.v1")
        except (AttributeError, AssertionError):
            pass

    # The fallback is a C symbol of this process (its address registered under a name),
    # called by name, like Numba's own helpers.
    fallback = _CALLBACK(_run_on_python_threads)
    llvm.add_symbol(_FALLBACK_SYMBOL, ctypes.cast(fallback, ctypes.c_void_p).value)
    run_on_python_threads = types.ExternalFunction(_FALLBACK_SYMBOL, signature)
    # Numba's threading layer registers this symbol when it starts: the pool's threads for
    # the calling thread (numba.get_num_threads() goes through a ctypes pointer instead)
    pool_threads = types.ExternalFunction("get_num_threads", types.int32())

    # Not cached (its closure pickles differently in every process: each run would add
    # an entry to the cache); with run_jobs loaded from the cache it compiles in ~0.1 s.
    @cfunc(signature)
    def callback(sync, dojob, numjobs, elsize, jobdata, data):
        if numjobs <= pool_threads():
            run_jobs(dojob, numjobs, elsize, jobdata, data)
        else:
            run_on_python_threads(sync, dojob, numjobs, elsize, jobdata, data)

    return callback, fallback


def _setters():
    """The callback setters of every OpenBLAS loaded in this process (NumPy's, SciPy's ...)."""
    found = []
    for library in openblas.loaded():
        setter = library.symbol("openblas_set_threads_callback_function")
        if setter is None:
            return [], f"{library.path} (OpenBLAS {library.version}) has no threads callback"
        setter.argtypes, setter.restype = [ctypes.c_void_p], None
        found.append(setter)
    if not found:
        return [], "no OpenBLAS loaded"
    return found, ""


def _threading_layer():
    """Numba's threading layer, started now if it was not (OpenMP preferred)."""
    import numba
    from numba import njit, prange

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run in this process yet
        if not (os.environ.get("NUMBA_THREADING_LAYER")
                or os.environ.get("NUMBA_THREADING_LAYER_PRIORITY")):
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

    @njit(parallel=True, cache=True)
    def touch(x):
        for i in prange(x.size):
            x[i] += 1.0

    touch(np.zeros(4))
    return numba.threading_layer()


def _gemm_bits():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((192, 320)).astype(np.float32)
    b = rng.standard_normal((320, 448)).astype(np.float32)
    return (a @ b).tobytes()


def uninstall() -> None:
    """OpenBLAS runs its jobs on its own threads again."""
    for setter in _state["setters"]:
        setter(None)
    _state.update(shared=False, setters=[], why="OpenBLAS's own threads")


def _forget_in_child() -> None:
    # A forked child must not start Numba's GNU OpenMP threads (Numba terminates it: the
    # runtime is not fork-safe); OpenBLAS re-creates its own threads after a fork.
    uninstall()
    _state.update(forked=True, why=_FORKED)


def _oversubscribed(threads: int, ranks_on_node: int) -> int | None:
    """The cores available when this rank's threads (and its neighbours') would exceed them."""
    usable, bound = cores.usable_cores()
    # a rank bound to its own cores by the launcher has only itself to fit there
    wanted = threads if bound else threads * max(1, ranks_on_node)
    return usable if wanted > usable else None


def install(threads: int, ranks_on_node: int = 1) -> bool:
    """Run OpenBLAS's parallel jobs on Numba's threads (``threads`` of them); True if it does.

    Called with the rank's thread count after BLAS and Numba were set to it. One
    thread, more threads than cores (Numba's OpenMP threads spin without yielding,
    slower than OpenBLAS's own threads), a BLAS without the callback, TBB, or
    ``DTRAIN_BLAS_POOL=openblas`` leave OpenBLAS's own threads in charge (``status()``
    says which and why).
    """
    if (env.get("DTRAIN_BLAS_POOL") or "").lower() == "openblas":
        uninstall()
        _state["why"] = "OpenBLAS's own threads (DTRAIN_BLAS_POOL=openblas)"
        return False
    if threads <= 1:
        uninstall()
        _state["why"] = "one thread: no pool"
        return False
    try:
        import numba
    except ImportError:
        _state["why"] = "OpenBLAS's own threads (no Numba)"
        return False
    if threads > numba.config.NUMBA_NUM_THREADS:
        uninstall()
        _state["why"] = (f"OpenBLAS's own threads ({threads} threads > Numba's "
                         f"{numba.config.NUMBA_NUM_THREADS})")
        return False
    if _state["forked"]:
        uninstall()
        _state["why"] = _FORKED
        return False
    available = _oversubscribed(threads, ranks_on_node)
    if available is not None:
        uninstall()
        _state["why"] = (f"OpenBLAS's own threads ({threads} threads x {ranks_on_node} rank(s) on "
                         f"{available} cores: oversubscribed)")
        return False
    if _state["shared"]:
        _state["threads"] = threads
        return True
    try:
        setters, why = _setters()
    except Exception as exc:  # threadpoolctl missing or a library it cannot read
        setters, why = [], f"cannot inspect the BLAS ({exc})"
    if not setters:
        _state["why"] = f"OpenBLAS's own threads ({why})"
        return False
    layer = _threading_layer()
    if layer not in _LAYERS:
        _state["why"] = (f"OpenBLAS's own threads (Numba's {layer} layer may run two jobs "
                         "on one thread)")
        return False
    if _state["callback"] is None:
        _state["callback"], _state["fallback"] = _build_callback()
        os.register_at_fork(after_in_child=_forget_in_child)
    expected = _gemm_bits()
    for setter in setters:
        setter(_state["callback"].address)
    _state.update(shared=True, setters=setters, threads=threads)
    if _gemm_bits() != expected:  # never seen; would mean OpenBLAS splits differently
        uninstall()
        _state["why"] = "OpenBLAS's own threads (a GEMM on the shared pool gave other bits)"
        return False
    _state["why"] = f"one pool: OpenBLAS's jobs and the kernels on Numba's {layer} threads"
    return True
