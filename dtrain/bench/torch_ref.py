"""The same captioner in PyTorch (nn.LSTM / nn.RNN / nn.GRU, Adam), for ``bench --compare-torch``."""

from __future__ import annotations

import numpy as np


def torch_step_factory(args, threads, features, captions, device="cpu"):
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
            rnn = {"lstm": torch.nn.LSTM, "rnn": torch.nn.RNN, "gru": torch.nn.GRU}[args.cell]
            kw = {"nonlinearity": "tanh"} if args.cell == "rnn" else {}
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
