#!/usr/bin/env bash
# The GPU checks of dtrain in one go (a few minutes on one H100):
#   1. set up: the gpu extra (CuPy) and PyTorch if missing; MPI wheels carried in .whl
#   2. what is there: GPU, driver, CUDA, CuPy, PyTorch, MPI (and whether it is CUDA-aware)
#   3. the GPU tests: every test marked gpu under tests/ (kernels vs reference, GPU vs CPU,
#      graphs vs eager, 2 ranks sharing the GPU vs 1 rank, CuPy collectives, and any added later)
#   4. the checks CI also runs without a GPU, here with this machine's CuPy and NVRTC: every
#      CUDA source compiled by NVRTC for compute/sm 70, 80, 90 with its kernel names checked
#      (tests/test_nvrtc.py) and the GPU step's host logic (tests/test_gpu_host.py)
#   5. the benchmark: dtrain (graphed and eager) vs PyTorch cuDNN, float32, N=128 and N=512
#   6. a summary table
# Usage: tests/gpu_check.sh [OUTDIR]     (PYTHON=... picks the interpreter; OUTDIR, else $OUT,
# else /tmp/dtrain-gpu-check receives pytest.log, host.log, bench.log, bench-*.json, env.txt,
# summary.txt). Without a GPU the GPU tests skip with their reason and the benchmark is left
# out. A CUDA 13 CuPy (NVRTC 13 has no sm_70) fails step 4 at sm70: say so, it is not a bug.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${1:-${OUT:-/tmp/dtrain-gpu-check}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
fi
STEPS=${GPU_CHECK_STEPS:-50}

# --- 1. set-up ---------------------------------------------------------------------------
# MPI wheels carried in .whl (a machine with no package index): a small venv over $PY's
# packages, so that libmpi and mpiexec sit beside the interpreter as they do in .venv.
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "
import os, sys
import mpi4py.MPI
sys.exit(not os.path.exists(os.path.join(os.path.dirname(sys.executable), 'mpiexec')))" >/dev/null 2>&1; then
    VENV=/tmp/dtrain-gpu-venv
    echo "[gpu_check] MPI from .whl into $VENV (over $PY's packages)"
    if "$PY" -m venv --without-pip "$VENV" \
        && BASE_SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
        && VENV_SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
        && echo "import site; site.addsitedir('$BASE_SITE')" > "$VENV_SITE/zz_base_site.pth" \
        && "$PY" -m pip install -q --no-index --no-deps --no-compile --ignore-installed --prefix "$VENV" .whl/*.whl
    then
        PY=$VENV/bin/python
    else
        echo "[gpu_check] could not set up MPI from .whl; going on with $PY"
    fi
fi
if ! "$PY" -c "import cupy" >/dev/null 2>&1; then
    echo "[gpu_check] installing the gpu extra (cupy-cuda12x)"
    "$PY" -m pip install -q --retries 0 --timeout 20 "cupy-cuda12x>=13" \
        || echo "[gpu_check] could not install cupy-cuda12x (no package index?)"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[gpu_check] installing torch (for benchmarks.compare_torch)"
    "$PY" -m pip install -q --retries 0 --timeout 20 torch || echo "[gpu_check] could not install torch"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# --- 2. environment ----------------------------------------------------------------------
"$PY" - <<'EOF' 2>&1 | tee "$OUTDIR/env.txt"
import datetime, platform, sys
print("date      :", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("python    :", sys.version.split()[0], sys.executable)
import numpy; print("numpy     :", numpy.__version__)
try:
    import cupy as cp
    print("cupy      :", cp.__version__, "| CUDA available:", cp.cuda.is_available())
    if cp.cuda.is_available():
        p = cp.cuda.runtime.getDeviceProperties(0)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        print("gpu       :", name, f"({p['totalGlobalMem'] / 2**30:.0f} GiB, {p['multiProcessorCount']} SMs,"
              f" cc {p['major']}.{p['minor']})")
        print("cuda      : runtime", cp.cuda.runtime.runtimeGetVersion(), "driver", cp.cuda.runtime.driverGetVersion())
except Exception as e:
    print("cupy      : not usable:", type(e).__name__, e)
try:
    from cupy_backends.cuda.libs import nvrtc
    v = nvrtc.getVersion()
    libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if "libnvrtc.so" in ln})
    print("nvrtc     :", f"{v[0]}.{v[1]}", libs[0] if libs else "")
except Exception as e:
    print("nvrtc     : not usable:", type(e).__name__, e)
try:
    import torch
    print("torch     :", torch.__version__, "| cuda:", torch.cuda.is_available(),
          "| cudnn:", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
except Exception as e:
    print("torch     : not importable:", e)
try:
    from mpi4py import MPI
    from dtrain.parallel.comm import _query_cuda_aware
    print("mpi       :", MPI.Get_library_version().splitlines()[0], "| CUDA-aware:", _query_cuda_aware(MPI))
except Exception as e:
    print("mpi       : not usable:", e)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUTDIR/env.txt"
HAVE_GPU=$("$PY" -c "from dtrain.backend import gpu_available; print(int(gpu_available()))" 2>/dev/null || echo 0)

# --- 3. GPU tests ------------------------------------------------------------------------
echo "[gpu_check] pytest -m gpu tests/"
T0=$(date +%s)
"$PY" -m pytest -q -rs -m gpu -p no:cacheprovider --timeout 150 tests 2>&1 | tee "$OUTDIR/pytest.log"
PYTEST_RC=${PIPESTATUS[0]}
echo "[gpu_check] pytest exit $PYTEST_RC in $(( $(date +%s) - T0 )) s"

# --- 4. compile check and host logic (what CI runs without a GPU) -------------------------
echo "[gpu_check] NVRTC compile check and GPU host logic"
"$PY" -m pytest -q -rs -p no:cacheprovider --timeout 150 tests/test_nvrtc.py tests/test_gpu_host.py \
    2>&1 | tee "$OUTDIR/host.log"
HOST_RC=${PIPESTATUS[0]}

# --- 5. benchmark ------------------------------------------------------------------------
: > "$OUTDIR/bench.log"
if [ "$HAVE_GPU" = "1" ]; then
    for N in 128 512; do
        "$PY" -m benchmarks.compare_torch --device gpu -N "$N" --steps "$STEPS" --warmup 5 \
            --json "$OUTDIR/bench-lstm-N$N.json" 2>&1 | tee -a "$OUTDIR/bench.log"
    done
    "$PY" -m benchmarks.compare_torch --device gpu --cell rnn -N 128 --steps "$STEPS" --warmup 5 \
        --json "$OUTDIR/bench-rnn-N128.json" 2>&1 | tee -a "$OUTDIR/bench.log"
else
    echo "[gpu_check] no usable GPU here: benchmark skipped" | tee -a "$OUTDIR/bench.log"
fi

# --- 6. summary --------------------------------------------------------------------------
"$PY" - "$OUTDIR" "$PYTEST_RC" "$HOST_RC" <<'EOF' 2>&1 | tee "$OUTDIR/summary.txt"
import glob, json, os, re, sys
out, rc, host_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for title, name, code in (("GPU tests", "pytest.log", rc),
                          ("NVRTC compile + host logic", "host.log", host_rc)):
    log = open(os.path.join(out, name)).read()
    last = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    print(f"{title}: exit {code}: {last[-1].strip('= ') if last else 'no result line'}")
rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "bench-*.json")))]
if rows:
    print(f"{'cell':5} {'N':>4} {'T':>3} {'graphed ms':>10} {'eager ms':>9} {'torch ms':>9} "
          f"{'dtrain/torch':>12} {'eager gaps':>10} {'graph idle':>10}  step")
    for r in rows:
        print(f"{r['cell']:5} {r['N']:>4} {r['fixed_T']:>3} {r['graph_wall_ms']:10.3f} {r['eager_wall_ms']:9.3f} "
              f"{r.get('torch_median_ms', float('nan')):9.3f} {r.get('speedup_vs_torch', float('nan')):11.2f}x "
              f"{100 * r['eager_launch_gap_share']:9.1f}% {100 * r['graph_idle_share']:9.1f}%  {r['step_mode']}")
    print("dtrain/torch > 1: dtrain faster (PyTorch ms / dtrain graphed ms). eager gaps: share of the "
          "eager step that is not kernel work (1 - graph device time / eager wall time).")
EOF
[ "$PYTEST_RC" -ne 0 ] && exit "$PYTEST_RC"
exit "$HOST_RC"
