"""Evaluation end to end: `evaluate --beam-size --results-out` on 1 and 2 ranks (real mpiexec),
and `score` of that file against COCO-format annotations built as test_coco_import builds them."""

import json

import numpy as np
import pytest
from test_coco_import import coco_json

from dtrain.checkpoint import latest_checkpoint
from dtrain.data.coco_import import import_coco
from dtrain_run import run_dtrain

WORDS = "a man dog cat on the horse sits runs near red blue big small grass".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A COCO-format data set (every val word also in train, so the vocabulary has no <UNK>
    in the references) imported with `data import-coco`, and a checkpoint trained on it."""
    tmp = tmp_path_factory.mktemp("coco_eval")
    rng = np.random.default_rng(0)

    def captions(ids):
        return [(i, " ".join(rng.choice(WORDS, size=rng.integers(3, 9))).capitalize() + ".")
                for i in ids for _ in range(rng.integers(1, 5))]

    train_ids, val_ids = list(range(100, 140)), [7, 8, 9, 1001, 1002, 1003, 1004, 55]
    train_caps = [(100, " ".join(WORDS))] + captions(train_ids)
    val_caps = captions(val_ids)
    coco_json(tmp / "captions_train2014.json",
              [(i, f"http://x/train2014/COCO_train2014_{i:012d}.jpg") for i in train_ids],
              train_caps)
    coco_json(tmp / "captions_val2014.json", [(i, f"http://x/{i}.jpg") for i in val_ids], val_caps)
    np.save(tmp / "train.npy", rng.standard_normal((40, 6)).astype(np.float32))
    np.save(tmp / "val.npy", rng.standard_normal((8, 6)).astype(np.float32))
    (tmp / "train_ids.json").write_text(json.dumps(train_ids))
    (tmp / "val_ids.json").write_text(json.dumps(val_ids))
    import_coco(tmp / "data", tmp / "captions_train2014.json", tmp / "captions_val2014.json",
                tmp / "train.npy", tmp / "val.npy", tmp / "train_ids.json", tmp / "val_ids.json",
                min_count=1)
    run_dtrain(None, "train", "--data", tmp / "data", "--checkpoint-dir", tmp / "ck", "--steps",
               30, "--batch-size", 16, "--hidden-dim", 16, "--wordvec-dim", 8, "--lr", "2e-2",
               "--eval-images", 8, "--eval-captions", 16, "--max-length", 10, "--quiet")
    return tmp, latest_checkpoint(tmp / "ck")


def _evaluate(ranks, ck, *extra):
    p = run_dtrain(ranks, "evaluate", "--checkpoint", ck, "--max-length", 10,
                   "--extra-metrics", "off", *extra, timeout=120)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _score(*args, check=True):
    return run_dtrain(None, "score", *args, check=check, timeout=60)


METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d")


@pytest.mark.timeout(300)
def test_evaluate_same_on_two_ranks_and_score_agrees(trained):
    tmp, ck = trained
    annotations = tmp / "captions_val2014.json"
    reports = {}
    for ranks in (None, 2):
        for k in (1, 3):
            out = tmp / f"results_{ranks}_{k}.json"
            reports[ranks, k] = _evaluate(ranks, ck, "--beam-size", k, "--results-out", out,
                                          "--html-out", tmp / f"page_{ranks}_{k}.html")
            assert reports[ranks, k]["beam_size"] == k
    for k in (1, 3):
        one, two = reports[None, k], reports[2, k]
        assert two["ranks"] == 2 and one["images"] == 8
        assert {m: one[m] for m in METRICS} == {m: two[m] for m in METRICS}  # bit for bit
        assert (tmp / f"results_None_{k}.json").read_text() == \
            (tmp / f"results_2_{k}.json").read_text()
    # the results file: COCO format, the COCO ids of the data set, one caption per image
    results = json.loads((tmp / "results_None_3.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted([7, 8, 9, 1001, 1002, 1003, 1004, 55])
    assert all(set(r) == {"image_id", "caption"} for r in results)
    assert reports[None, 3]["image_ids"].startswith("image ids from the file names")
    # score reads it back against the annotations: the same numbers as evaluate, since
    # every reference word is in the vocabulary and captions are short
    for k in (1, 3):
        p = _score(tmp / f"results_None_{k}.json", "--annotations", annotations, "--json",
                   "--extra-metrics", "off")
        scored = json.loads(p.stdout.strip().splitlines()[-1])
        assert scored["images"] == 8
        for m in METRICS:
            assert scored[m] == pytest.approx(reports[None, k][m], rel=1e-12, abs=1e-15), m
    assert reports[None, 1]["cider_d"] > 0
    # sample decodes with the same beam search, sharded over 2 ranks: the same captions
    s = run_dtrain(2, "sample", "--checkpoint", ck, "-n", 8, "--max-length", 10,
                   "--beam-size", 3).stdout
    assert "beam search, 3 beams" in s
    sampled = [line.split(":", 1)[1].strip() for line in s.splitlines() if "sampled :" in line]
    assert sorted(sampled) == sorted(r["caption"] for r in results)
    page = (tmp / "page_2_3.html").read_text()
    assert page.count('<td class="hyp">') == 8 and "CIDEr-D" in page
    assert f"{reports[2, 3]['cider_d']:.4f}" in page and "beam search, 3 beams" in page
    assert '<a href="http://x/1001.jpg">1001</a>' in page


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_page_in_headless_chromium(trained, tmp_path):
    """The page as a real browser parses it: the DOM has the table rows, and a screenshot
    is drawn (docs/images/evaluate-html.png is one, looked at)."""
    import subprocess

    if _chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    from dtrain.captions_html import write_captions_page

    page = write_captions_page(tmp_path / "p.html", "t <&>", {"bleu4": 0.5, "cider_d": 1.25},
                               [(7, "a man <b>on</b> a horse", ["a man", "a horse"], None),
                                (8, "", ["two dogs"], "http://x/8.jpg")], {"images": 2})
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    # parsed by the browser: it adds the <tbody> our text leaves out; 2 + 3 rows
    assert dom.count("<tbody>") == 2 and dom.count("<tr>") == 5, dom[-2000:]
    assert "a man &lt;b&gt;on&lt;/b&gt; a horse" in dom
    assert "<td class=\"num\">1.2500</td>" in dom and "(empty)" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=900,400",
                    page.as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 2000


def test_score_agrees_with_pycocoevalcap_on_raw_text(trained, tmp_path):
    """Raw annotation text (capitals, full stops): --tokenizer ptb gives pycocoevalcap's own
    COCOEvalCap numbers for BLEU, ROUGE-L and CIDEr-D."""
    pytest.importorskip("pycocotools")
    eval_mod = pytest.importorskip("pycocoevalcap.eval")
    from dtrain.data.metrics import _java_missing

    if _java_missing():
        pytest.skip(_java_missing())
    tmp, _ = trained
    annotations = tmp / "captions_val2014.json"
    ids = [7, 8, 9, 1001, 55]
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": i, "caption": f"A man, on the {w} horse."}
                               for i, w in zip(ids, WORDS)]))
    p = _score(res, "--annotations", annotations, "--json", "--tokenizer", "ptb",
               "--extra-metrics", "off")
    ours = json.loads(p.stdout.strip().splitlines()[-1])
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
        coco_res = coco.loadRes(str(res))
        ev = eval_mod.COCOEvalCap(coco, coco_res)
        ev.params["image_id"] = coco_res.getImgIds()  # as the COCO example does
        ev.evaluate = _without_java_scorers(ev)
        ev.evaluate()
    theirs = {"bleu1": ev.eval["Bleu_1"], "bleu4": ev.eval["Bleu_4"],
              "rouge_l": ev.eval["ROUGE_L"], "cider_d": ev.eval["CIDEr"]}
    for m, v in theirs.items():
        assert abs(ours[m] - v) <= 1e-9, (m, ours[m], v)


def _without_java_scorers(ev):
    """COCOEvalCap.evaluate with Bleu, Rouge and Cider only (its METEOR and SPICE need more)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def evaluate():
        ids = ev.params["image_id"]
        gts = PTBTokenizer().tokenize({i: ev.coco.imgToAnns[i] for i in ids})
        res = PTBTokenizer().tokenize({i: ev.cocoRes.imgToAnns[i] for i in ids})
        for scorer, names in ((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
                              (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")):
            score, _ = scorer.compute_score(gts, res)
            for n, s in (zip(names, score) if isinstance(names, list) else [(names, score)]):
                ev.eval[n] = s

    return evaluate


@pytest.mark.parametrize("blob, expected", [
    ("[]", "at least one result"),
    ('{"image_id": 7}', "a JSON list"),
    ('[{"image_id": 7}]', '"caption" key'),
    ('[{"image_id": "7", "caption": "a"}]', "[0].image_id: expected an integer"),
    ('[{"image_id": 7, "caption": " "}]', "non-empty caption"),
    ('[{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": "b"}]', "one caption per image"),
    ('[{"image_id": 12345, "caption": "a dog"}]', "image_id 12345"),
    ("[{", "valid JSON"),
])
def test_score_bad_files_one_line_each(trained, tmp_path, blob, expected):
    tmp, _ = trained
    bad = tmp_path / "bad.json"
    bad.write_text(blob)
    good = tmp_path / "good.json"
    good.write_text('[{"image_id": 7, "caption": "a man on a horse"}]')
    p = _score(bad, good, "--annotations", tmp / "captions_val2014.json", "--json",
               "--extra-metrics", "off", check=False)
    assert p.returncode == 2
    errors = p.stderr.strip().splitlines()
    assert len(errors) == 1 and str(bad) in errors[0] and expected in errors[0], p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["results"] == str(good)  # still scored


def test_evaluate_flags_checked_before_work(tmp_path):
    for flags, name in ((["--beam-size", "0"], "--beam-size"),
                        (["--length-penalty", "-1"], "--length-penalty"),
                        (["--results-out", str(tmp_path)], "--results-out"),
                        (["--results-out", str(tmp_path / "no" / "r.json")], "--results-out")):
        p = run_dtrain(None, "evaluate", "--checkpoint", tmp_path / "none.h5", *flags,
                       check=False, timeout=60)
        assert p.returncode == 2 and name in p.stderr, p.stderr


def test_score_ptb_without_java_is_one_line(trained, tmp_path):
    tmp, _ = trained
    res = tmp_path / "r.json"
    res.write_text('[{"image_id": 7, "caption": "A man."}]')
    p = run_dtrain(None, "score", res, "--annotations", tmp / "captions_val2014.json",
                   "--tokenizer", "ptb", check=False, timeout=60, env={"PATH": ""})
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "--tokenizer ptb" in line and "java" in line, p.stderr
