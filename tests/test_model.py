"""The captioning model: published CS231n values, gradients, exact savings, sampling, learning."""

import numpy as np
import pytest

from dtrain.nn.model import CaptioningModel, pack_captions
from dtrain.nn.optim import Adam
from helpers import (
    eval_numerical_gradient,
    norm_error,
    numeric_grad,
    random_captions,
    rel_error,
    small_vocab,
)


def cs231n_model(cell):
    N, D, W, H = 10, 20, 30, 40
    word_to_idx = {"<NULL>": 0, "cat": 2, "dog": 3}
    V, T = len(word_to_idx), 13
    model = CaptioningModel(word_to_idx, input_dim=D, wordvec_dim=W, hidden_dim=H,
                            cell_type=cell, dtype=np.float64)
    for k in sorted(model.params):
        v = model.params[k]
        model.params[k] = np.linspace(-1.4, 1.3, num=v.size).reshape(*v.shape)
    lo, hi = (-1.5, 0.3) if cell == "rnn" else (-0.5, 1.7)
    features = np.linspace(lo, hi, num=N * D).reshape(N, D)
    captions = (np.arange(N * T) % V).reshape(N, T)
    return model, features, captions


@pytest.mark.parametrize("cell,expected", [("rnn", 9.83235591003), ("lstm", 9.82445935443)])
def test_published_cs231n_loss(cell, expected):
    model, features, captions = cs231n_model(cell)
    loss, _ = model.loss(features, captions)
    assert abs(loss - expected) < 1e-10
    ref_loss, _ = model.loss_reference(features, captions)
    assert abs(ref_loss - expected) < 1e-10


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_model_gradients_finite_differences(cell):
    rng = np.random.default_rng(7)
    N, D, W, H, V, T = 4, 6, 5, 7, 11, 6
    model = CaptioningModel(small_vocab(V), input_dim=D, wordvec_dim=W, hidden_dim=H,
                            cell_type=cell, dtype=np.float64, seed=3)
    features = rng.standard_normal((N, D))
    captions = random_captions(rng, N, T, V)
    captions[1, 3] = 0  # a hole in the mask: a padded position inside a caption
    _, grads = model.loss(features, captions)
    grads = {k: v.copy() for k, v in grads.items()}
    for name in model.params:
        num = numeric_grad(lambda: model.loss(features, captions)[0], model.params[name])
        assert norm_error(num, grads[name]) < 1e-7, name


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_notebook_gradient_check(cell):
    """The CS231n notebook's check, as written there: loss() once, then a numeric gradient
    that calls loss() for every entry, then compare. It passes only if the gradients
    loss() returned are the caller's (a later call must not overwrite them): measured here,
    owned gradients give at most 2.8e-6 (LSTM Wx), views of the model's buffer 2.9e-5..1.2e-4.
    The error is CS231n's elementwise relative error; h is its checker's default."""
    rng = np.random.default_rng(1)
    batch_size, timesteps, input_dim, wordvec_dim, hidden_dim = 2, 3, 4, 5, 6
    word_to_idx = {"<NULL>": 0, "cat": 2, "dog": 3}
    vocab_size = len(word_to_idx)
    captions = rng.integers(vocab_size, size=(batch_size, timesteps))
    features = rng.standard_normal((batch_size, input_dim))
    model = CaptioningModel(word_to_idx, input_dim=input_dim, wordvec_dim=wordvec_dim,
                            hidden_dim=hidden_dim, cell_type=cell, dtype=np.float64)
    loss, grads = model.loss(features, captions)
    for param_name in sorted(grads):
        f = lambda _: model.loss(features, captions)[0]  # noqa: E731
        param_grad_num = eval_numerical_gradient(f, model.params[param_name], h=1e-5)
        e = rel_error(param_grad_num, grads[param_name])
        assert e < 1e-5, (param_name, e)


def test_loss_gradients_are_owned_by_the_caller():
    rng = np.random.default_rng(3)
    model = CaptioningModel(small_vocab(20), input_dim=6, wordvec_dim=5, hidden_dim=7,
                            dtype=np.float64)
    f1, c1 = rng.standard_normal((4, 6)), random_captions(rng, 4, 6, 20)
    f2, c2 = rng.standard_normal((3, 6)), random_captions(rng, 3, 6, 20)
    _, g1 = model.loss(f1, c1)
    kept = {k: v.copy() for k, v in g1.items()}
    _, g2 = model.loss(f2, c2)
    for k in g1:
        assert not np.shares_memory(g1[k], model.grad_buffer), k
        np.testing.assert_array_equal(g1[k], kept[k])
        assert not np.array_equal(g1[k], g2[k]) or not np.any(g1[k]), k


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_exact_savings_match_plain_computation(cell):
    """Trimming, packing and scoring only real tokens change nothing (float64, 1e-12)."""
    rng = np.random.default_rng(11)
    N, D, W, H, V, T = 9, 12, 10, 16, 40, 16
    model = CaptioningModel(small_vocab(V), input_dim=D, wordvec_dim=W, hidden_dim=H,
                            cell_type=cell, dtype=np.float64, seed=5)
    features = rng.standard_normal((N, D))
    captions = random_captions(rng, N, T, V)
    captions[:, -3:] = 0  # trailing all-<NULL> columns: trimmed away
    captions[2, 4] = 0  # a hole inside a caption
    packed = pack_captions(captions, 0)
    assert len(packed.batch_sizes) < T and packed.score_pos is not None
    loss, grads = model.loss(features, captions)
    ref_loss, ref_grads = model.loss_reference(features, captions)
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-12
    for k in ref_grads:
        err = np.max(np.abs(grads[k] - ref_grads[k])) / np.max(np.abs(ref_grads[k]))
        assert err < 1e-12, (k, err)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_float32_matches_float64(cell):
    rng = np.random.default_rng(2)
    N, D, W, H, V, T = 16, 32, 24, 32, 50, 12
    models = {dt: CaptioningModel(small_vocab(V), input_dim=D, wordvec_dim=W, hidden_dim=H,
                                  cell_type=cell, dtype=dt, seed=9)
              for dt in (np.float32, np.float64)}
    features = rng.standard_normal((N, D))
    captions = random_captions(rng, N, T, V)
    l32, g32 = models[np.float32].loss(features, captions)
    l64, g64 = models[np.float64].loss(features, captions)
    assert abs(l32 - l64) / l64 < 1e-5
    for k in g64:
        assert np.max(np.abs(g32[k] - g64[k])) / np.max(np.abs(g64[k])) < 1e-4, k


def test_sparse_embedding_gradient_matches_dense():
    rng = np.random.default_rng(4)
    model = CaptioningModel(small_vocab(30), input_dim=8, wordvec_dim=6, hidden_dim=10,
                            dtype=np.float64)
    features = rng.standard_normal((5, 8))
    captions = random_captions(rng, 5, 8, 30)
    _, grads = model.loss(features, captions)
    dense = grads["W_embed"].copy()
    g = model.forward_backward(features, model.pack(captions), 5)
    assert not g.embed_dense
    ids, rows = g.embed_ids, g.embed_rows
    assert len(ids) < 30
    np.testing.assert_array_equal(dense[ids], rows)
    mask = np.ones(30, bool)
    mask[ids] = False
    assert np.all(dense[mask] == 0)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("N", [1, 3, 7])
def test_sample_any_batch(cell, N):
    w2i = small_vocab(20)
    model = CaptioningModel(w2i, input_dim=8, wordvec_dim=6, hidden_dim=10, cell_type=cell, seed=N)
    # make <END> likely after a few steps so the <NULL>-after-<END> rule is exercised
    model.params["b_vocab"][2] = 2.0
    out = model.sample(np.random.default_rng(N).standard_normal((N, 8)), max_length=9)
    assert out.shape == (N, 9)
    assert np.all((out >= 0) & (out < 20))
    for row in out:
        ends = np.flatnonzero(row == 2)
        if ends.size:
            assert np.all(row[ends[0] + 1 :] == 0)
    # greedy decoding is deterministic and row-independent
    feats = np.random.default_rng(N).standard_normal((N, 8))
    full = model.sample(feats, max_length=9)
    for n in range(N):
        np.testing.assert_array_equal(model.sample(feats[n : n + 1], max_length=9)[0], full[n])


def test_params_dict_semantics():
    model = CaptioningModel(small_vocab(10), input_dim=4, wordvec_dim=3, hidden_dim=5,
                            dtype=np.float64)
    model.params["Wh"] = np.ones((5, 20))
    assert np.all(model.param_buffer[model.param_buffer.size // 2 :].size > 0)
    assert np.shares_memory(model.params["Wh"], model.param_buffer)
    assert np.all(model.params["Wh"] == 1)
    model.params["Wh"][0, 0] = 5.0  # in-place edit takes effect
    rng = np.random.default_rng(0)
    f, c = rng.standard_normal((2, 4)), random_captions(rng, 2, 5, 10)
    l1, _ = model.loss(f, c)
    model.params["Wh"][0, 0] = -5.0
    l2, _ = model.loss(f, c)
    assert l1 != l2
    with pytest.raises(ValueError, match="Wh"):
        model.params["Wh"] = np.ones((3, 3))
    with pytest.raises(ValueError, match="cell_type"):
        CaptioningModel(small_vocab(10), cell_type="transformer")


def test_initialisation_scales():
    model = CaptioningModel(small_vocab(1004), cell_type="lstm", seed=0)
    p = model.params
    assert p["Wx"].shape == (256, 2048) and p["Wh"].shape == (512, 2048)
    assert abs(p["W_embed"].std() - 0.01) < 1e-3
    assert abs(p["W_proj"].std() - 1 / np.sqrt(512)) < 2e-3
    assert abs(p["Wx"].std() - 1 / np.sqrt(256)) < 2e-3
    assert abs(p["W_vocab"].std() - 1 / np.sqrt(512)) < 2e-3
    assert np.all(p["b"] == 0) and np.all(p["b_vocab"] == 0) and np.all(p["b_proj"] == 0)
    again = CaptioningModel(small_vocab(1004), cell_type="lstm", seed=0)
    np.testing.assert_array_equal(model.param_buffer, again.param_buffer)


def test_adam_matches_textbook_formula():
    rng = np.random.default_rng(0)
    n = 1000
    p = rng.standard_normal(n)
    opt = Adam(n, lr=1e-2, xp=np, dtype=np.float64)
    ref, m, v = p.copy(), np.zeros(n), np.zeros(n)
    for t in range(1, 6):
        g = rng.standard_normal(n)
        opt.step(p, g)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref -= 1e-2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-15)
    assert opt.t == 5


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_overfit_small_data(cell):
    """100 Adam steps at lr 5e-3, batch 25, on 50 captions: loss below a tenth of its start."""
    rng = np.random.default_rng(0)
    V, T, D = 60, 16, 64
    captions = random_captions(rng, 50, T, V, min_len=8)
    features = rng.standard_normal((50, D)).astype(np.float32)
    model = CaptioningModel(small_vocab(V), input_dim=D, wordvec_dim=64, hidden_dim=128,
                            cell_type=cell, dtype=np.float32, seed=0)
    opt = Adam(model.num_params, lr=5e-3, xp=np, dtype=np.float32)
    losses = []
    for step in range(100):
        idx = np.arange(25) + 25 * (step % 2)
        loss, _ = model.loss(features[idx], captions[idx])
        opt.step(model.param_buffer, model.grad_buffer)
        losses.append(loss)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
