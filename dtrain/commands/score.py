"""`dtrain score`: the COCO caption metrics of result files, ours or any other tool's.

    python -m dtrain score results.json [more.json ...] --annotations captions_val2014.json

Each results file (``[{"image_id", "caption"}]``) is scored on its own images against the
annotations' references: BLEU-1..4, ROUGE-L, CIDEr-D, and METEOR and SPICE where
pycocoevalcap and Java can run them (otherwise one line says what is missing). A bad file
gets one line naming it and what was expected; the others are still scored; the exit
status is 2 if any file was bad.
"""

from __future__ import annotations

import json
import sys

from ..data.coco import DataError
from ..data.coco_results import match_results, read_annotations, read_results
from ..data.metrics import (
    TOKENIZERS,
    MetricUnavailable,
    caption_metrics,
    extra_metrics,
    missing_line,
    ptb_tokenize,
    simple_tokenize,
)

NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
         "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D", "meteor": "METEOR", "spice": "SPICE"}


def add_parser(sub):
    q = sub.add_parser("score", help="score COCO result files against COCO caption annotations")
    q.add_argument("results", nargs="+", help='results file(s): [{"image_id", "caption"}]')
    q.add_argument("--annotations", required=True,
                   help="COCO caption annotations (e.g. captions_val2014.json)")
    q.add_argument("--json", action="store_true", help="one JSON line per results file")
    add_metric_flags(q)
    q.set_defaults(func=cmd_score)


def add_metric_flags(q):
    q.add_argument("--tokenizer", choices=TOKENIZERS, default="simple",
                   help="simple: lower case, punctuation dropped, split on spaces (default; "
                        "equals PTB on clean captions); ptb: pycocoevalcap's PTB tokenizer (Java)")
    q.add_argument("--extra-metrics", choices=("auto", "off"), default="auto",
                   help="METEOR and SPICE from pycocoevalcap when it and Java are present "
                        "(auto, the default), or not at all (off)")


def tokenize_pairs(hyps, refs, tokenizer):
    """Token lists of hypothesis strings and of reference string lists."""
    if tokenizer == "simple":
        return ([simple_tokenize(h) for h in hyps],
                [[simple_tokenize(r) for r in rs] for rs in refs])
    hyp_tok = ptb_tokenize({i: [h] for i, h in enumerate(hyps)})
    ref_tok = ptb_tokenize(dict(enumerate(refs)))
    return [hyp_tok[i][0] for i in range(len(hyps))], [ref_tok[i] for i in range(len(refs))]


def score_tokens(hyps, refs, extra="auto"):
    """(metrics dict, {metric: why missing}) of token lists."""
    scores = caption_metrics(hyps, refs)
    if extra == "off":
        return scores, {"meteor": "--extra-metrics off", "spice": "--extra-metrics off"}
    more, missing = extra_metrics(hyps, refs)
    scores.update(more)
    return scores, missing


def format_scores(scores) -> str:
    return " | ".join(f"{NAMES.get(k, k)} {v:.4f}" for k, v in scores.items())


def cmd_score(args):
    try:
        annotations = read_annotations(args.annotations)
    except DataError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for path in args.results:
        try:
            ids, hyps, refs = match_results(read_results(path), annotations, path,
                                            args.annotations)
            hyp_tok, ref_tok = tokenize_pairs(hyps, refs, args.tokenizer)
        except (DataError, MetricUnavailable) as exc:
            print(f"dtrain: error: {exc}", file=sys.stderr)
            status = 2
            continue
        scores, missing = score_tokens(hyp_tok, ref_tok, args.extra_metrics)
        if args.json:
            print(json.dumps({"results": str(path), "annotations": str(args.annotations),
                              "images": len(ids), "tokenizer": args.tokenizer, **scores,
                              "missing": missing}), flush=True)
        else:
            print(f"{path}: {len(ids)} images (of {len(annotations)} annotated), "
                  f"tokenizer {args.tokenizer}")
            print(f"  {format_scores(scores)}")
            if missing:
                print(f"  {missing_line(missing)}", flush=True)
    return status
