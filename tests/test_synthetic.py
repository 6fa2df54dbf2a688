"""The built-in synthetic data set: layout, determinism, cache, and learnability."""

import json
import os
import time
from importlib import resources

import h5py
import numpy as np
import pytest

from dtrain.commands import data as datacli
from dtrain.data import synthetic
from dtrain.data.bleu import corpus_bleu
from dtrain.data.coco import CocoData, caption_tokens, decode_captions
from dtrain.parallel.sampler import ShardedSampler

FILES = ["coco2014_captions.h5", "coco2014_vocab.json", "train2014_vgg16_fc7_pca.h5",
         "val2014_vgg16_fc7_pca.h5", "train2014_urls.txt", "val2014_urls.txt"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("syn") / "d", 60, 20, seed=0)


def test_layout_and_contents(small):
    for name in FILES:
        assert (small / name).is_file()
    shipped = resources.files("dtrain.resources").joinpath("coco2014_vocab.json").read_text()
    assert (small / "coco2014_vocab.json").read_text() == shipped
    with CocoData(small) as data:
        w2i = data.word_to_idx
        assert [w2i[t] for t in ("<NULL>", "<START>", "<END>", "<UNK>")] == [0, 1, 2, 3]
        assert data.vocab_size == 1004 and data.feature_dim == 512
        for name, n in (("train", 60), ("val", 20)):
            s = data.split(name)
            assert s.num_images == n and s.num_captions == 5 * n
            assert s.captions.shape == (5 * n, 17)
            np.testing.assert_array_equal(np.bincount(s.image_idxs), np.full(n, 5))
            assert (s.captions[:, 0] == 1).all()
            lengths = np.array([len(caption_tokens(c, data.idx_to_word)) for c in s.captions])
            assert lengths.min() >= 8 and lengths.max() <= 15
            assert ((s.captions == 2).sum(axis=1) == 1).all()  # exactly one <END>
            f = s.features(np.arange(n))
            assert f.dtype == np.float32 and f.min() >= 0 and (f == 0).any()
            assert len(s.urls) == n
        # five captions of one image share their content words, in different wordings
        caps = decode_captions(data.split("train").captions[:5], data.idx_to_word)
        assert len(set(caps)) >= 3


def test_deterministic_and_seeded(tmp_path, small):
    again = synthetic.write_synthetic(tmp_path / "again", 60, 20, seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (small / name).read_bytes(), name
    other = synthetic.write_synthetic(tmp_path / "other", 60, 20, seed=1)
    with h5py.File(other / FILES[0]) as a, h5py.File(small / FILES[0]) as b:
        assert not np.array_equal(a["train_captions"][()], b["train_captions"][()])


def test_vocabulary_use_and_unk():
    # a larger sample: many real COCO words, rare synonyms become <UNK>, not too many
    w2i = json.loads(synthetic._vocab_path().read_text())["word_to_idx"]
    caps, _, _, _ = synthetic.generate_split(2000, 0, "train", w2i)
    used = np.unique(caps)
    assert len(used) > 250
    unk = (caps == w2i["<UNK>"]).sum() / (caps > 2).sum()
    assert 0.001 < unk < 0.03


def test_ensure_builtin_data_generates_once(tmp_path, monkeypatch):
    calls = []
    real = synthetic.write_synthetic

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "write_synthetic", counting)
    stale = tmp_path / f".{synthetic.builtin_name(30, 10, 0)}.tmp-old"
    stale.mkdir()
    os.utime(stale, (0, 0))
    p = synthetic.ensure_builtin_data(tmp_path, 30, 10, 0)
    assert p == tmp_path / "synthetic-v1-30x10-seed0" and p.is_dir()
    assert synthetic.ensure_builtin_data(tmp_path, 30, 10, 0) == p
    assert len(calls) == 1
    assert not stale.exists()  # leftovers of killed runs are cleaned up
    assert [q.name for q in tmp_path.iterdir()] == [p.name]  # no temporaries left
    CocoData(p).close()


def test_ensure_builtin_data_lost_race(tmp_path, monkeypatch):
    # Another process renames its copy into place first: ours is discarded, theirs used.
    final = tmp_path / synthetic.builtin_name(30, 10, 0)
    real = synthetic.write_synthetic

    def racing(out, *a, **k):
        real(final, *a, **k)
        return real(out, *a, **k)

    monkeypatch.setattr(synthetic, "write_synthetic", racing)
    assert synthetic.ensure_builtin_data(tmp_path, 30, 10, 0) == final
    assert [q.name for q in tmp_path.iterdir()] == [final.name]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DTRAIN_CACHE", str(tmp_path))
    assert synthetic.default_cache_dir() == tmp_path
    monkeypatch.delenv("DTRAIN_CACHE")
    assert synthetic.default_cache_dir().parts[-2:] == (".cache", "dtrain")


def test_synth_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--train-images", "12", "--val-images", "6",
            "--seed", "4"]
    assert datacli.main(args) == 0
    assert CocoData(out).split("val").num_images == 6
    assert datacli.main(["data", "synth", "--cache-dir", str(tmp_path / "c"),
                         "--train-images", "12", "--val-images", "6"]) == 0
    assert (tmp_path / "c" / "synthetic-v1-12x6-seed0").is_dir()
    assert datacli.main(["data", "synth", "--out", str(out), "--train-images", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --train-images")


@pytest.mark.slow
def test_default_size_generates_in_under_a_minute(tmp_path):
    t = time.perf_counter()
    p = synthetic.write_synthetic(tmp_path / "full")
    assert time.perf_counter() - t < 60
    with CocoData(p) as data:
        assert data.split("train").num_images == 20000 and data.split("val").num_images == 2000


def _train_bleu4(data, shuffle_features, steps=500, batch=64, lr=5e-3, hidden=64):
    """Train a small captioner on the synthetic train split, return val BLEU-4."""
    from dtrain.nn.model import CaptioningModel
    from dtrain.nn.optim import Adam

    train, val = data.split("train"), data.split("val")
    feats = train.features(np.arange(train.num_images))
    if shuffle_features:  # the same features, each given to another image
        feats = feats[np.random.default_rng(1).permutation(len(feats))]
    model = CaptioningModel(data.word_to_idx, input_dim=data.feature_dim, wordvec_dim=32,
                            hidden_dim=hidden, cell_type="rnn", dtype=np.float32, seed=0)
    opt = Adam(model.param_buffer.size, lr=lr, xp=np)
    sampler = ShardedSampler(train.num_captions, batch, seed=0)
    for _ in range(steps):
        idx = sampler.next_shard()
        model.loss(feats[train.image_idxs[idx]], train.captions[idx])
        opt.step(model.param_buffer, model.grad_buffer)
    image_ids, refs = val.image_references()
    sampled = model.sample(val.features(image_ids), max_length=16)
    hyps = [caption_tokens(row, data.idx_to_word) for row in sampled]
    return corpus_bleu(hyps, refs)[3]


@pytest.mark.slow
def test_learnable_from_the_features(tmp_path):
    pytest.importorskip("dtrain.nn.model")
    p = synthetic.write_synthetic(tmp_path / "learn", 1500, 300, seed=0)
    with CocoData(p) as data:
        seeing = _train_bleu4(data, shuffle_features=False)
        blind = _train_bleu4(data, shuffle_features=True)
    print(f"val BLEU-4: with features {seeing:.3f}, features shuffled {blind:.3f}")
    assert seeing > blind + 0.08 and seeing > 2 * blind, (seeing, blind)
