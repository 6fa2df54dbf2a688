"""The built-in data set's scenes, their 512-d features and their captions (synthetic.py).

Every image is a scene of one to three objects; its feature is a fixed random embedding
of the scene's concepts plus noise, and its five captions word the scene through the
templates and synonyms of synthetic_world.py. Everything is drawn from the generator
passed in, so the same seed gives the same arrays.
"""

from __future__ import annotations

import numpy as np

from .synthetic_world import (
    ACTION_NAMES,
    ACTIONS,
    CAPTION_SLOTS,
    CAPTIONS_PER_IMAGE,
    CATEGORIES,
    COLOUR_NAMES,
    COLOURS,
    COUNTS,
    FEATURE_DIM,
    GARMENTS,
    GROUPS,
    MAX_WORDS,
    MIN_WORDS,
    PLACE_NAMES,
    PLACES,
    SIZE_NAMES,
    SIZES,
    TEMPLATES_MAIN,
    TEMPLATES_WITH_OTHER,
    TEMPLATES_WITH_TWO,
    VERSION,
    WORLD_SEED,
)


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
        rng = np.random.default_rng(np.random.SeedSequence([WORLD_SEED, VERSION, 1]))
        priors = []
        for _, group, _, _ in CATEGORIES:
            acts = np.array([ACTION_NAMES.index(a) for a in GROUPS[group][0]])
            places = np.array([PLACE_NAMES.index(p) for p in GROUPS[group][1]])
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
    rng = np.random.default_rng(np.random.SeedSequence([WORLD_SEED, VERSION]))

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
        adjs.append(u.word(SIZES[SIZE_NAMES[size]]))
    wear = None
    if colour is not None:
        col = u.word(COLOURS[COLOUR_NAMES[colour]])
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
    action_forms = ACTIONS[ACTION_NAMES[int(s["action"][i])]]
    place_forms = PLACES[PLACE_NAMES[int(s["place"][i])]]
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
            keep = max(MIN_WORDS, min(len(candidate), MAX_WORDS))
            words = (candidate + ["there"] * MIN_WORDS)[:keep]
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
