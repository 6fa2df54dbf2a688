"""The GPU step's host-side decisions, tested without a GPU (issue 27).

``step/gpu_plan.py`` and ``backend.device_for_rank`` are what ``GpuTrainStep`` and
``backend.select`` call: the pinned staging layout (one buffer, one copy per step),
the graph cache key per batch shape and its eviction, the gradient reduce path for a
CUDA-aware or plain MPI, and the device of each local rank. Expected values are
worked out by hand here, not recomputed the way the code computes them.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dtrain.backend import DeviceError, device_for_rank
from dtrain.nn.model import fixed_batch
from dtrain.step import gpu_plan
from helpers import random_captions

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
NULL = 0


# ---------------------------------------------------------------------------- staging


def _offsets(layout):
    return {f.name: (f.offset, f.nbytes) for f in layout.fields}


def test_staging_sizes_small_float32():
    # N=4, T=3 (M=12), D=5: every field fits one 256-byte slot
    layout = gpu_plan.staging_layout(4, 3, 5, np.float32)
    assert _offsets(layout) == {
        "features": (0, 80), "weights": (256, 48), "hyper": (512, 16), "words": (768, 48),
        "targets": (1024, 48), "order": (1280, 48), "seg_start": (1536, 52), "ids": (1792, 48)}
    assert layout.nbytes == 2048


@pytest.mark.parametrize(("dtype", "total"), [(np.float32, 311808), (np.float64, 582144)])
def test_staging_sizes_bench_shape(dtype, total):
    # N=128, T=16 (M=2048), D=512: features 256 KiB (512 KiB in float64), M int32 = 8 KiB,
    # seg_start M+1 int32 = 8196 B in a 8448 B slot, hyper 16 B in a 256 B slot
    layout = gpu_plan.staging_layout(128, 16, 512, dtype)
    off = _offsets(layout)
    feat = 128 * 512 * np.dtype(dtype).itemsize
    assert off["features"] == (0, feat)
    assert off["seg_start"][1] == 8196 and off["ids"][0] - off["seg_start"][0] == 8448
    assert layout.nbytes == total


@pytest.mark.parametrize(("N", "T", "D"), [(1, 1, 1), (3, 7, 9), (33, 5, 17), (128, 16, 512)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_staging_fields_aligned_and_disjoint(N, T, D, dtype):
    layout = gpu_plan.staging_layout(N, T, D, dtype)
    end = 0
    for f in layout.fields:
        assert f.offset % gpu_plan.STAGING_ALIGN == 0, f
        assert f.offset >= end, f"{f.name} overlaps the field before it"
        assert f.nbytes == int(np.prod(f.shape)) * f.dtype.itemsize
        end = f.offset + f.nbytes
    assert end <= layout.nbytes < end + gpu_plan.STAGING_ALIGN


def _batch(seed, N, width):
    """Features and captions (N, width+1) whose longest caption fills the width (T = width)."""
    rng = np.random.default_rng(seed)
    caps = random_captions(rng, N, width, 40)
    caps[0, 1:width], caps[0, width] = rng.integers(4, 40, width - 1), 2
    return rng.standard_normal((N, 6)), caps


def test_one_byte_copy_carries_the_whole_step():
    """Host views filled, the buffer copied byte for byte (as the one async copy does),
    device-side views of the copy hold every input; a second batch of the same shape
    overwrites every byte the first one set."""
    layout = None
    for seed in (1, 2):
        features, caps = _batch(seed, N=5, width=9)
        fb = fixed_batch(caps, NULL, np.float64)
        if layout is None:
            layout = gpu_plan.staging_layout(fb.N, fb.T, 6, np.float64)
            host_bytes = np.full(layout.nbytes, 0xAB, dtype=np.uint8)  # stale garbage
            host = gpu_plan.staging_views(host_bytes, layout)
        assert (fb.N, fb.T) == (5, 9) and host["words"].shape == (45,)
        gpu_plan.fill_staging(host, features, fb, hyper=(0.25, 4.0))
        device = gpu_plan.staging_views(host_bytes.copy(), layout)
        np.testing.assert_array_equal(device["features"], features)
        for name in gpu_plan.BATCH_FIELDS:
            np.testing.assert_array_equal(device[name], getattr(fb, name), err_msg=name)
        assert device["hyper"].tolist() == [0.25, 4.0]


def test_staging_views_refuse_a_buffer_of_another_size():
    layout = gpu_plan.staging_layout(2, 2, 3, np.float32)
    with pytest.raises(ValueError, match="staging buffer"):
        gpu_plan.staging_views(np.zeros(layout.nbytes - 256, np.uint8), layout)


# ---------------------------------------------------------------------------- graph cache


def _key(caps, normalizer=8, fuse_adam=False):
    fb = fixed_batch(caps, NULL)
    return gpu_plan.graph_key(fb.N, fb.T, normalizer, fuse_adam)


def test_graph_key_is_the_shape_not_the_padding():
    caps = np.zeros((3, 12), np.int32)
    caps[:, 0] = 1
    caps[0, 1:6], caps[0, 6] = 7, 2  # longest caption: 5 words + <END> -> T = 6
    caps[1, 1:3], caps[1, 3] = 9, 2
    wider = np.zeros((3, 20), np.int32)
    wider[:, :12] = caps
    assert _key(caps) == _key(wider) == (3, 6, 8.0, False)
    other_words = caps.copy()
    other_words[0, 1:6] = 11
    assert _key(other_words) == _key(caps)
    longer = caps.copy()
    longer[1, 1:8], longer[1, 8] = 5, 2  # 7 words + <END> -> T = 8
    assert _key(longer).T == 8
    assert _key(caps[:2]).N == 2 and _key(caps[:2]) != _key(caps)
    # the normaliser and Adam-in-the-graph are baked into a capture: they key it too
    assert _key(caps, normalizer=8) == _key(caps, normalizer=8.0)
    assert _key(caps, normalizer=9) != _key(caps)
    assert _key(caps, fuse_adam=1) == _key(caps, fuse_adam=True) != _key(caps)


def test_shape_to_evict():
    a, b, c = (gpu_plan.graph_key(n, 4, 1, False) for n in (1, 2, 3))
    assert gpu_plan.shape_to_evict({a: 5, b: 1}, 3) is None  # room left
    assert gpu_plan.shape_to_evict({a: 5, b: 1, c: 2}, 3) == b  # least used
    assert gpu_plan.shape_to_evict({a: 5, b: 1, c: 1}, 3) == b  # tie: the oldest
    assert gpu_plan.shape_to_evict({c: 9}, 1) == c
    with pytest.raises(ValueError):
        gpu_plan.shape_to_evict({}, 0)


def test_shape_cache_over_a_stream_of_batches():
    """Shapes A A B C A C D into a cache of 2, as GpuTrainStep._shape keeps it: C
    evicts B (A used twice), D evicts C (A used three times, C twice)."""
    A, B, C, D = (gpu_plan.graph_key(8, t, 8, False) for t in (3, 4, 5, 6))
    uses, evicted = {}, []
    for key in (A, A, B, C, A, C, D):
        if key not in uses:
            old = gpu_plan.shape_to_evict(uses, 2)
            if old is not None:
                evicted.append(old)
                del uses[old]
            uses[key] = 0
        uses[key] += 1
    assert evicted == [B, C]
    assert uses == {A: 3, D: 1}


# ---------------------------------------------------------------------------- reduce path


def test_reduce_path_choice():
    assert gpu_plan.reduce_path(1, True).kind == "none"
    assert gpu_plan.reduce_path(1, False).kind == "none"
    assert gpu_plan.reduce_path(2, True).kind == "device"
    assert gpu_plan.reduce_path(8, False).kind == "host-staged"
    assert "pinned" in gpu_plan.reduce_path(2, False).description
    with pytest.raises(ValueError):
        gpu_plan.reduce_path(0, False)


REDUCE_WORKER = textwrap.dedent("""
    from dtrain.parallel.comm import Communicator
    from dtrain.step import gpu_plan
    from dtrain.step.gpu_graph import reduce_path
    comm = Communicator()
    path = gpu_plan.reduce_path(comm.size, comm.cuda_aware)
    print(f"rank={comm.rank} size={comm.size} cuda_aware={comm.cuda_aware} kind={path.kind} "
          f"text={reduce_path(comm)}", flush=True)
""")


@pytest.mark.timeout(90)
def test_reduce_path_under_mpiexec_with_this_mpi():
    """The MPI in .venv (the MPICH wheel) is not CUDA-aware, as its own query says:
    two ranks would stage GPU gradients through pinned host memory."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", REDUCE_WORKER],
                         capture_output=True, text=True, timeout=80, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = sorted(ln for ln in res.stdout.splitlines() if ln.startswith("rank="))
    assert len(lines) == 2, res.stdout
    for rank, line in enumerate(lines):
        assert line.startswith(f"rank={rank} size=2 cuda_aware=False kind=host-staged "), line
        assert "text=host-staged: one pinned host buffer" in line


# ---------------------------------------------------------------------------- device per rank


def test_device_per_local_rank():
    assert [device_for_rank(r, 8) for r in range(8)] == list(range(8))
    assert [device_for_rank(r, 2) for r in range(5)] == [0, 1, 0, 1, 0]  # more ranks than GPUs
    assert [device_for_rank(r, 4) for r in range(2)] == [0, 1]  # fewer: the first ones
    assert [device_for_rank(r, 1) for r in range(3)] == [0, 0, 0]  # one visible per rank


@pytest.mark.parametrize("devices", [1, 2, 3, 8])
def test_ranks_spread_evenly_over_devices(devices):
    for local_size in range(1, 13):
        load = np.bincount([device_for_rank(r, devices) for r in range(local_size)],
                           minlength=devices)
        assert load.max() - load.min() <= 1, (local_size, load)
        assert load.sum() == local_size


def test_no_device_is_a_device_error():
    with pytest.raises(DeviceError, match="--device gpu: no CUDA device"):
        device_for_rank(0, 0)
    with pytest.raises(ValueError):
        device_for_rank(-1, 2)
