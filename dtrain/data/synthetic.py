"""The built-in data set: a small learnable world written in the CS231n COCO layout.

Every image is a scene of one to three objects from 80 COCO-like categories. The
main object has a colour, a count, a size and an action; the scene has a place;
the other objects have a category and a count. The image's 512-d "fc7" feature is
a fixed random embedding of all of that (one sparse non-negative vector per
concept and role, summed), plus noise, through a ReLU. Five captions per image say
the main object's attributes, the place and, usually, the other objects, in varied
words: several templates, synonyms, word order, optional details. Captions are 8 to
15 words (<START> + 15 words + <END> fill the 17 slots of COCO), encoded with the
real 1004-word CS231n COCO vocabulary; a few rare synonyms are not in it and become
<UNK>, as rare words do in COCO.

The embedding of the world is fixed (it does not depend on `seed`); `seed` picks
which scenes are drawn and how they are worded. Same arguments, same bytes.

This module writes the files and keeps the cached copy; the world's tables are in
synthetic_world.py, the drawing of scenes, features and captions in synthetic_scenes.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

import h5py

from .. import env
from .coco import CAPTIONS_FILE, VOCAB_FILE, feature_file, urls_file
from .synthetic_scenes import generate_split
from .synthetic_world import CAPTIONS_PER_IMAGE, FEATURE_DIM, VERSION

__all__ = ["builtin_name", "default_cache_dir", "ensure_builtin_data", "generate_split",
           "write_synthetic"]


def _vocab_path():
    return resources.files("dtrain.resources").joinpath(VOCAB_FILE)


def write_synthetic(out_dir, train_images=20000, val_images=2000, seed=0) -> Path:
    """Write the built-in data set in the CS231n COCO layout into out_dir; return it."""
    if train_images < 1 or val_images < 1:
        raise ValueError("--train-images and --val-images must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_text = _vocab_path().read_text(encoding="utf-8")
    word_to_idx = json.loads(vocab_text)["word_to_idx"]
    (out / VOCAB_FILE).write_text(vocab_text, encoding="utf-8")
    # No timestamps in the HDF5 headers, so the same arguments give the same bytes.
    with h5py.File(out / CAPTIONS_FILE, "w", track_order=False) as cf:
        for split, n in (("train", train_images), ("val", val_images)):
            captions, image_idxs, features, _ = generate_split(int(n), int(seed), split,
                                                               word_to_idx)
            cf.create_dataset(f"{split}_captions", data=captions, track_times=False)
            cf.create_dataset(f"{split}_image_idxs", data=image_idxs, track_times=False)
            with h5py.File(out / feature_file(split, True), "w") as ff:
                ff.create_dataset("features", data=features, track_times=False)
            (out / urls_file(split)).write_text(
                "".join(f"https://synthetic.invalid/dtrain/{split}2014/{i:012d}.jpg\n"
                        for i in range(int(n))), encoding="utf-8")
    meta = {"generator": "dtrain.synthetic", "version": VERSION, "seed": int(seed),
            "train_images": int(train_images), "val_images": int(val_images),
            "captions_per_image": CAPTIONS_PER_IMAGE, "feature_dim": FEATURE_DIM}
    (out / "dtrain_synthetic.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def default_cache_dir() -> Path:
    cache = env.get("DTRAIN_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "dtrain"


def builtin_name(train_images=20000, val_images=2000, seed=0) -> str:
    return f"synthetic-v{VERSION}-{int(train_images)}x{int(val_images)}-seed{int(seed)}"


def ensure_builtin_data(cache_dir=None, train_images=20000, val_images=2000, seed=0) -> Path:
    """The built-in data set under cache_dir, generated on first use and then reused.

    It is written into a temporary directory beside the final one and renamed into
    place, so a concurrent or killed generation never leaves a partial data set under
    the real name. Call it on one rank and share the path.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = builtin_name(train_images, val_images, seed)
    final = cache / name
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
    try:
        write_synthetic(tmp, train_images, val_images, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temporaries(cache: Path, name: str, older_than_s=3600.0):
    """Leftovers of killed generations (old enough that nobody is still writing them)."""
    now = time.time()
    for p in cache.glob(f".{name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
