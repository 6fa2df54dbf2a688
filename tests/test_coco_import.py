"""`data import-coco`: COCO caption JSON + feature arrays -> the CS231n layout."""

import json

import h5py
import numpy as np
import pytest

from dtrain.commands import data as datacli
from dtrain.data.coco import CocoData, DataError, caption_tokens
from dtrain.data.coco_import import build_vocab, import_coco, tokenize


def coco_json(path, images, captions):
    """images: [(id, url)], captions: [(image_id, text)] -> a COCO-format file."""
    blob = {
        "info": {"description": "test"},
        "images": [{"id": i, "file_name": f"{i}.jpg", "coco_url": u, "height": 1, "width": 1}
                   for i, u in images],
        "annotations": [{"id": k, "image_id": i, "caption": c}
                        for k, (i, c) in enumerate(captions)],
    }
    path.write_text(json.dumps(blob))
    return path


TRAIN_CAPS = [
    (11, "A man riding a horse."),
    (11, "A MAN on a horse, near the beach!"),
    (22, "Two dogs playing in the snow"),
    (22, "two dogs, playing; in   the snow."),
    (33, "A zebra standing next to a giraffe in a field"),
    (33, "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen"),
    (44, "A caption of an image that has no features"),
]
VAL_CAPS = [(7, "A man on a horse."), (8, "Some dogs in the snow"), (8, "a cat")]


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    train_ids, val_ids = [33, 11, 22, 55], [8, 7]  # 55 has features but no caption
    train_feats = rng.random((4, 5)).astype(np.float32)
    val_feats = rng.random((2, 5)).astype(np.float32)
    np.save(tmp_path / "train_feats.npy", train_feats)
    with h5py.File(tmp_path / "val_feats.h5", "w") as f:
        f.create_dataset("fc7", data=val_feats)
    (tmp_path / "train_ids.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (tmp_path / "val_ids.json").write_text(json.dumps(val_ids))
    images = [(i, f"http://coco/{i}.jpg") for i in (11, 22, 33, 44, 55)]
    coco_json(tmp_path / "captions_train2014.json", images, TRAIN_CAPS)
    coco_json(tmp_path / "captions_val2014.json", [(7, "http://coco/7.jpg"), (8, "")], VAL_CAPS)
    args = dict(
        train_captions=tmp_path / "captions_train2014.json",
        val_captions=tmp_path / "captions_val2014.json",
        train_features=tmp_path / "train_feats.npy", val_features=tmp_path / "val_feats.h5",
        train_image_ids=tmp_path / "train_ids.txt", val_image_ids=tmp_path / "val_ids.json",
        features_dataset="fc7",
    )
    return tmp_path, args, train_feats, val_feats


def test_tokenize_as_cs231n():
    assert tokenize("A MAN, on a horse... near the beach!") == \
        ["a", "man", "on", "a", "horse", "near", "the", "beach"]
    assert tokenize("  two\tdogs\n") == ["two", "dogs"]


def test_build_vocab_min_count():
    w2i, i2w = build_vocab([["b", "a", "b"], ["c", "a", "d"]], min_count=2)
    assert i2w == ["<NULL>", "<START>", "<END>", "<UNK>", "a", "b"]
    assert all(w2i[w] == i for i, w in enumerate(i2w))


def test_import(inputs):
    tmp, args, train_feats, val_feats = inputs
    out = tmp / "out"
    summary = import_coco(out, min_count=2, **args)
    assert summary["splits"]["train"] == {"captions": 6, "skipped_no_features": 1,
                                          "truncated": 1, "images": 4}
    assert summary["splits"]["val"]["captions"] == 3
    with CocoData(out) as data:
        i2w = data.idx_to_word
        assert i2w[:4] == ["<NULL>", "<START>", "<END>", "<UNK>"]
        # words seen at least twice in the kept train captions, most frequent first
        # (the caption of the image without features does not count)
        assert i2w[4] == "a"
        assert set(i2w[4:]) == {"a", "man", "horse", "two", "dogs", "playing", "in", "the",
                                "snow"}
        tr, va = data.split("train"), data.split("val")
        toks = [caption_tokens(c, i2w) for c in tr.captions]
        U = "<UNK>"
        assert toks[0] == ["a", "man", U, "a", "horse"]
        assert toks[1] == ["a", "man", U, "a", "horse", U, "the", U]
        assert toks[2] == toks[3] == ["two", "dogs", "playing", "in", "the", "snow"]
        assert toks[5] == [U, "two"] + [U] * 13  # truncated to 15 words
        assert tr.captions.shape == (6, 17)
        assert tr.captions[5, 16] == data.word_to_idx["<END>"]
        # image indices are rows of the features, in the order of the id file
        np.testing.assert_array_equal(tr.image_idxs, [1, 1, 2, 2, 0, 0])
        np.testing.assert_array_equal(va.image_idxs, [1, 0, 0])
        np.testing.assert_array_equal(tr.features(np.arange(4)), train_feats)
        np.testing.assert_array_equal(va.features([0, 1]), val_feats)
        assert [caption_tokens(c, i2w) for c in va.captions] == \
            [["a", "man", U, "a", "horse"], [U, "dogs", "in", "the", "snow"], ["a", U]]
        assert tr.urls == ["http://coco/33.jpg", "http://coco/11.jpg", "http://coco/22.jpg",
                           "http://coco/55.jpg"]
        assert va.urls == ["", "http://coco/7.jpg"]
    assert (out / "train2014_vgg16_fc7_pca.h5").is_file()
    assert not list(out.glob("*.tmp*"))


def test_import_with_given_vocab_and_full_features(inputs):
    tmp, args, _, _ = inputs
    out = tmp / "out"
    from importlib import resources

    vocab = resources.files("dtrain.resources").joinpath("coco2014_vocab.json")
    import_coco(out, vocab=vocab, feature_kind="full", **args)
    with CocoData(out, pca_features=False) as data:
        assert data.vocab_size == 1004
        assert caption_tokens(data.split("val").captions[2], data.idx_to_word) == ["a", "cat"]


def test_import_cli(inputs, capsys):
    tmp, args, _, _ = inputs
    argv = ["data", "import-coco", "--out", str(tmp / "cli"), "--min-count", "1",
            "--features-dataset", "fc7"]
    for k in ("train_captions", "val_captions", "train_features", "val_features",
              "train_image_ids", "val_image_ids"):
        argv += ["--" + k.replace("_", "-"), str(args[k])]
    assert datacli.main(argv) == 0
    assert "train: 6 captions of 4 images; 1 skipped" in capsys.readouterr().out
    (tmp / "val_ids.json").write_text("[8, 7, 9]")  # three ids, two feature rows
    assert datacli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "val_feats.h5: fc7: expected 3 rows (one per id in val_ids.json), got 2" in err


@pytest.mark.parametrize("case", ["no annotations", "bad caption", "nan feature", "bad id line",
                                  "no features file", "unlisted image", "not JSON"])
def test_import_errors(inputs, case):
    tmp, args, train_feats, _ = inputs
    if case == "no annotations":
        (tmp / "captions_val2014.json").write_text(json.dumps({"images": []}))
        where = ("captions_val2014.json", "annotations")
    elif case == "bad caption":
        coco_json(tmp / "captions_train2014.json", [(11, "")], [(11, None)])
        where = ("captions_train2014.json", "annotations[0].caption")
    elif case == "nan feature":
        train_feats[2, 1] = np.nan
        np.save(tmp / "train_feats.npy", train_feats)
        where = ("train_feats.npy", "(array)")
    elif case == "unlisted image":  # one reader of annotation files: import-coco as score
        coco_json(tmp / "captions_train2014.json", [(11, "")], [(11, "a man"), (99, "a dog")])
        where = ("captions_train2014.json", "annotations[1].image_id")
    elif case == "not JSON":
        (tmp / "captions_val2014.json").write_text('{"images": [')
        where = ("captions_val2014.json", "(file)")
    elif case == "bad id line":
        (tmp / "train_ids.txt").write_text("33\n11\nabc\n")
        where = ("train_ids.txt", "line 3")
    else:
        (tmp / "train_feats.npy").unlink()
        where = ("train_feats.npy", "(file)")
    with pytest.raises(DataError) as info:
        import_coco(tmp / "out", **args)
    msg = str(info.value)
    assert f"{where[0]}: {where[1]}: expected" in msg and "\n" not in msg
