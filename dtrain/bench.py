"""`python -m dtrain bench`: time full training steps (forward, backward, Adam).

Prints the median step time, tokens/s (real, unmasked tokens), achieved
GFLOP/s (the GEMM work the step really does), and which BLAS library, kernel
and thread count ran. With --compare-torch it times the same model in PyTorch
in the same run, interleaving the two step by step so both see the same
machine load, and prints the ratio. Under mpiexec (or with --ranks P, which
relaunches itself under the mpiexec beside this Python) it also reports the
communication time and bytes of the gradient reduction, dense and sparse.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# COCO-like caption lengths (words before <END>), 8 to 15 words: with <END>
# about 70% of the 16 target slots hold a real token.
LENGTH_PROBS = {8: 0.15, 9: 0.25, 10: 0.20, 11: 0.13, 12: 0.10, 13: 0.07, 14: 0.05, 15: 0.05}


def add_bench_parser(subparsers):
    p = subparsers.add_parser("bench", help="time training steps (and compare with PyTorch)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", "-N", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--seq-len", "-T", type=int, default=16, help="target slots per caption (16)")
    p.add_argument("--input-dim", "-D", type=int, default=512)
    p.add_argument("--wordvec-dim", "-W", type=int, default=256)
    p.add_argument("--hidden-dim", "-H", type=int, default=512)
    p.add_argument("--vocab-size", "-V", type=int, default=1004)
    p.add_argument("--cell", choices=["lstm", "rnn"], default="lstm")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank (default: cores / ranks on the node)")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    p.add_argument("--no-kernels", action="store_true", help="plain xp code instead of fused kernels")
    p.add_argument("--compare-torch", action="store_true", help="time PyTorch too, interleaved")
    p.add_argument("--embed-reduce", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--ranks", type=int, default=None,
                   help="relaunch under the mpiexec beside this Python with P ranks")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_bench)
    return p


def synthetic_batch(N, T, V, D, rng, null=0, start=1, end=2):
    lengths = rng.choice(list(LENGTH_PROBS), size=N, p=list(LENGTH_PROBS.values()))
    lengths = np.minimum(lengths, T - 1)
    captions = np.full((N, T + 1), null, dtype=np.int32)
    captions[:, 0] = start
    for n, L in enumerate(lengths):
        captions[n, 1 : L + 1] = rng.integers(4, V, size=L)
        captions[n, L + 1] = end
    features = np.maximum(rng.standard_normal((N, D)), 0).astype(np.float32)
    return features, captions


def step_flops(packed, N, D, W, H, V, gates):
    """GEMM FLOPs of one packed training step (forward + backward)."""
    P = int(sum(packed.batch_sizes))
    M = P if packed.score_pos is None else len(packed.score_pos)
    G = gates * H
    fwd = 2 * P * W * G + 2 * P * H * G + 2 * M * H * V + 2 * N * D * H
    return 3 * fwd  # backward: a gradient w.r.t. weights and one w.r.t. inputs per GEMM


def blas_info():
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return {"library": info.get("internal_api"), "kernel": info.get("architecture"),
                        "threads": info.get("num_threads"), "version": info.get("version")}
    except Exception:
        pass
    return {"library": "unknown", "kernel": "unknown", "threads": None}


def _vocab(V):
    w = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3}
    for i in range(4, V):
        w[f"w{i}"] = i
    return w


def _torch_step_factory(args, threads, features, captions, device="cpu"):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    if device != "cpu":  # exact float32 on both sides: no TF32 in cuBLAS/cuDNN (dtrain uses none)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    tdtype = torch.float32 if args.dtype == "float32" else torch.float64
    V, W, H, D = args.vocab_size, args.wordvec_dim, args.hidden_dim, args.input_dim

    class TorchCaptioner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, H)
            self.embed = torch.nn.Embedding(V, W)
            rnn = torch.nn.LSTM if args.cell == "lstm" else torch.nn.RNN
            kw = {} if args.cell == "lstm" else {"nonlinearity": "tanh"}
            self.rnn = rnn(W, H, batch_first=True, **kw)
            self.vocab = torch.nn.Linear(H, V)

        def forward(self, feats, cin):
            h0 = self.proj(feats).unsqueeze(0)
            x = self.embed(cin)
            if args.cell == "lstm":
                out, _ = self.rnn(x, (h0, torch.zeros_like(h0)))
            else:
                out, _ = self.rnn(x, h0)
            return self.vocab(out)

    model = TorchCaptioner().to(tdtype).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    feats = torch.from_numpy(features).to(tdtype).to(device)
    caps = torch.from_numpy(captions.astype(np.int64)).to(device)
    cin, cout = caps[:, :-1], caps[:, 1:]
    N = caps.shape[0]

    def step():
        opt.zero_grad(set_to_none=True)
        scores = model(feats, cin)
        loss = F.cross_entropy(scores.reshape(-1, V), cout.reshape(-1), ignore_index=0,
                               reduction="sum") / N
        loss.backward()
        opt.step()
        return float(loss)

    return step, torch.__version__


def run_bench(args):
    if args.ranks and "PMI_RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ \
            and "PMI_SIZE" not in os.environ:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        argv = [a for a in sys.argv[1:]]
        i = argv.index("--ranks")
        del argv[i : i + 2]
        cmd = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "dtrain"] + argv
        return subprocess.call(cmd)

    from . import backend
    from .comm import Communicator
    from .model import CaptioningModel, pack_captions
    from .optim import Adam
    from .trainer import reduce_gradients

    comm = Communicator()
    try:
        device = backend.resolve_device(args.device)
    except backend.DeviceError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    xp = backend.select(device, comm.local_rank)
    threads = args.threads or max(1, (os.cpu_count() or 1) // comm.local_size)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except Exception:
        pass
    if args.batch_size % comm.size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {comm.size} ranks")
    shard = args.batch_size // comm.size
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    features, captions = synthetic_batch(args.batch_size, args.seq_len, args.vocab_size,
                                         args.input_dim, rng)
    lo, hi = comm.rank * shard, (comm.rank + 1) * shard
    my_feats, my_caps = features[lo:hi], captions[lo:hi]
    model = CaptioningModel(_vocab(args.vocab_size), args.input_dim, args.wordvec_dim,
                            args.hidden_dim, args.cell, dtype=dtype, seed=args.seed, xp=xp,
                            use_kernels=not args.no_kernels)
    if device == "gpu":
        from .gpu_graph import print_gpu_lines, run_gpu_bench

        factory = None
        if args.compare_torch and comm.size == 1:
            try:
                import torch  # noqa: F401
            except ImportError:
                print("--compare-torch: PyTorch is not importable", file=sys.stderr)
                return 2
            factory = lambda: _torch_step_factory(args, threads, features, captions, device="cuda")  # noqa: E731
        result = run_gpu_bench(args, comm, model, features, captions, my_feats, my_caps, factory)
        if comm.is_root:
            print_result(result)
            print_gpu_lines(result)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
        return 0
    from . import kernels as kernel_mod

    opt = Adam(model.num_params, xp=xp, dtype=dtype,
               kernels=None if args.no_kernels else kernel_mod.for_arrays(xp, dtype))
    dev_feats = backend.to_device(my_feats, xp)
    packed = pack_captions(my_caps, 0)
    real_tokens = int((captions[:, 1:] != 0).sum())
    gates = 4 if args.cell == "lstm" else 1
    flops = step_flops(pack_captions(captions, 0), args.batch_size, args.input_dim,
                       args.wordvec_dim, args.hidden_dim, args.vocab_size, gates)
    embed_mode = args.embed_reduce

    def sync():
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()

    def dtrain_step():
        t0 = time.perf_counter()
        dense = comm.size == 1 or embed_mode == "dense"
        loss, _ = model.loss_packed(dev_feats, packed, args.batch_size,
                                    embed_grad="dense" if dense else "sparse")
        sync()
        t1 = time.perf_counter()
        comm.reset_stats()  # the trainer's reduction, exactly
        _, _, _, mode = reduce_gradients(comm, model, loss, packed.num_tokens, False, embed_mode,
                                         dense_filled=dense)
        stats = {"mode": mode, "bytes": comm.bytes_moved}
        t2 = time.perf_counter()
        opt.step(model.param_buffer, model.grad_buffer)
        sync()
        t3 = time.perf_counter()
        return t3 - t0, t2 - t1, stats

    torch_step = None
    torch_version = None
    if args.compare_torch:
        if comm.size > 1:
            raise SystemExit("--compare-torch times one process; run it without --ranks")
        try:
            torch_step, torch_version = _torch_step_factory(args, threads, features, captions)
        except ImportError:
            print("--compare-torch: PyTorch is not importable; `pip install torch==2.13.0` "
                  "(CPU build) to compare", file=sys.stderr)
            return 2

    for _ in range(args.warmup):
        dtrain_step()
        if torch_step:
            torch_step()
    times, comm_times, torch_times, modes, bytes_moved = [], [], [], [], []
    for _ in range(args.steps):
        comm.barrier() if comm.size > 1 else None
        dt, ct, stats = dtrain_step()
        times.append(dt)
        comm_times.append(ct)
        modes.append(stats.get("mode"))
        bytes_moved.append(stats["bytes"])
        if torch_step:
            t0 = time.perf_counter()
            torch_step()
            torch_times.append(time.perf_counter() - t0)

    med = statistics.median(times)
    result = {
        "cell": args.cell, "dtype": args.dtype, "N": args.batch_size, "T": args.seq_len,
        "D": args.input_dim, "W": args.wordvec_dim, "H": args.hidden_dim, "V": args.vocab_size,
        "ranks": comm.size, "threads_per_rank": threads, "device": device,
        "kernels": (model.kernels.name if model.kernels is not None else "plain xp"),
        "blas": blas_info(), "median_ms": med * 1e3,
        "tokens_per_s": real_tokens / med, "gflops": flops / med / 1e9,
        "real_token_fraction": real_tokens / (args.batch_size * args.seq_len),
    }
    if comm.size > 1:
        all_comm = comm.allreduce_scalars(np.array([statistics.median(comm_times)])) / comm.size
        result["comm_ms"] = float(all_comm[0]) * 1e3
        result["compute_ms"] = (med - statistics.median(comm_times)) * 1e3
        result["comm_share"] = float(all_comm[0]) / med
        result["embed_reduce"] = max(set(modes), key=modes.count)
        result["bytes_per_step"] = int(statistics.median(bytes_moved))
    if torch_times:
        tmed = statistics.median(torch_times)
        result.update({"torch_version": torch_version, "torch_median_ms": tmed * 1e3,
                       "torch_tokens_per_s": real_tokens / tmed, "speedup_vs_torch": tmed / med})
    if comm.is_root:
        print_result(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


def print_result(r):
    b = r["blas"]
    print(f"dtrain bench: {r['cell']} {r['dtype']} N={r['N']} T={r['T']} D={r['D']} W={r['W']} "
          f"H={r['H']} V={r['V']} ranks={r['ranks']} device={r['device']}")
    print(f"  BLAS: {b.get('library')} {b.get('version', '')} kernel={b.get('kernel')} "
          f"threads={b.get('threads')}; fused kernels: {r['kernels']}")
    print(f"  real tokens: {100 * r['real_token_fraction']:.1f}% of target slots")
    print(f"  dtrain : {r['median_ms']:8.1f} ms/step  {r['tokens_per_s']:9.0f} tokens/s  "
          f"{r['gflops']:6.1f} GFLOP/s")
    if "comm_ms" in r:
        print(f"  comm   : {r['comm_ms']:8.2f} ms/step ({100 * r['comm_share']:.1f}% of the step), "
              f"compute {r['compute_ms']:.1f} ms, embedding reduce {r['embed_reduce']}, "
              f"{r['bytes_per_step'] / 1e6:.2f} MB/step per rank")
    if "torch_median_ms" in r:
        print(f"  PyTorch {r['torch_version']}: {r['torch_median_ms']:8.1f} ms/step  "
              f"{r['torch_tokens_per_s']:9.0f} tokens/s")
        print(f"  dtrain / PyTorch tokens/s: {r['speedup_vs_torch']:.2f}x")
