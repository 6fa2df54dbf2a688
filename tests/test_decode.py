"""Beam search (dtrain/decode.py): K = 1 is greedy bit for bit, batching does not mix images,
and with K = V on two steps it finds the best caption of an exhaustive search."""

import itertools

import numpy as np
import pytest

from dtrain.backend import gpu_available
from dtrain.decode import beam_search, check_beam_args, decode
from dtrain.nn.model import CaptioningModel

WORDS = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "cat", "dog", "sat", "on", "mat"]


def make_model(cell, words=WORDS, dtype=np.float32, seed=0, hidden=16):
    model = CaptioningModel({w: i for i, w in enumerate(words)}, input_dim=12, wordvec_dim=8,
                            hidden_dim=hidden, cell_type=cell, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    # larger output weights than the initialisation, so captions vary and end at different steps
    model.params["W_vocab"] = rng.standard_normal(model.params["W_vocab"].shape) * 2
    model.params["b_vocab"] = rng.standard_normal(model.params["b_vocab"].shape)
    return model


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_beam_size_one_is_greedy_bit_for_bit(cell):
    model = make_model(cell)
    feats = np.random.default_rng(2).standard_normal((37, 12)).astype(np.float32)
    for max_length in (1, 5, 16):
        greedy = model.sample(feats, max_length=max_length)
        beam = beam_search(model, feats, max_length=max_length, beam_size=1)
        np.testing.assert_array_equal(beam, greedy)
        beam = beam_search(model, feats, max_length=max_length, beam_size=1, length_penalty=0.7)
        np.testing.assert_array_equal(beam, greedy)
        np.testing.assert_array_equal(decode(model, feats, max_length, 1), greedy)
    assert len({tuple(r) for r in greedy}) > 5  # the captions differ: the test can fail


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_batched_beams_equal_one_image_at_a_time(cell):
    model = make_model(cell, dtype=np.float64)
    feats = np.random.default_rng(3).standard_normal((9, 12))
    together = beam_search(model, feats, max_length=8, beam_size=4, length_penalty=0.5)
    for i in range(len(feats)):
        alone = beam_search(model, feats[i:i + 1], max_length=8, beam_size=4, length_penalty=0.5)
        np.testing.assert_array_equal(together[i:i + 1], alone)
    assert together.shape == (9, 8)
    end, null = WORDS.index("<END>"), WORDS.index("<NULL>")
    for row in together:  # nothing but <NULL> after <END>
        ends = np.flatnonzero(row == end)
        if ends.size:
            assert (row[ends[0] + 1:] == null).all()


def _log_probs(model, state, word):
    p = model.params
    h, state = model.cell.sample_step(p["W_embed"][np.array([word])], state, p["Wx"], p["Wh"],
                                      p["b"])
    s = (h @ p["W_vocab"] + p["b_vocab"])[0]
    return s - (s.max() + np.log(np.exp(s - s.max()).sum())), state


def _exhaustive_best(model, feat, max_length, alpha):
    """The caption of highest sum(log p) / length ** alpha over every word sequence of
    length <= max_length (those that end with <END>, or that reach max_length)."""
    end = WORDS.index("<END>")
    p = model.params
    best = (-np.inf, None)
    for seq in itertools.product(range(model.vocab_size), repeat=max_length):
        if end in seq[:-1]:
            seq = seq[:seq.index(end) + 1]
        state = model.cell.init_state(feat[None] @ p["W_proj"] + p["b_proj"])
        word, total = WORDS.index("<START>"), 0.0
        for w in seq:
            logp, state = _log_probs(model, state, word)
            total += logp[w]
            word = w
        key = total / len(seq) ** alpha
        if key > best[0] + 1e-12:
            best = (key, list(seq))
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_as_wide_as_the_vocabulary_is_exhaustive(alpha):
    words = WORDS[:6]  # <NULL> <START> <END> <UNK> a cat
    model = make_model("lstm", words=words, dtype=np.float64, seed=5)
    feats = np.random.default_rng(4).standard_normal((6, 12))
    beams = beam_search(model, feats, max_length=2, beam_size=len(words), length_penalty=alpha)
    greedy = model.sample(feats, max_length=2)
    differs = 0
    for i in range(len(feats)):
        _, best = _exhaustive_best(model, feats[i], 2, alpha)
        assert list(beams[i][:len(best)]) == best, (i, beams[i], best)
        assert (beams[i][len(best):] == 0).all()
        differs += list(greedy[i][:len(best)]) != best
    print(f"beam differs from greedy on {differs} of {len(feats)} images")


def test_bad_arguments_name_the_flag():
    for k, lp, flag in ((0, 0.0, "--beam-size"), (2, -1.0, "--length-penalty"),
                        (2, float("nan"), "--length-penalty"), (11, 0.0, "--beam-size")):
        with pytest.raises(ValueError, match=flag):
            check_beam_args(k, lp, vocab_size=10)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
def test_beam_search_on_gpu_matches_cpu():
    """On CuPy: K = 1 is greedy bit for bit, and float64 beams give the CPU's captions."""
    import cupy

    feats = np.random.default_rng(6).standard_normal((23, 12))
    for dtype in (np.float32, np.float64):
        cpu = make_model("lstm", dtype=dtype)
        gpu = CaptioningModel(cpu.word_to_idx, input_dim=12, wordvec_dim=8, hidden_dim=16,
                              cell_type="lstm", dtype=dtype, xp=cupy)
        for name in cpu.shapes:
            gpu.params[name] = cupy.asarray(cpu.params[name])
        f = cupy.asarray(feats.astype(dtype))
        np.testing.assert_array_equal(beam_search(gpu, f, 10, 1).get(),
                                      gpu.sample(f, max_length=10).get())
        if dtype == np.float64:
            np.testing.assert_array_equal(beam_search(gpu, f, 10, 4, 0.5).get(),
                                          beam_search(cpu, feats, 10, 4, 0.5))
