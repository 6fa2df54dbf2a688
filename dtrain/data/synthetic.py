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
import numpy as np

from .coco import CAPTIONS_FILE, VOCAB_FILE, feature_file, urls_file

VERSION = 1
FEATURE_DIM = 512
CAPTION_SLOTS = 17
MIN_WORDS, MAX_WORDS = 8, CAPTION_SLOTS - 2
CAPTIONS_PER_IMAGE = 5
_WORLD_SEED = 2014  # the embedding of concepts; fixed so every seed samples one world

# --- the world --------------------------------------------------------------
# A synonym list may end in rare forms marked with "*": drawn 4% of the time. Most of
# those are outside the COCO vocabulary and become <UNK>.

ACTIONS = {
    "standing": ["standing", "posing"], "sitting": ["sitting", "seated", "resting"],
    "walking": ["walking"], "running": ["running", "jogging*"], "playing": ["playing"],
    "eating": ["eating"], "talking": ["talking"], "smiling": ["smiling"],
    "grazing": ["grazing", "eating grass"], "laying": ["laying down", "lying down", "laying"],
    "sleeping": ["sleeping", "napping*"], "parked": ["parked"],
    "driving": ["driving", "traveling", "moving"], "stopped": ["stopped", "waiting"],
    "flying": ["flying", "soaring*"], "landing": ["landing", "taking off"],
    "floating": ["floating", "docked"], "placed": ["sitting", "placed", "resting"],
    "displayed": ["displayed", "shown"], "hanging": ["hanging"], "served": ["served", "ready"],
    "sliced": ["sliced", "cut"],
}

PLACES = {
    "street": ["on a street", "on the street", "on a city street", "on the road"],
    "field": ["in a field", "on the grass", "in a grassy field"],
    "park": ["in a park", "at the park"],
    "beach": ["on the beach", "on the sand", "near the ocean", "by the water"],
    "snow": ["in the snow", "on a snowy hill", "on the snow"],
    "kitchen": ["in a kitchen", "in the kitchen"],
    "table": ["on a table", "on top of a table", "on a wooden table"],
    "room": ["in a room", "in a living room", "in the living room"],
    "bedroom": ["in a bedroom", "in the bedroom"],
    "bathroom": ["in a bathroom", "in the bathroom"],
    "airport": ["at an airport", "on the runway", "on the tarmac"],
    "sky": ["in the sky", "in the air", "through the sky"],
    "station": ["at a station", "on the tracks", "at the train station"],
    "water": ["in the water", "on the water", "on a lake", "on the river"],
    "zoo": ["at the zoo", "in an enclosure", "in a zoo enclosure"],
    "forest": ["in the woods", "in a forest"],
    "counter": ["on a counter", "on the kitchen counter"],
    "plate": ["on a plate", "on a tray", "on a dish"],
    "desk": ["on a desk", "in an office", "on an office desk"],
    "market": ["at a market", "at the market"],
    "restaurant": ["in a restaurant", "at a restaurant"],
    "yard": ["in a yard", "in the yard", "in the backyard*"],
    "court": ["on a tennis court", "on the court"],
    "hill": ["on a hill", "on a mountain", "on a slope"],
    "parking": ["in a parking lot", "in the lot"],
    "sidewalk": ["on the sidewalk", "by the curb", "near the sidewalk"],
    "dock": ["at the dock", "near a pier"],
}

# group: (actions, places)
GROUPS = {
    "person": (["standing", "sitting", "walking", "running", "playing", "eating", "talking",
                "smiling"],
               ["street", "field", "park", "beach", "snow", "kitchen", "room", "court",
                "restaurant", "market"]),
    "animal": (["standing", "walking", "grazing", "laying", "running", "sleeping"],
               ["field", "park", "zoo", "forest", "beach", "yard", "street"]),
    "vehicle": (["parked", "driving", "stopped"], ["street", "parking", "sidewalk", "hill"]),
    "aircraft": (["flying", "parked", "landing"], ["airport", "sky"]),
    "rail": (["driving", "stopped", "parked"], ["station"]),
    "boat": (["floating", "parked"], ["water", "dock", "beach"]),
    "street": (["standing", "placed"], ["street", "sidewalk", "park"]),
    "food": (["placed", "served", "displayed", "sliced"],
             ["table", "plate", "counter", "restaurant", "market"]),
    "household": (["placed", "displayed", "hanging"],
                  ["table", "room", "kitchen", "bedroom", "bathroom", "desk", "counter"]),
    "sport": (["placed", "laying", "hanging"], ["beach", "snow", "field", "park", "court"]),
    "electronic": (["placed", "displayed"], ["desk", "table", "room"]),
}

# name, group, singular forms, plural forms
CATEGORIES = [
    ("person", "person", ["man", "woman", "person"], ["people", "men", "women"]),
    ("child", "person", ["boy", "girl", "child", "kid"], ["children", "kids", "boys", "girls"]),
    ("bicycle", "vehicle", ["bicycle", "bike"], ["bicycles", "bikes"]),
    ("car", "vehicle", ["car", "vehicle", "automobile*"], ["cars", "vehicles"]),
    ("motorcycle", "vehicle", ["motorcycle", "motor bike", "motorbike*"], ["motorcycles"]),
    ("airplane", "aircraft", ["airplane", "plane", "jet", "airliner*"], ["airplanes", "planes"]),
    ("bus", "vehicle", ["bus", "city bus", "double decker bus"], ["buses"]),
    ("train", "rail", ["train", "passenger train", "commuter train"], ["trains"]),
    ("truck", "vehicle", ["truck", "pickup truck*"], ["trucks"]),
    ("boat", "boat", ["boat", "ship"], ["boats"]),
    ("traffic light", "street", ["traffic light", "traffic signal"], ["traffic lights"]),
    ("fire hydrant", "street", ["fire hydrant", "hydrant"], ["fire hydrants*"]),
    ("stop sign", "street", ["stop sign", "sign"], ["stop signs", "signs"]),
    ("parking meter", "street", ["parking meter", "meter"], ["parking meters*"]),
    ("bench", "street", ["bench", "park bench"], ["benches"]),
    ("bird", "animal", ["bird"], ["birds"]),
    ("cat", "animal", ["cat", "kitten"], ["cats"]),
    ("dog", "animal", ["dog", "puppy*"], ["dogs"]),
    ("horse", "animal", ["horse", "pony*"], ["horses"]),
    ("sheep", "animal", ["sheep"], ["sheep"]),
    ("cow", "animal", ["cow", "bull*"], ["cows", "cattle"]),
    ("elephant", "animal", ["elephant"], ["elephants"]),
    ("bear", "animal", ["bear", "polar bear"], ["bears"]),
    ("zebra", "animal", ["zebra"], ["zebras"]),
    ("giraffe", "animal", ["giraffe"], ["giraffes"]),
    ("backpack", "household", ["backpack"], ["backpacks*"]),
    ("umbrella", "street", ["umbrella"], ["umbrellas"]),
    ("handbag", "household", ["bag", "handbag*"], ["bags"]),
    ("tie", "household", ["tie", "neck tie"], ["ties"]),
    ("suitcase", "household", ["suitcase", "piece of luggage"], ["suitcases", "luggage"]),
    ("frisbee", "sport", ["frisbee"], ["frisbees*"]),
    ("skis", "sport", ["pair of skis", "skis"], ["skis"]),
    ("snowboard", "sport", ["snowboard"], ["snowboards*"]),
    ("sports ball", "sport", ["ball", "soccer ball", "tennis ball"], ["balls*"]),
    ("kite", "sport", ["kite"], ["kites"]),
    ("baseball bat", "sport", ["baseball bat", "bat"], ["bats*"]),
    ("baseball glove", "sport", ["baseball glove", "glove"], ["gloves*"]),
    ("skateboard", "sport", ["skateboard", "skate board"], ["skateboards"]),
    ("surfboard", "sport", ["surfboard", "surf board"], ["surfboards"]),
    ("tennis racket", "sport", ["tennis racket", "racket", "racquet"], ["rackets"]),
    ("bottle", "household", ["bottle", "bottle of wine"], ["bottles"]),
    ("wine glass", "household", ["wine glass", "glass"], ["wine glasses", "glasses"]),
    ("cup", "household", ["cup", "coffee cup", "mug*"], ["cups"]),
    ("fork", "household", ["fork"], ["forks*"]),
    ("knife", "household", ["knife"], ["knives*"]),
    ("spoon", "household", ["spoon"], ["spoons*"]),
    ("bowl", "household", ["bowl"], ["bowls"]),
    ("banana", "food", ["banana", "bunch of bananas"], ["bananas"]),
    ("apple", "food", ["apple"], ["apples"]),
    ("sandwich", "food", ["sandwich"], ["sandwiches"]),
    ("orange", "food", ["orange"], ["oranges"]),
    ("broccoli", "food", ["broccoli", "piece of broccoli"], ["broccoli"]),
    ("carrot", "food", ["carrot"], ["carrots"]),
    ("hot dog", "food", ["hot dog", "hotdog"], ["hot dogs"]),
    ("pizza", "food", ["pizza", "slice of pizza"], ["pizzas", "slices of pizza"]),
    ("donut", "food", ["donut", "doughnut"], ["donuts", "doughnuts"]),
    ("cake", "food", ["cake", "birthday cake", "cupcake*"], ["cakes"]),
    ("chair", "household", ["chair", "wooden chair"], ["chairs"]),
    ("couch", "household", ["couch", "sofa"], ["couches"]),
    ("potted plant", "household", ["potted plant", "plant"], ["plants", "potted plants"]),
    ("bed", "household", ["bed"], ["beds"]),
    ("dining table", "household", ["table", "dining table"], ["tables"]),
    ("toilet", "household", ["toilet"], ["toilets"]),
    ("tv", "electronic", ["television", "tv"], ["televisions*"]),
    ("laptop", "electronic", ["laptop", "laptop computer"], ["laptops"]),
    ("mouse", "electronic", ["computer mouse", "mouse"], ["mice*"]),
    ("remote", "electronic", ["remote", "remote control"], ["remotes*"]),
    ("keyboard", "electronic", ["keyboard"], ["keyboards*"]),
    ("cell phone", "electronic", ["cell phone", "phone", "cellphone"], ["phones", "cell phones"]),
    ("microwave", "household", ["microwave"], ["microwaves*"]),
    ("oven", "household", ["oven", "stove"], ["ovens*"]),
    ("toaster", "household", ["toaster*"], ["toasters*"]),
    ("sink", "household", ["sink"], ["sinks"]),
    ("refrigerator", "household", ["refrigerator", "fridge"], ["refrigerators*"]),
    ("book", "household", ["book"], ["books"]),
    ("clock", "street", ["clock", "clock tower"], ["clocks"]),
    ("vase", "household", ["vase", "vase of flowers"], ["vases"]),
    ("scissors", "household", ["pair of scissors", "scissors"], ["scissors"]),
    ("teddy bear", "household", ["teddy bear", "stuffed bear"], ["teddy bears", "stuffed animals"]),
    ("hair drier", "household", ["hair dryer*"], ["hair dryers*"]),
    ("toothbrush", "household", ["toothbrush"], ["toothbrushes*"]),
]

COLOURS = {
    "red": ["red", "crimson*"], "blue": ["blue"], "green": ["green"], "yellow": ["yellow"],
    "black": ["black"], "white": ["white"], "brown": ["brown", "tan"], "orange": ["orange"],
    "pink": ["pink"], "purple": ["purple", "violet*"], "gray": ["gray", "grey"],
    "silver": ["silver", "metal"],
}
SIZES = {"small": ["small", "little", "tiny*"], "large": ["large", "big", "huge", "giant"]}
# count classes: one, two, three, many
COUNTS = {1: ["a"], 2: ["two", "a pair of"], 3: ["three"], 4: ["several", "many", "a group of",
                                                                  "a bunch of", "some"]}
GARMENTS = ["shirt", "jacket", "hat", "coat", "dress", "suit"]

TEMPLATES_MAIN = [
    "{np} {be} {vp} {pl}",
    "{np} {vp} {pl}",
    "there {be} {np} {vp} {pl}",
    "{pl} {np} {be} {vp}",
    "{np} that {be} {vp} {pl}",
    "a photo of {np} {vp} {pl}",
    "a view of {np} {vp} {pl}",
    "an image of {np} {pl}",
    "a close up of {np} {vp} {pl}",
]
TEMPLATES_WITH_OTHER = [
    "{np} {vp} {pl} next to {s1}",
    "{np} {be} {vp} near {s1} {pl}",
    "{np} and {s1} {pl}",
    "{np} {vp} {pl} with {s1} nearby",
    "{np} with {s1} {vp} {pl}",
    "{np} {be} {vp} {pl} beside {s1}",
    "there {be} {np} and {s1} {pl}",
    "{pl} {np} {be} {vp} by {s1}",
]
TEMPLATES_WITH_TWO = [
    "{np} {vp} {pl} with {s1} and {s2}",
    "{np} and {s1} and {s2} {pl}",
    "{np} {be} {vp} {pl} near {s1} and {s2}",
]

_CAT_INDEX = {c[0]: i for i, c in enumerate(CATEGORIES)}
_GROUP_NAMES = list(GROUPS)
_ACTION_NAMES = list(ACTIONS)
_PLACE_NAMES = list(PLACES)
_COLOUR_NAMES = list(COLOURS)
_SIZE_NAMES = list(SIZES)


def _vocab_path():
    return resources.files("dtrain.resources").joinpath(VOCAB_FILE)


class _Uniforms:
    """Fast deterministic scalar draws: Python floats from blocks of numpy uniforms."""

    def __init__(self, rng: np.random.Generator, block=1 << 16):
        self._rng, self._block = rng, block
        self._buf, self._i = [], 0

    def u(self) -> float:
        if self._i == len(self._buf):
            self._buf, self._i = self._rng.random(self._block).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]

    def pick(self, seq):
        return seq[int(self.u() * len(seq))]

    def usual(self, seq, p_first=0.5):
        """The first (usual) item with probability p_first, else any, uniformly."""
        return seq[0] if self.u() < p_first else self.pick(seq)

    def word(self, forms):
        """A synonym: usually the first form, sometimes another common one, and a
        rare (*) form 4% of the time."""
        common = [f for f in forms if not f.endswith("*")]
        rare = [f[:-1] for f in forms if f.endswith("*")]
        if rare and (not common or self.u() < 0.04):
            return self.pick(rare)
        return self.usual(common)


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


# --- scenes ------------------------------------------------------------------


def _habit(rng, k, first=0.6, second=0.2):
    """Probabilities over k values: a favourite, a second choice, the rest spread."""
    order = rng.permutation(k)
    p = np.zeros(k)
    if k == 1:
        return np.ones(1)
    rest = (1.0 - first - (second if k > 2 else 0.0)) / max(1, k - 2)
    p[order[0]] = first
    p[order[1]] = second if k > 2 else 1.0 - first
    p[order[2:]] = rest
    return p / p.sum()


_PRIORS = None


def _world_priors():
    """Per category: (values, probabilities) of its colour, size, action and place."""
    global _PRIORS
    if _PRIORS is None:
        rng = np.random.default_rng(np.random.SeedSequence([_WORLD_SEED, VERSION, 1]))
        priors = []
        for _, group, _, _ in CATEGORIES:
            acts = np.array([_ACTION_NAMES.index(a) for a in GROUPS[group][0]])
            places = np.array([_PLACE_NAMES.index(p) for p in GROUPS[group][1]])
            priors.append({
                "colour": (np.arange(len(COLOURS)), _habit(rng, len(COLOURS), 0.8, 0.15)),
                "size": (np.arange(len(SIZES)), _habit(rng, len(SIZES), 0.85)),
                "action": (acts, _habit(rng, len(acts), 0.8, 0.15)),
                "place": (places, _habit(rng, len(places), 0.8, 0.15)),
            })
        _PRIORS = priors
    return _PRIORS


def _draw_scenes(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Scene contents as integer arrays (vectorised). Secondary slots are -1 when absent."""
    ncat = len(CATEGORIES)
    # People and animals are common in COCO; weight categories a little.
    weights = np.ones(ncat)
    for i, (_, group, _, _) in enumerate(CATEGORIES):
        weights[i] = {"person": 6.0, "animal": 2.0, "vehicle": 1.5}.get(group, 1.0)
    weights /= weights.sum()
    main = rng.choice(ncat, size=n, p=weights)
    num_objects = rng.choice([1, 2, 3], size=n, p=[0.35, 0.45, 0.20])
    count = rng.choice([1, 2, 3, 4], size=n, p=[0.55, 0.2, 0.1, 0.15])
    # Things whose plural is rare (outside the vocabulary) come one at a time.
    has_plural = np.array([any(not w.endswith("*") for w in c[3]) for c in CATEGORIES])
    count = np.where(has_plural[main], count, 1)
    # Attributes follow the category's habits (a world where giraffes are mostly one
    # colour and mostly in one place), so most of a caption follows from what the object is.
    colour = np.empty(n, np.int64)
    size = np.empty(n, np.int64)
    action = np.empty(n, np.int64)
    place = np.empty(n, np.int64)
    for c, prior in enumerate(_world_priors()):
        m = np.flatnonzero(main == c)
        for out, key in ((colour, "colour"), (size, "size"), (action, "action"),
                         (place, "place")):
            values, p = prior[key]
            out[m] = values[rng.choice(len(values), size=len(m), p=p)]
    other = np.full((n, 2), -1, np.int64)
    other_count = np.zeros((n, 2), np.int64)
    for j in range(2):
        present = num_objects > j + 1
        # Any category other than the main one (and the first other object).
        c = rng.integers(0, ncat - 1 - j, n)
        for prev in ([main] if j == 0 else [np.minimum(main, other[:, 0]),
                                             np.maximum(main, other[:, 0])]):
            c = c + (c >= prev)
        other[present, j] = c[present]
        k = np.where(has_plural[c], rng.choice([1, 2], size=n, p=[0.8, 0.2]), 1)
        other_count[present, j] = k[present]
    return {"main": main, "colour": colour, "size": size, "count": count, "action": action,
            "place": place, "other": other, "other_count": other_count}


def _embedding_tables(dim=FEATURE_DIM):
    """Fixed sparse non-negative vectors, one per concept and role."""
    rng = np.random.default_rng(np.random.SeedSequence([_WORLD_SEED, VERSION]))

    def table(rows, density=0.12, scale=1.0):
        mask = rng.random((rows, dim)) < density
        return (scale * mask * rng.exponential(1.0, (rows, dim))).astype(np.float32)

    return {
        "main": table(len(CATEGORIES), density=0.2, scale=3.0),
        "colour": table(len(COLOURS)),
        "size": table(len(SIZES)),
        "count": table(4),
        "action": table(len(ACTIONS)),
        "place": table(len(PLACES)),
        "other": table(len(CATEGORIES)),
        "other_plural": table(1, scale=0.7),
        "bias": table(1, density=0.5, scale=0.3),
    }


def _features(scenes, rng: np.random.Generator, noise=0.25, scale=0.1) -> np.ndarray:
    """(N, 512) float32: the sum of the scene's concept vectors, plus noise, ReLU.

    `scale` keeps values small (mean ~0.15, RMS ~0.27): with CS231n's initialisation
    the projected h0 then starts out of tanh saturation, and a small RNN learns to use
    the image in a few hundred steps instead of thousands.
    """
    E = _embedding_tables()
    f = (E["main"][scenes["main"]] + E["colour"][scenes["colour"]] + E["size"][scenes["size"]]
         + E["count"][scenes["count"] - 1] + E["action"][scenes["action"]]
         + E["place"][scenes["place"]] + E["bias"][0])
    for j in range(2):
        present = scenes["other"][:, j] >= 0
        o = np.where(present, scenes["other"][:, j], 0)
        f += present[:, None] * (E["other"][o] + (scenes["other_count"][:, j] > 1)[:, None]
                                 * E["other_plural"][0])
    f += noise * rng.standard_normal(f.shape, dtype=np.float32)
    f *= scale
    return np.maximum(f, 0.0, out=f).astype(np.float32)


# --- captions ----------------------------------------------------------------


def _noun_phrase(u: _Uniforms, cat: int, count: int, colour: int | None, size: int | None):
    _, group, singular, plural = CATEGORIES[cat]
    noun = u.word(singular if count == 1 else plural)
    adjs = []
    if size is not None:
        adjs.append(u.word(SIZES[_SIZE_NAMES[size]]))
    wear = None
    if colour is not None:
        col = u.word(COLOURS[_COLOUR_NAMES[colour]])
        if group == "person":
            wear = f"{u.pick(['in a', 'wearing a'])} {col} {u.pick(GARMENTS)}"
        else:
            adjs.append(col)
    body = " ".join(adjs + [noun])
    det = u.word(COUNTS[count])
    if det == "a":
        det = _article(body)
    np_ = f"{det} {body}"
    return np_ + (f" {wear}" if wear else "")


def _captions_for(u: _Uniforms, s: dict, i: int) -> list[str]:
    main, count = int(s["main"][i]), int(s["count"][i])
    colour, size = int(s["colour"][i]), int(s["size"][i])
    others = [(int(c), int(k)) for c, k in zip(s["other"][i], s["other_count"][i]) if c >= 0]
    action_forms = ACTIONS[_ACTION_NAMES[int(s["action"][i])]]
    place_forms = PLACES[_PLACE_NAMES[int(s["place"][i])]]
    out = []
    for _ in range(CAPTIONS_PER_IMAGE):
        words = None
        for _attempt in range(40):
            r = u.u()
            if len(others) == 2 and r < 0.35:
                template = u.usual(TEMPLATES_WITH_TWO)
            elif others and r < 0.75:
                template = u.usual(TEMPLATES_WITH_OTHER)
            else:
                template = u.usual(TEMPLATES_MAIN)
            fields = {
                "np": _noun_phrase(u, main, count, colour, size if u.u() < 0.55 else None),
                "be": "is" if count == 1 else "are",
                "vp": u.word(action_forms),
                "pl": u.word(place_forms),
            }
            for j, (c, k) in enumerate(others):
                fields[f"s{j + 1}"] = _noun_phrase(u, c, k, None, None)
            candidate = template.format(**fields).split()
            if MIN_WORDS <= len(candidate) <= MAX_WORDS:
                words = candidate
                break
        if words is None:  # pragma: no cover - the templates always reach the range
            words = (candidate + ["there"] * MIN_WORDS)[:max(MIN_WORDS, min(len(candidate), MAX_WORDS))]
        out.append(" ".join(words))
    return out


def _encode(caption: str, word_to_idx: dict[str, int]) -> list[int]:
    unk = word_to_idx["<UNK>"]
    ids = [word_to_idx["<START>"]] + [word_to_idx.get(w, unk) for w in caption.split()]
    ids.append(word_to_idx["<END>"])
    return ids + [word_to_idx["<NULL>"]] * (CAPTION_SLOTS - len(ids))


def generate_split(num_images: int, seed: int, split: str, word_to_idx):
    """(captions (5N, 17) int32, image_idxs (5N,) int32, features (N, 512) float32, scenes)."""
    split_id = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng(np.random.SeedSequence([seed, VERSION, split_id]))
    scenes = _draw_scenes(num_images, rng)
    features = _features(scenes, rng)
    u = _Uniforms(rng)
    captions = np.empty((num_images * CAPTIONS_PER_IMAGE, CAPTION_SLOTS), np.int32)
    row = 0
    for i in range(num_images):
        for text in _captions_for(u, scenes, i):
            captions[row] = _encode(text, word_to_idx)
            row += 1
    image_idxs = np.repeat(np.arange(num_images, dtype=np.int32), CAPTIONS_PER_IMAGE)
    return captions, image_idxs, features, scenes


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
    env = os.environ.get("DTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dtrain"


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
