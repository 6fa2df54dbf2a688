"""The COCO caption metrics of one set of hypotheses: BLEU-1..4, ROUGE-L, CIDEr-D, and
METEOR and SPICE from pycocoevalcap where they can run.

Tokenisation. The default, ``simple``, is CS231n's (and ``data import-coco``'s): lower
case, ASCII punctuation removed, split on white space. On captions that are already lower
case and free of punctuation (every caption dtrain samples, and the references of its
data sets) it gives the same tokens as pycocoevalcap's PTB tokenizer, which lower-cases,
splits off punctuation and drops it. ``ptb`` runs that tokenizer itself (it needs Java
and pycocoevalcap, the ``coco-eval`` extra): use it to compare with published numbers on
raw annotation text.

BLEU, ROUGE-L and CIDEr-D are this package's own code (bleu.py, rouge.py, cider.py),
tested equal to pycocoevalcap's scorers. METEOR and SPICE are pycocoevalcap's (Java);
when they cannot run, :func:`extra_metrics_missing` says why in one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import string
from pathlib import Path

from .bleu import corpus_bleu
from .cider import corpus_cider_d
from .rouge import corpus_rouge_l

TOKENIZERS = ("simple", "ptb")
OWN_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def simple_tokenize(caption: str) -> list[str]:
    """Lower case, ASCII punctuation removed, split on white space."""
    return caption.lower().translate(_PUNCTUATION).split()


def ptb_tokenize(captions: dict) -> dict:
    """{key: [caption, ...]} -> {key: [[token, ...], ...]} with pycocoevalcap's PTB
    tokenizer (Java). Raises MetricUnavailable when it cannot run."""
    missing = _java_missing()
    if missing:
        raise MetricUnavailable(f"--tokenizer ptb: {missing}")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    blob = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        out = PTBTokenizer().tokenize(blob)
    return {k: [s.split() for s in out[k]] for k in captions}


class MetricUnavailable(RuntimeError):
    """A metric or tokenizer that needs something not installed here (message: what)."""


def caption_metrics(hypotheses, references) -> dict:
    """{bleu1..bleu4, rouge_l, cider_d} of token lists: one hypothesis per image, and per
    image the token lists of its references. The same inputs give the same numbers, so
    evaluation gathered from any number of ranks scores identically."""
    bleu = corpus_bleu(hypotheses, references)
    rouge, _ = corpus_rouge_l(hypotheses, references)
    cider, _ = corpus_cider_d(hypotheses, references)
    out = {f"bleu{k + 1}": float(b) for k, b in enumerate(bleu)}
    out.update(rouge_l=float(rouge), cider_d=float(cider))
    return out


def _java_missing():
    """Why pycocoevalcap's Java scorers cannot run here, or None."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install -e '.[coco-eval]')"
    if shutil.which("java") is None:
        return "no `java` on PATH (METEOR, SPICE and the PTB tokenizer need Java)"
    return None


def _spice_missing():
    spec = importlib.util.find_spec("pycocoevalcap.spice")
    if spec is None or not spec.submodule_search_locations:
        return "pycocoevalcap has no spice module"
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    jar = lib / "stanford-corenlp-3.6.0.jar"
    if not jar.is_file():
        return (f"needs {jar} and its -models jar, Stanford CoreNLP 3.6.0, which "
                "pycocoevalcap's get_stanford_models downloads")
    return None


def extra_metrics_missing(which=("meteor", "spice")) -> dict:
    """{metric: why it cannot run} for those of ``which`` that cannot run here."""
    java = _java_missing()
    if java:
        return {m: java for m in which}
    out = {}
    if "spice" in which:
        spice = _spice_missing()
        if spice:
            out["spice"] = spice
    return out


def extra_metrics(hypotheses, references, which=("meteor", "spice")) -> tuple[dict, dict]:
    """(scores, missing): METEOR and SPICE from pycocoevalcap for those that can run, and
    for the others the reason. Inputs are token lists, joined by single spaces."""
    missing = extra_metrics_missing(which)
    scores = {}
    if not hypotheses:
        return scores, missing
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    for name in which:
        if name in missing:
            continue
        if name == "meteor":
            from pycocoevalcap.meteor.meteor import Meteor as scorer
        else:
            from pycocoevalcap.spice.spice import Spice as scorer
        cwd = os.getcwd()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                value, _ = scorer().compute_score(gts, res)
        except Exception as exc:  # a Java failure is reported, not fatal to the other metrics
            missing[name] = f"pycocoevalcap's {name} failed: {type(exc).__name__}: {exc}"
            continue
        finally:
            os.chdir(cwd)
        scores[name] = float(value)
    return scores, missing


def missing_line(missing: dict) -> str:
    """One line naming what was not computed and why."""
    return "not computed: " + "; ".join(f"{m.upper()} ({why})" for m, why in missing.items())
