"""The GEMM floor of a training step, and where the rest of the step goes (CPU, one rank).

**GEMM floor.** During a profiled step every GEMM (the step makes them all through
one seam, the model's ``Gemm``, dtrain/kernels/gemm.py, including the recurrent ones
inside the CPU kernels' compiled LSTM loops, which time theirs with the time-stamp
counter only while a recorder listens) is told to this profiler, the seam's
recorder: shapes, dtype, strides (so transposed views stay transposed) and which
buffer each operand lives in. The recorded GEMMs are then replayed alone, in
the same order, on preallocated arrays of the same layouts (operands that
shared a buffer in the step share one in the replay), and timed: the median
of several replays is the floor, the time the step could not go below while
it does these GEMMs with this BLAS. It is an optimistic floor: nothing else
runs between the GEMMs, so their operands stay in cache.

**Breakdown.** The same profiled steps time, by wrapping the public calls of the
model's kernel set, its layers, Adam and the accumulator for the duration of the
step, each part that is not a GEMM: the cells' fused gate
kernels, the softmax and loss, the embedding lookup and its sparse gradient,
the other row gathers, the reducer, the finite checks, Adam and the packing of
the captions (only the outermost wrapped call is timed, so nothing counts
twice). What no wrapper covers is Python plus the small NumPy operations
between the wrapped calls (bias adds, bias-gradient sums, copies, fills). The
Python part is measured by running the same steps, on the same caption
lengths (so the same time steps and the same calls), with a model of width 4:
there every NumPy call costs only its call overhead, so the unwrapped time of
that step is the interpreter's and NumPy's per-call overhead. The remainder
is the size-dependent work of the small NumPy operations.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import numpy as np

# (key, label) in the order they are printed
CATEGORIES = (
    ("gemm", "GEMMs, inside the step"),
    ("gates", "gate kernels (fused cell step forward/backward)"),
    ("softmax", "softmax + loss (fused, in place)"),
    ("embedding", "embedding lookup and sparse gradient"),
    ("gathers", "row gathers and scatters (the scored rows and their gradient)"),
    ("reduce", "gradient reduce (one rank: W_embed row scatter)"),
    ("finite", "finite checks of loss and gradients"),
    ("adam", "Adam (fused, flat buffers)"),
    ("packing", "packing the captions"),
    ("batch", "batch assembly (sampler rows -> captions, features)"),
    ("python", "Python and NumPy per-call overhead"),
    ("elementwise", "the rest: copies, fills, transposes, the feature gather (not wrapped)"),
)
FLOOR_REPEATS = 5
TINY_WIDTH = 4


def _layout(x):
    """(data pointer, shape, byte strides, dtype) of an ndarray operand."""
    x = np.asarray(x)
    return (x.__array_interface__["data"][0], x.shape, x.strides, x.dtype.str)


class _Patches:
    """Set attributes for the length of a ``with`` block, and put the originals back."""

    def __init__(self):
        self._undo = []

    def set(self, obj, name, value):
        own = isinstance(obj, type(np)) or name in getattr(obj, "__dict__", {})
        self._undo.append((obj, name, getattr(obj, name), own))
        setattr(obj, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for obj, name, old, own in reversed(self._undo):
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._undo.clear()


def _layouts(a, b, out, kind):
    """The recorder's operands (arrays, or layouts a compiled loop gave) as layouts."""
    return [tuple(x if isinstance(x, tuple) else _layout(x) for x in (a, b, out)) + (kind,)]


class StepProfiler:
    """Times the parts of the steps run inside ``with profiler.active(step parts):``."""

    def __init__(self):
        self.times = defaultdict(float)
        self._gemms = []  # (a, b, out, kind) of every GEMM (operand layouts), in call order
        # What the step's GEMMs were called with, made into layouts only when asked for
        # (``gemms``), after the step: the bookkeeping is then not counted as the step's
        # own time.
        self._pending = []
        self.time_steps = 0  # recurrent time steps (packed batch_sizes) of the steps profiled
        self.kernel_gemms = {}  # kind -> the model's GEMM call that replays it
        self._depth = 0
        self._inner_gemm = 0.0  # seconds of the GEMMs inside the wrapped call now running

    def reset(self):
        self.times = defaultdict(float)
        self._gemms, self._pending = [], []
        self.time_steps = 0

    @property
    def gemms(self):
        """(a, b, out, kind) operand layouts of every GEMM recorded, in call order."""
        for layouts, args in self._pending:
            self._gemms.extend(layouts(*args))
        self._pending.clear()
        return self._gemms

    def _timed(self, category, fn, record=None):
        """``fn`` timed into ``category`` (a name, or a function of the call's arguments),
        less the GEMMs recorded inside it (those count as "gemm")."""
        prof = self

        def wrapper(*args, **kwargs):
            if prof._depth:  # inside another wrapped call: counted there
                return fn(*args, **kwargs)
            prof._depth += 1
            prof._inner_gemm = 0.0
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                prof._depth -= 1
                key = category if isinstance(category, str) else category(args)
                prof.times[key] += max(0.0, elapsed - prof._inner_gemm)
            if record is not None:
                record(args, kwargs, result)
            return result

        return wrapper

    def record_gemm(self, kind, a, b, out, seconds):
        """The model's GEMM recorder (``Gemm.recorder``, dtrain/kernels/gemm.py): one GEMM,
        its operands and the seconds it took."""
        self._pending.append((_layouts, (a, b, out, kind)))
        self.times["gemm"] += seconds
        if self._depth:
            self._inner_gemm += seconds

    def active(self, model, adam, reducer):
        """A context in which the model's GEMM seam records to this profiler and the step's
        parts are wrapped (the model's kernel set, its layers, Adam, the accumulator)."""
        from .. import step as step_module
        from ..nn import layers

        p = _Patches()

        def record_packing(args, kwargs, packed):
            self.time_steps += len(packed.batch_sizes)

        gemm = model.gemm
        self.kernel_gemms = {"matmul": gemm.matmul, "accumulate": gemm.accumulate,
                             "transposed": gemm.transposed}
        p.set(gemm, "recorder", self.record_gemm)
        w_embed = model.params["W_embed"]
        rows_of = lambda a: "embedding" if a[0] is w_embed else "gathers"  # noqa: E731
        kern = model.kernels
        if kern is not None:
            kern.ticks_to_seconds(0)  # the counter's rate, measured now rather than inside a step
            for name in ("lstm_forward_loop", "lstm_backward_loop"):  # their GEMMs: recorded
                if hasattr(kern, name):
                    p.set(kern, name, self._timed("gates", getattr(kern, name)))
            for name in ("gather_rows", "scatter_rows"):
                if hasattr(kern, name):
                    p.set(kern, name, self._timed(rows_of, getattr(kern, name)))
            for name in model.cell.kernels:
                if hasattr(kern, name):
                    p.set(kern, name, self._timed("gates", getattr(kern, name)))
            p.set(kern, "softmax_cross_entropy", self._timed("softmax", kern.softmax_cross_entropy))
            p.set(kern, "all_finite", self._timed("finite", kern.all_finite))
        p.set(layers, "softmax_cross_entropy",
              self._timed("softmax", layers.softmax_cross_entropy))
        p.set(layers, "embedding_grad_sparse",
              self._timed("embedding", layers.embedding_grad_sparse))
        p.set(step_module, "pack_captions",
              self._timed("packing", step_module.pack_captions, record_packing))
        for name in ("start", "add", "finish"):  # the step's accumulator (and its reduction)
            if hasattr(reducer, name):
                p.set(reducer, name, self._timed("reduce", getattr(reducer, name)))
        p.set(adam, "step", self._timed("adam", adam.step))
        return p


def replay_ops(gemms, seed=0):
    """[(a, b, out)] arrays with the recorded shapes, strides and dtypes; operands that lived in
    one buffer in the step (the same data pointer) are views of one buffer here too."""
    rng = np.random.default_rng(seed)
    extent = {}
    gemms = [call[:3] for call in gemms]
    for call in gemms:
        for ptr, shape, strides, dt in call:
            if any(s < 0 for s in strides):
                raise ValueError("negative strides in a recorded GEMM operand")
            item = np.dtype(dt).itemsize
            size = item + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else item
            extent[(ptr, dt)] = max(extent.get((ptr, dt), 0), size)
    buffers = {}
    for (ptr, dt), size in extent.items():
        buf = np.empty(-(-size // np.dtype(dt).itemsize), dtype=dt)
        buf[...] = rng.standard_normal(buf.shape) * 0.1
        buffers[(ptr, dt)] = buf
    return [tuple(np.lib.stride_tricks.as_strided(buffers[(ptr, dt)], shape, strides)
                  for ptr, shape, strides, dt in call) for call in gemms]


def replay_gemms(gemms, repeats=FLOOR_REPEATS, seed=0, kernel_gemms=None, operands_fixed=None):
    """Median seconds of the recorded GEMMs run alone, in order, on arrays of the same layouts.
    ``kernel_gemms`` maps the kinds of GEMM the kernels made ("accumulate": out += a @ b;
    "transposed": out = a @ b.T) to the calls that replay them; "matmul" is numpy.matmul.
    ``operands_fixed`` (the step's ``Gemm.operands_fixed``), when given, is opened around the
    replay with every operand: a Gemm that converts its operands (bf16) converts each once,
    before the timing, as the step's kernels hand it their operands already converted; the
    floor is then the GEMMs' own time."""
    if not gemms:
        return 0.0
    if operands_fixed is not None:
        ops = replay_ops(gemms, seed)
        inputs = list({id(x): x for _, *call in _with_ops(gemms, ops) for x in call[:2]}.values())
        with operands_fixed(*inputs):
            return _replay(gemms, ops, repeats, kernel_gemms)
    return _replay(gemms, replay_ops(gemms, seed), repeats, kernel_gemms)


def _with_ops(gemms, ops):
    return [(call[3], *o) for call, o in zip(gemms, ops)]


def _replay(gemms, ops, repeats, kernel_gemms):

    def matmul(a, b, out):
        np.matmul(a, b, out=out)

    replay = {"matmul": matmul, **(kernel_gemms or {})}
    missing = {call[3] for call in gemms} - set(replay)
    if missing:
        raise ValueError(f"GEMMs of kind {sorted(missing)} were recorded: replay them with the "
                         "kernels' calls")
    calls = [(replay[kind], *o) for kind, *o in _with_ops(gemms, ops)]
    # one warm pass: pages touched, BLAS threads awake (an accumulating GEMM adds to the gate
    # rows the input projection wrote just before it, as in the step: nothing grows)
    for fn, a, b, out in calls:
        fn(a, b, out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for fn, a, b, out in calls:
            fn(a, b, out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiny_captions(captions, null_idx, vocab_size=8):
    """The same caption lengths with word ids in [1, vocab_size) (NULL -> 0): same packing."""
    c = np.asarray(captions)
    return np.where(c == null_idx, 0, 1 + c % (vocab_size - 1)).astype(c.dtype)


def profile_steps(build, model, adam, reducer, step, batches, normalizer, batch_ms):
    """GEMM floor and breakdown of ``step`` over ``batches`` [(captions, features)].

    ``build(vocab_size, input_dim, width) -> (model, adam, reducer, step)`` makes the
    same step for another model size (the width-4 run that measures the overhead).
    Returns a dict of milliseconds (medians over the batches).
    """
    prof = StepProfiler()
    totals, floors, counts, parts, steps_t = [], [], [], defaultdict(list), []
    for captions, features in batches:
        prof.reset()
        with prof.active(model, adam, reducer):
            t0 = time.perf_counter()
            step(features, captions, normalizer, 1e-3)
            totals.append(time.perf_counter() - t0)
        for key, _ in CATEGORIES:
            parts[key].append(prof.times.get(key, 0.0))
        steps_t.append(prof.time_steps)
        counts.append(len(prof.gemms))
        floors.append(replay_gemms(prof.gemms, kernel_gemms=prof.kernel_gemms,
                                   operands_fixed=model.gemm.operands_fixed))

    t_model, t_adam, t_reducer, t_step = build(8, TINY_WIDTH, TINY_WIDTH)
    tiny = [(tiny_captions(c, model.null_idx), np.zeros((c.shape[0], TINY_WIDTH), np.float32))
            for c, _ in batches]
    for c, f in tiny[:2]:  # warm up (first call of a shape)
        t_step(f, c, normalizer, 1e-3)
    tiny_totals, tiny_rest = [], []
    for c, f in tiny:
        prof.reset()
        with prof.active(t_model, t_adam, t_reducer):
            t0 = time.perf_counter()
            t_step(f, c, normalizer, 1e-3)
            total = time.perf_counter() - t0
        tiny_totals.append(total)
        tiny_rest.append(total - sum(prof.times.values()))

    med = statistics.median
    ms = {key: 1e3 * med(v) for key, v in parts.items()}
    total_ms = 1e3 * med(totals)
    wrapped = sum(ms.values())
    python_ms = min(max(0.0, 1e3 * med(tiny_rest)), max(0.0, total_ms - wrapped))
    ms["batch"] = batch_ms
    ms["python"] = python_ms
    ms["elementwise"] = max(0.0, total_ms - wrapped - python_ms)
    time_steps = med(steps_t)
    # each profiled step against the replay of its own GEMMs, taken right after it: a ratio
    # that the slow drifts of a shared machine do not move much (the timed median may be
    # minutes away from the replays)
    paired = (med([(t + batch_ms / 1e3) / f for t, f in zip(totals, floors) if f > 0])
              if any(floors) else None)
    # the same with the step's GEMMs counted at their replayed time: floor + the step's own
    # not-GEMM time, over the floor. Steadier still: a phase of the host that slows the
    # GEMMs inside the step but not their replay (or the other way round) cannot move it.
    gemm_t = parts["gemm"]
    rest = (med([(f + t - g + batch_ms / 1e3) / f
                 for t, g, f in zip(totals, gemm_t, floors) if f > 0])
            if any(floors) else None)
    return {"step_over_floor": paired, "not_gemm_over_floor": rest,
        "floor_ms": 1e3 * med(floors), "floor_gemms": int(med(counts)),
        "floor_batches": len(batches),
        "floor_repeats": FLOOR_REPEATS, "profiled_step_ms": total_ms + batch_ms,
        "breakdown_ms": ms, "time_steps": time_steps,
        "python_us_per_time_step": 1e3 * python_ms / time_steps if time_steps else 0.0,
        "tiny_step_ms": 1e3 * med(tiny_totals),
    }
