"""Gradients against PyTorch autograd in float64, through torch's own nn.RNN / nn.LSTM / nn.GRU.

The GRU is PyTorch's nn.GRU with bias_ih = b and bias_hh = 0; the LSTM's gate
blocks (i, f, o, g) are reordered to PyTorch's (i, f, g, o).
"""

import numpy as np
import pytest

from dtrain.nn.model import CaptioningModel
from helpers import small_vocab

torch = pytest.importorskip("torch")  # in the test extra: always installed by the README's command

V, D, W, H = 13, 6, 5, 7
W2I = small_vocab(V)


def _batch(rng, N=5, T=7):
    caps = np.zeros((N, T + 1), np.int64)
    for n in range(N):
        L = rng.integers(1, T - 1)
        caps[n, 0], caps[n, 1 : L + 1], caps[n, L + 1] = 1, rng.integers(3, V, L), 2
    caps[2, 2] = 0  # a hole inside a caption
    return rng.standard_normal((N, D)), caps


def _torch_loss(cell, params, features, captions):
    t = {k: torch.tensor(np.array(v), dtype=torch.float64, requires_grad=True)
         for k, v in params.items()}
    feats = torch.tensor(features)
    caps = torch.tensor(captions)
    cin, cout = caps[:, :-1], caps[:, 1:]
    N = caps.shape[0]
    h0 = (feats @ t["W_proj"] + t["b_proj"]).unsqueeze(0)
    x = t["W_embed"][cin]
    module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    rnn = module(W, H, batch_first=True).double()
    Wx, Wh, b = t["Wx"], t["Wh"], t["b"]
    if cell == "lstm":  # ours i, f, o, g -> PyTorch's i, f, g, o
        perm = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                          torch.arange(2 * H, 3 * H)])
        Wx, Wh, b = Wx[:, perm], Wh[:, perm], b[perm]
    weights = {"weight_ih_l0": Wx.T, "weight_hh_l0": Wh.T, "bias_ih_l0": b,
               "bias_hh_l0": torch.zeros_like(b)}
    args = (x, (h0, torch.zeros_like(h0))) if cell == "lstm" else (x, h0)
    out, _ = torch.func.functional_call(rnn, weights, args)
    scores = out @ t["W_vocab"] + t["b_vocab"]
    mask = (cout != 0).double()
    ce = torch.nn.functional.cross_entropy(scores.reshape(-1, V), cout.reshape(-1),
                                           reduction="none")
    loss = (ce * mask.reshape(-1)).sum() / N
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() for k, v in t.items()}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_gradients_match_pytorch_autograd(cell, use_kernels):
    rng = np.random.default_rng(5)
    model = CaptioningModel(W2I, input_dim=D, wordvec_dim=W, hidden_dim=H, cell_type=cell,
                            dtype=np.float64, seed=3, use_kernels=use_kernels)
    model.params["b"] = 0.1 * rng.standard_normal(model.params["b"].shape)
    model.params["b_vocab"] = 0.1 * rng.standard_normal(V)
    features, captions = _batch(rng)
    loss, grads = model.loss(features, captions)
    t_loss, t_grads = _torch_loss(cell, dict(model.params), features, captions)
    assert abs(loss - t_loss) <= 1e-13 * abs(t_loss)
    for name, g in t_grads.items():
        err = np.max(np.abs(grads[name] - g)) / max(np.max(np.abs(g)), 1e-300)
        assert err < 1e-12, (name, err)
