"""`dtrain sample` and `dtrain evaluate`: a checkpoint's captions (greedy or beam search), loss
and the COCO caption metrics, on any number of ranks; `evaluate --results-out` writes a COCO
results file, `--html-out` a page of captions beside their references."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import backend, checkpoint
from ..captions_html import write_captions_page
from ..config import TrainConfig, check_precision
from ..data.coco import decode_captions
from ..data.coco_results import split_image_ids, write_results
from ..data.metrics import extra_metrics, missing_line
from ..decode import decode
from ..errors import UserError
from ..evaluate import evaluate
from ..parallel.comm import Communicator, run_guarded
from ..runsetup import build_model, open_data


def add_parsers(sub):
    for name, helptext in (("sample", "print captions of a checkpoint beside their references"),
                           ("evaluate", "val loss, BLEU-1..4, ROUGE-L, CIDEr-D (METEOR, SPICE) "
                                        "of a checkpoint")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--checkpoint", required=True,
                       help="checkpoint file (or 'latest' with --checkpoint-dir)")
        q.add_argument("--checkpoint-dir", default="checkpoints")
        q.add_argument("--data", default=None,
                       help="data directory (default: the one the checkpoint used)")
        q.add_argument("--split", choices=["train", "val"], default="val")
        q.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
        q.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="GEMM operands: fp32 (default) or bf16 (float32 sums; CPU with "
                            "AMX-BF16, the extra bf16)")
        q.add_argument("--max-length", type=int, default=16)
        q.add_argument("--threads-per-rank", type=int, default=None)
        q.add_argument("--beam-size", type=int, default=1,
                       help="beams per image (default 1: greedy)")
        q.add_argument("--length-penalty", type=float, default=0.0,
                       help="rank beams by log-probability / length ** this (default 0: none)")
        if name == "sample":
            q.add_argument("-n", "--num", type=int, default=10,
                           help="images to caption (default 10)")
        else:
            q.add_argument("--eval-images", type=int, default=1000)
            q.add_argument("--eval-captions", type=int, default=5000)
            q.add_argument("--results-out", default=None,
                           help="write the captions as a COCO results file "
                                '[{"image_id", "caption"}]')
            q.add_argument("--html-out", default=None,
                           help="write an HTML page of the first 100 sampled captions beside "
                                "their references, with the metrics")
            q.add_argument("--extra-metrics", choices=("auto", "off"), default="off",
                           help="auto: also METEOR and SPICE from pycocoevalcap when it and Java "
                                "are present (a Java start: seconds); off (default): not")
        q.set_defaults(func=cmd_sample if name == "sample" else cmd_evaluate)


def validate_args(args):
    """Every flag checked before any work: one line naming the flag."""
    checks = [("--max-length", args.max_length, 1),
              ("--threads-per-rank", args.threads_per_rank, 1), ("--beam-size", args.beam_size, 1)]
    if args.command == "sample":
        checks.append(("-n/--num", args.num, 1))
    else:
        checks += [("--eval-images", args.eval_images, 0),
                   ("--eval-captions", args.eval_captions, 0)]
    for flag, value, lowest in checks:
        if value is not None and value < lowest:
            raise UserError(f"{flag}: expected an integer >= {lowest}, got {value}")
    if not (math.isfinite(args.length_penalty) and args.length_penalty >= 0):
        raise UserError(f"--length-penalty: expected a finite number >= 0, "
                        f"got {args.length_penalty}")
    try:
        check_precision(args.precision, "float32", args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for flag in ("--results-out", "--html-out"):
        out = getattr(args, flag[2:].replace("-", "_"), None)
        if out is None:
            continue
        path = Path(out)
        if path.is_dir():
            raise UserError(f"{flag}: expected a file name, got the directory {out}")
        if not path.resolve().parent.is_dir():
            raise UserError(f"{flag}: expected a file in an existing directory, got {out}")


def _warn(line):
    print(f"dtrain: warning: {line}", file=sys.stderr, flush=True)


def load_for_inference(args, comm):
    info = None
    ckpt = None
    if comm.is_root:
        path, ckpt = checkpoint.choose_checkpoint(args.checkpoint, args.checkpoint_dir,
                                                  "--checkpoint", say=_warn,
                                                  required=("params", "config", "vocab"))
        info = {"path": str(path), "config": dict(ckpt["config"])}
    info = comm.bcast_obj(info)
    saved = info["config"]
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    cfg.data = args.data or saved.get("data_dir")
    cfg.device = args.device
    cfg.precision = args.precision
    if cfg.precision != "fp32" and cfg.dtype != "float32":
        raise UserError(f"--precision {cfg.precision}: expected a float32 checkpoint, "
                        f"{info['path']} is {cfg.dtype}")
    cfg.max_length = args.max_length
    cfg.quiet = True
    backend.set_threads(backend.node_threads(comm.local_size, args.threads_per_rank),
                        comm.local_size)
    xp = backend.select(backend.resolve_device(cfg.device), comm.local_rank)
    data = open_data(cfg, comm)
    model = build_model(cfg, data, xp)
    if comm.is_root:
        checkpoint.check_compatible(ckpt, model.shapes, data.idx_to_word)
        for name in model.shapes:
            model.params[name] = np.asarray(ckpt["params"][name])
    comm.bcast_array_(model.param_buffer)
    if args.beam_size > model.vocab_size:
        raise UserError(f"--beam-size: expected at most the vocabulary size {model.vocab_size}, "
                        f"got {args.beam_size}")
    return SimpleNamespace(cfg=cfg, data=data, model=model, path=info["path"])


def _guarded(args, body):
    try:
        validate_args(args)
    except UserError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    comm = Communicator()
    return run_guarded(comm, body, comm)


def cmd_sample(args):
    def body(comm):
        run = load_for_inference(args, comm)
        split = run.data.split(args.split)
        image_ids, refs = split.image_references()
        n = min(args.num, len(image_ids))
        mine = np.array_split(np.arange(n), comm.size)[comm.rank]
        feats = backend.to_device(split.features(image_ids[mine]), run.model.xp)
        sampled = backend.to_host(decode(run.model, feats, args.max_length, args.beam_size,
                                         args.length_penalty)).astype(np.int64) \
            if len(mine) else np.zeros((0, args.max_length), np.int64)
        all_sampled = comm.allgatherv(sampled)
        if comm.is_root:
            how = "greedy" if args.beam_size == 1 else f"beam search, {args.beam_size} beams"
            print(f"{n} {args.split} images, checkpoint {run.path}, {how}")
            for i in range(n):
                print(f"[image {int(image_ids[i])}]")
                print(f"  sampled : {decode_captions(all_sampled[i], run.data.idx_to_word)}")
                for r in refs[i][:2]:
                    print(f"  ref     : {' '.join(r)}")
        return 0

    return _guarded(args, body)


def cmd_evaluate(args):
    def body(comm):
        run = load_for_inference(args, comm)
        split = run.data.split(args.split)
        res = evaluate(run.model, comm, split, run.data.idx_to_word, args.eval_captions,
                       args.eval_images, args.max_length, beam_size=args.beam_size,
                       length_penalty=args.length_penalty)
        if comm.is_root:
            report = _evaluation_report(args, run, comm, split, res)
            print(json.dumps(report), flush=True)
            if report["missing"] and args.extra_metrics == "auto":
                print(missing_line(report["missing"]), file=sys.stderr, flush=True)
        return 0

    return _guarded(args, body)


def _evaluation_report(args, run, comm, split, res):
    """Rank 0: the JSON record of an evaluation; writes --results-out."""
    metrics = dict(res["metrics"])
    if args.extra_metrics == "auto":
        more, missing = extra_metrics(res["hypotheses"], res["references"])
        metrics.update(more)
    else:
        missing = {"meteor": "not asked for (--extra-metrics auto)",
                   "spice": "not asked for (--extra-metrics auto)"}
    report = {"checkpoint": run.path, "split": args.split, "ranks": comm.size,
              "val_loss": res["val_loss"], "val_loss_per_token": res["val_loss_per_token"],
              **metrics, "images": res["images"], "beam_size": args.beam_size,
              "length_penalty": args.length_penalty,
              "decode_ms_per_image": res["decode_ms_per_image"],
              "tokens": "the vocabulary's words (no re-tokenisation)", "missing": missing}
    ids, source = split_image_ids(split, res["image_ids"])
    captions = [" ".join(h) for h in res["hypotheses"]]
    if args.results_out:
        report["results_out"] = str(write_results(args.results_out, ids, captions))
        report["image_ids"] = source
    if args.html_out:
        urls = split.urls or [None] * split.num_images
        rows = [(ids[i], captions[i], [" ".join(r) for r in res["references"][i]],
                 urls[int(res["image_ids"][i])]) for i in range(min(100, len(ids)))]
        how = "greedy" if args.beam_size == 1 else f"beam search, {args.beam_size} beams"
        details = {"checkpoint": run.path, "split": args.split, "images": res["images"],
                   "decoding": how,
                   "val loss": "n/a" if res["val_loss"] is None else f"{res['val_loss']:.4f}"}
        report["html_out"] = str(write_captions_page(args.html_out, "dtrain evaluate",
                                                     metrics, rows, details))
    return report
