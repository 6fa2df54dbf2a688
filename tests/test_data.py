"""The COCO-layout reader: exact round trip, decoding, and one-line validation errors."""

import json
import os
import shutil
import subprocess
import sys
from importlib import resources

import h5py
import numpy as np
import pytest

from dtrain.commands import data as datacli
from dtrain.data.coco import (
    SPECIAL_TOKENS,
    CocoData,
    DataError,
    caption_tokens,
    decode_captions,
    load_vocab,
)

VOCAB_TEXT = resources.files("dtrain.resources").joinpath("coco2014_vocab.json").read_text()
W2I, I2W = load_vocab(resources.files("dtrain.resources").joinpath("coco2014_vocab.json"))


def encode(text, T=17):
    ids = [W2I["<START>"]] + [W2I[w] for w in text.split()] + [W2I["<END>"]]
    return ids + [W2I["<NULL>"]] * (T - len(ids))


def write_layout(d, n_train_img=7, n_val_img=4, D=6, seed=0):
    """A tiny layout; returns what was written."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "coco2014_vocab.json").write_text(VOCAB_TEXT)
    words = ["a", "man", "dog", "on", "the", "street", "red", "cat", "sitting", "table"]
    written = {}
    with h5py.File(d / "coco2014_captions.h5", "w") as f:
        for split, n_img in (("train", n_train_img), ("val", n_val_img)):
            n_cap = 3 * n_img
            texts = [" ".join(rng.choice(words, size=rng.integers(1, 16))) for _ in range(n_cap)]
            caps = np.array([encode(t) for t in texts], np.int32)
            idxs = rng.integers(0, n_img, n_cap).astype(np.int32)
            idxs[:n_img] = np.arange(n_img)  # every image has a caption
            feats = rng.random((n_img, D), dtype=np.float32)
            f.create_dataset(f"{split}_captions", data=caps)
            f.create_dataset(f"{split}_image_idxs", data=idxs)
            with h5py.File(d / f"{split}2014_vgg16_fc7_pca.h5", "w") as ff:
                ff.create_dataset("features", data=feats)
            (d / f"{split}2014_urls.txt").write_text(
                "".join(f"http://x/{split}/{i}.jpg\n" for i in range(n_img)))
            written[split] = (texts, caps, idxs, feats)
    return written


@pytest.fixture
def layout(tmp_path):
    d = tmp_path / "coco"
    return d, write_layout(d)


# ---------------------------------------------------------------------------
# vocabulary and decoding


def test_shipped_vocabulary_is_cs231n():
    assert len(I2W) == 1004
    assert I2W[:4] == list(SPECIAL_TOKENS)
    assert all(W2I[w] == i for i, w in enumerate(I2W))


def test_decode_round_trip():
    texts = ["a man riding a horse on the beach", "two dogs", "a " * 14 + "cat"]
    caps = np.array([encode(t.strip()) for t in texts])
    assert decode_captions(caps, I2W) == [t.strip() for t in texts]
    assert decode_captions(caps[0], I2W) == texts[0]
    assert caption_tokens(caps[1], I2W) == ["two", "dogs"]


def test_decode_stops_at_end_and_skips_null_and_start():
    s, e, n = W2I["<START>"], W2I["<END>"], W2I["<NULL>"]
    row = [s, W2I["a"], n, W2I["dog"], e, W2I["cat"], n]
    assert decode_captions(np.array(row), I2W) == "a dog"
    # sampled captions have no <START>, and may have no <END>
    assert decode_captions(np.array([[W2I["a"], W2I["cat"]]]), I2W) == ["a cat"]
    assert caption_tokens(np.array([e, W2I["cat"]]), I2W) == []


# ---------------------------------------------------------------------------
# the reader returns exactly what was written


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["in-memory", "per-batch"])
def test_reader_round_trip(layout, budget):
    d, written = layout
    with CocoData(d, feature_memory_budget=budget) as data:
        assert data.vocab_size == 1004 and data.word_to_idx == W2I and data.idx_to_word == I2W
        assert data.feature_dim == 6
        for name in ("train", "val"):
            texts, caps, idxs, feats = written[name]
            s = data.split(name)
            assert s.in_memory == (budget > 0)
            assert s.captions.dtype == np.int32 and s.image_idxs.dtype == np.int64
            np.testing.assert_array_equal(s.captions, caps)
            np.testing.assert_array_equal(s.image_idxs, idxs)
            assert (s.num_captions, s.num_images, s.feature_dim) == (len(caps), len(feats), 6)
            assert decode_captions(s.captions, data.idx_to_word) == texts
            # any order, repeats allowed
            rows = [3, 0, 3, len(feats) - 1, 1]
            out = s.features(rows)
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, feats[rows])
            assert s.features([]).shape == (0, 6)
            with pytest.raises(IndexError):
                s.features([len(feats)])
            sel = np.array([5, 2, 2, 0])
            c, f = s.batch(sel)
            np.testing.assert_array_equal(c, caps[sel])
            np.testing.assert_array_equal(f, feats[idxs[sel]])
            assert s.urls == [f"http://x/{name}/{i}.jpg" for i in range(len(feats))]
            ids, refs = s.image_references()
            np.testing.assert_array_equal(ids, np.unique(idxs))
            for img, r in zip(ids, refs):
                assert r == [t.split() for t, i in zip(texts, idxs) if i == img]


def test_max_train_is_a_deterministic_subset(layout):
    d, written = layout
    _, caps, idxs, _ = written["train"]
    a = CocoData(d, max_train=8).split("train")
    b = CocoData(d, max_train=8).split("train")
    assert a.num_captions == 8
    np.testing.assert_array_equal(a.captions, b.captions)
    rows = [np.flatnonzero((caps == c).all(axis=1)) for c in a.captions]
    assert all(len(r) >= 1 for r in rows)
    assert CocoData(d, max_train=10**6).split("train").num_captions == len(caps)
    assert CocoData(d, max_train=8).split("val").num_captions == len(written["val"][1])


def test_full_features_option(layout):
    d, _ = layout
    with pytest.raises(DataError, match="train2014_vgg16_fc7.h5: \\(file\\)"):
        CocoData(d, pca_features=False)
    for split in ("train", "val"):
        shutil.copy(d / f"{split}2014_vgg16_fc7_pca.h5", d / f"{split}2014_vgg16_fc7.h5")
    assert CocoData(d, pca_features=False).feature_dim == 6


# ---------------------------------------------------------------------------
# validation: each error names the file and the key, in one line


def _rewrite(path, key, data=None, delete=False):
    with h5py.File(path, "a") as f:
        del f[key]
        if not delete:
            f.create_dataset(key, data=data)


def _edit_vocab(d, fn):
    blob = json.loads((d / "coco2014_vocab.json").read_text())
    fn(blob)
    (d / "coco2014_vocab.json").write_text(json.dumps(blob))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _cap(d):
    return d / "coco2014_captions.h5"


BROKEN = {
    "missing captions file": (lambda d, w: os.remove(_cap(d)), "coco2014_captions.h5", "(file)"),
    "missing key": (lambda d, w: _rewrite(_cap(d), "val_captions", delete=True),
                    "coco2014_captions.h5", "val_captions"),
    "captions wrong dtype": (lambda d, w: _rewrite(_cap(d), "train_captions",
                                                   w["train"][1].astype(np.float32)),
                             "coco2014_captions.h5", "train_captions"),
    "captions wrong rank": (lambda d, w: _rewrite(_cap(d), "train_captions",
                                                  w["train"][1].reshape(-1)),
                            "coco2014_captions.h5", "train_captions"),
    "idxs wrong length": (lambda d, w: _rewrite(_cap(d), "val_image_idxs", w["val"][2][:-1]),
                          "coco2014_captions.h5", "val_image_idxs"),
    "idxs wrong dtype": (lambda d, w: _rewrite(_cap(d), "val_image_idxs",
                                               w["val"][2].astype(np.float64)),
                         "coco2014_captions.h5", "val_image_idxs"),
    "caption id out of range": (
        lambda d, w: _rewrite(_cap(d), "train_captions",
                              np.where(np.arange(17) == 3, 1004, w["train"][1]).astype(np.int32)),
        "coco2014_captions.h5", "train_captions"),
    "negative caption id": (
        lambda d, w: _rewrite(_cap(d), "val_captions",
                              np.where(np.arange(17) == 3, -1, w["val"][1]).astype(np.int32)),
        "coco2014_captions.h5", "val_captions"),
    "image index out of range": (
        lambda d, w: _rewrite(_cap(d), "train_image_idxs",
                              np.full_like(w["train"][2], len(w["train"][3]))),
        "coco2014_captions.h5", "train_image_idxs"),
    "NaN feature": (lambda d, w: _rewrite(d / "val2014_vgg16_fc7_pca.h5", "features",
                                          np.where(np.arange(6) == 2, np.nan, w["val"][3])
                                          .astype(np.float32)),
                    "val2014_vgg16_fc7_pca.h5", "features"),
    "inf feature": (lambda d, w: _rewrite(d / "train2014_vgg16_fc7_pca.h5", "features",
                                          np.where(np.arange(6) == 0, np.inf, w["train"][3])
                                          .astype(np.float32)),
                    "train2014_vgg16_fc7_pca.h5", "features"),
    "features wrong dtype": (lambda d, w: _rewrite(d / "train2014_vgg16_fc7_pca.h5", "features",
                                                   (w["train"][3] * 10).astype(np.int32)),
                             "train2014_vgg16_fc7_pca.h5", "features"),
    "features missing key": (lambda d, w: _rewrite(d / "val2014_vgg16_fc7_pca.h5", "features",
                                                   delete=True),
                             "val2014_vgg16_fc7_pca.h5", "features"),
    "features width differs": (lambda d, w: _rewrite(d / "val2014_vgg16_fc7_pca.h5", "features",
                                                     w["val"][3][:, :5]),
                               "val2014_vgg16_fc7_pca.h5", "features"),
    "missing features file": (lambda d, w: os.remove(d / "val2014_vgg16_fc7_pca.h5"),
                              "val2014_vgg16_fc7_pca.h5", "(file)"),
    "truncated captions file": (lambda d, w: _truncate(_cap(d)), "coco2014_captions.h5",
                                "(file)"),
    "truncated features file": (lambda d, w: _truncate(d / "train2014_vgg16_fc7_pca.h5"),
                                "train2014_vgg16_fc7_pca.h5", "(file)"),
    "not HDF5": (lambda d, w: _cap(d).write_text("hello"), "coco2014_captions.h5", "(file)"),
    "urls count": (lambda d, w: (d / "val2014_urls.txt").write_text("http://x\n"),
                   "val2014_urls.txt", "(lines)"),
    "vocab missing file": (lambda d, w: os.remove(d / "coco2014_vocab.json"),
                           "coco2014_vocab.json", "(file)"),
    "vocab invalid JSON": (lambda d, w: (d / "coco2014_vocab.json").write_text("{\"idx_to"),
                           "coco2014_vocab.json", "(file)"),
    "vocab missing key": (lambda d, w: _edit_vocab(d, lambda b: b.pop("word_to_idx")),
                          "coco2014_vocab.json", "word_to_idx"),
    "vocab missing special token": (
        lambda d, w: _edit_vocab(d, lambda b: (b["idx_to_word"].__setitem__(3, "unk"),
                                               b["word_to_idx"].pop("<UNK>"),
                                               b["word_to_idx"].__setitem__("unk", 3))),
        "coco2014_vocab.json", "word_to_idx"),
    "vocab inconsistent": (lambda d, w: _edit_vocab(d, lambda b: b["word_to_idx"]
                                                    .__setitem__("dog", 5)),
                           "coco2014_vocab.json", "word_to_idx"),
    "vocab lengths differ": (lambda d, w: _edit_vocab(d, lambda b: b["idx_to_word"]
                                                      .append("zzz")),
                             "coco2014_vocab.json", "word_to_idx"),
    "vocab not strings": (lambda d, w: _edit_vocab(d, lambda b: b["idx_to_word"]
                                                   .__setitem__(7, 7)),
                          "coco2014_vocab.json", "idx_to_word"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_validation_error_names_file_and_key(tmp_path, case):
    d = tmp_path / "coco"
    written = write_layout(d)
    breaker, filename, key = BROKEN[case]
    breaker(d, written)
    with pytest.raises(DataError) as info:
        CocoData(d)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(d / filename) + f": {key}: expected "), msg
    assert ", got " in msg
    assert isinstance(info.value, ValueError)


def test_budget_zero_reads_nothing_whole_and_checks_all_chunks(tmp_path, monkeypatch):
    # A NaN in a late chunk of a feature file too large for the budget is still found.
    d = tmp_path / "coco"
    write_layout(d, n_train_img=40)
    with h5py.File(d / "train2014_vgg16_fc7_pca.h5", "a") as f:
        f["features"][37, 4] = np.nan
    import dtrain.data.coco as data_mod

    orig = data_mod.Split._scan_features
    seen = []

    def spy(self, keep):
        seen.append(keep)
        return orig(self, keep)

    monkeypatch.setattr(data_mod.Split, "_scan_features", spy)
    with pytest.raises(DataError, match="features: expected finite values, got nan at row 37"):
        CocoData(d, feature_memory_budget=0)
    assert seen == [False]


def test_check_cli(layout, capsys):
    d, _ = layout
    assert datacli.main(["data", "check", str(d)]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 1004 words" in out and "train: 21 captions of 7 images" in out
    os.remove(d / "val2014_vgg16_fc7_pca.h5")
    assert datacli.main(["data", "check", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "val2014_vgg16_fc7_pca.h5" in err


def test_check_cli_subprocess_exit_code(layout):
    d, _ = layout
    _rewrite(_cap(d), "train_captions", delete=True)
    r = subprocess.run([sys.executable, "-m", "dtrain", "data", "check", str(d)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: {_cap(d)}: train_captions: expected a 2-D integer "
                                "dataset, got no such key")
