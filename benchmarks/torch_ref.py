"""The same captioner in PyTorch (nn.LSTM / nn.RNN / nn.GRU, Adam): the other contender of
``python -m benchmarks.compare_torch``.

It runs in a process of its own (contender.py), never beside dtrain: two thread
pools on the same cores slow whichever runs second. Its timed step is what a
plain PyTorch training loop does with the same batches: the batch assembled
from the same sampler (or the same fixed synthetic batch), turned into tensors,
forward over all T slots (PyTorch pads; ignore_index masks the loss), backward,
Adam.

With ``--precision bf16`` it is PyTorch's mixed precision as its documentation
recommends on a CPU: forward and loss inside ``torch.autocast(dtype=bfloat16)``,
backward and Adam outside it, the weights and Adam state float32 (no loss
scaling: bf16 has float32's exponent range). Autocast decides per op which runs
in bf16; the dtypes it produced are recorded (``autocast_dtypes``).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

AUTOCAST = "torch.autocast(dtype=torch.bfloat16): forward and loss; backward and Adam outside"


def torch_model(cell, V, D, W, H, dtype, seed, device="cpu"):
    """(torch module, Adam optimizer) for the captioner."""
    if device != "cpu":  # exact float32 on both sides: no TF32 in cuBLAS/cuDNN (dtrain uses none)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    tdtype = torch.float32 if dtype == "float32" else torch.float64

    class TorchCaptioner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, H)
            self.embed = torch.nn.Embedding(V, W)
            rnn = {"lstm": torch.nn.LSTM, "rnn": torch.nn.RNN, "gru": torch.nn.GRU}[cell]
            kw = {"nonlinearity": "tanh"} if cell == "rnn" else {}
            self.rnn = rnn(W, H, batch_first=True, **kw)
            self.vocab = torch.nn.Linear(H, V)

        def forward(self, feats, cin):
            h0 = self.proj(feats).unsqueeze(0)
            x = self.embed(cin)
            if cell == "lstm":
                out, _ = self.rnn(x, (h0, torch.zeros_like(h0)))
            else:
                out, _ = self.rnn(x, h0)
            self.rnn_dtype = out.dtype  # under autocast: the dtype the recurrence ran in
            return self.vocab(out)

    model = TorchCaptioner().to(tdtype).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def torch_step_factory(cell, V, D, W, H, dtype, seed, null_idx=0, device="cpu",
                       precision="fp32"):
    """``step(features, captions) -> loss``: one PyTorch training step from host arrays.

    precision "bf16": forward and loss under ``torch.autocast(dtype=torch.bfloat16)``,
    backward and Adam outside it; the parameters stay ``dtype``. ``step.dtypes`` holds,
    after the first step, the dtypes of the recurrent output, the scores, the loss and the
    gradients: what autocast actually ran."""
    model, opt = torch_model(cell, V, D, W, H, dtype, seed, device)
    tdtype = next(model.parameters()).dtype
    device_type = "cpu" if device == "cpu" else "cuda"
    seen = {}

    def step(features, captions):
        feats = torch.from_numpy(np.ascontiguousarray(features)).to(device=device, dtype=tdtype)
        caps = torch.from_numpy(captions.astype(np.int64)).to(device)
        cin, cout = caps[:, :-1], caps[:, 1:]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            scores = model(feats, cin)
            loss = torch.nn.functional.cross_entropy(scores.reshape(-1, V), cout.reshape(-1),
                                                     ignore_index=null_idx,
                                                     reduction="sum") / caps.shape[0]
        loss.backward()  # outside autocast: each op's backward runs in its forward's dtype
        if not seen:
            seen.update(rnn_output=model.rnn_dtype, scores=scores.dtype, loss=loss.dtype,
                        grads=next(model.parameters()).grad.dtype)
        opt.step()
        return float(loss)  # waits for the device

    step.dtypes = seen
    return step


def _onednn_version():
    """"oneDNN vX.Y.Z" from PyTorch's build configuration, or "oneDNN"."""
    line = next((ln for ln in torch.__config__.show().splitlines() if "MKL-DNN v" in ln), "")
    words = [w for w in line.split() if w.startswith("v") and w[1:2].isdigit()]
    return f"oneDNN {words[0]}" if words else "oneDNN"


def torch_info():
    """PyTorch's version, threads, CPU capability and parallel backend, for the report."""
    lines = torch.__config__.parallel_info().splitlines()
    backend = next((ln.split(":", 1)[1].strip() for ln in lines
                    if ln.startswith("ATen parallel backend")), "?")
    libs = [name for name, ok in (("MKL", torch.backends.mkl.is_available()),
                                  (_onednn_version(), torch.backends.mkldnn.is_available())) if ok]
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in some builds
    if amx is not None:  # oneDNN's bf16 kernels use AMX tiles where PyTorch can enable them
        libs.append("AMX tiles usable" if amx() else "no AMX tiles")
    return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_parallel": f"ATen parallel backend {backend}; "
                              f"{', '.join(libs) or 'no MKL/oneDNN'}"}


class TorchTimer:
    """PyTorch's step on the bench's batches: warm-up, timed blocks, the result of all blocks."""

    def __init__(self, args, batches, work, threads, device):
        torch.set_num_threads(threads)
        self.args, self.batches, self.device = args, batches, device
        self.null = work.word_to_idx["<NULL>"]
        self.precision = getattr(args, "precision", "fp32")
        self.step = torch_step_factory(args.cell, len(work.word_to_idx), work.input_dim,
                                       args.wordvec_dim, args.hidden_dim, args.dtype, args.seed,
                                       self.null, device, self.precision)
        self.times, self.tokens, self.blocks = [], [], []

    def warmup(self, steps):
        for _ in range(steps):
            captions, features = self.batches.next()
            self.step(features, captions)

    def block(self, steps):
        """Time ``steps`` steps (batch assembly included, as for dtrain); their times in s."""
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            captions, features = self.batches.next()
            self.step(features, captions)
            times.append(time.perf_counter() - t0)
            self.tokens.append(int((captions[:, 1:] != self.null).sum()))
        self.times += times
        self.blocks.append(1e3 * statistics.median(times))
        return times

    def result(self):
        t = statistics.median(self.times)
        tok = float(np.mean(self.tokens))
        return {"framework": "torch", "device": self.device, "median_ms": 1e3 * t,
                "tokens_per_s": tok / t, "tokens_per_step": tok,
                "step_times_ms": [1e3 * x for x in self.times], "block_medians_ms": self.blocks,
                "precision": self.precision, "autocast": AUTOCAST if self.precision == "bf16"
                else None, "weights_dtype": self.args.dtype,
                "autocast_dtypes": {k: str(v).removeprefix("torch.")
                                    for k, v in self.step.dtypes.items()},
                **torch_info()}
