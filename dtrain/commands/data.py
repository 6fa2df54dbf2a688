"""`dtrain data ...`: synth, import-coco, check."""

from __future__ import annotations

import argparse
import sys
import time

from ..data.coco import CocoData, DataError
from ..data.coco_import import import_coco
from ..data.synthetic import ensure_builtin_data, write_synthetic


def _synth(args) -> int:
    t = time.perf_counter()
    if args.out is None:
        path = ensure_builtin_data(args.cache_dir, args.train_images, args.val_images, args.seed)
    else:
        path = write_synthetic(args.out, args.train_images, args.val_images, args.seed)
    print(f"wrote {args.train_images} train and {args.val_images} val images to {path} "
          f"in {time.perf_counter() - t:.1f} s")
    return 0


def _import_coco(args) -> int:
    summary = import_coco(
        args.out, args.train_captions, args.val_captions, args.train_features,
        args.val_features, args.train_image_ids, args.val_image_ids, min_count=args.min_count,
        max_words=args.max_words, vocab=args.vocab, feature_kind=args.feature_kind,
        features_dataset=args.features_dataset)
    print(f"wrote {summary['out_dir']}: vocabulary {summary['vocab_size']} words")
    for name, s in summary["splits"].items():
        print(f"  {name}: {s['captions']} captions of {s['images']} images; "
              f"{s['skipped_no_features']} skipped (image without features), "
              f"{s['truncated']} truncated to {args.max_words} words")
    return 0


def _check(args) -> int:
    with CocoData(args.dir, pca_features=not args.full_features, max_train=args.max_train,
                  feature_memory_budget=0) as data:
        print(data.summary())
    print("ok")
    return 0


def _guard(fn):
    """Report data problems as one line on stderr with exit code 2."""

    def handler(args) -> int:
        try:
            return fn(args)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ValueError as e:  # bad option values
            print(f"error: {e}", file=sys.stderr)
            return 2

    handler.__name__ = fn.__name__
    return handler


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register `data` with its sub-commands synth, import-coco and check."""
    p = subparsers.add_parser("data", help="make, import or check a data set",
                              description="Make, import or check a data set in the CS231n "
                                          "COCO layout.")
    sub = p.add_subparsers(dest="data_command", metavar="{synth,import-coco,check}")
    sub.required = True

    s = sub.add_parser("synth", help="write the built-in synthetic data set",
                       description="Write the built-in learnable synthetic data set in the "
                                   "CS231n COCO layout.")
    s.add_argument("--out", default=None,
                   help="output directory (default: the cache, reused if already there)")
    s.add_argument("--train-images", type=int, default=20000)
    s.add_argument("--val-images", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cache-dir", default=None,
                   help="cache directory when --out is not given (default: $DTRAIN_CACHE "
                        "or ~/.cache/dtrain)")
    s.set_defaults(func=_guard(_synth))

    c = sub.add_parser("import-coco", help="build the layout from COCO caption annotations",
                       description="Build the CS231n layout from captions_*2014.json and "
                                   "per-split feature arrays.")
    c.add_argument("--train-captions", required=True, help="captions_train2014.json")
    c.add_argument("--val-captions", required=True, help="captions_val2014.json")
    c.add_argument("--train-features", required=True, help=".npy or .h5 (N, D) array")
    c.add_argument("--val-features", required=True, help=".npy or .h5 (N, D) array")
    c.add_argument("--train-image-ids", required=True,
                   help="COCO image id of each feature row (.txt one per line, or .json list)")
    c.add_argument("--val-image-ids", required=True)
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--min-count", type=int, default=5,
                   help="words seen fewer times in train captions become <UNK> (default 5)")
    c.add_argument("--max-words", type=int, default=15,
                   help="words kept per caption between <START> and <END> (default 15)")
    c.add_argument("--vocab", default=None,
                   help="use this coco2014_vocab.json instead of building one")
    c.add_argument("--feature-kind", choices=("pca", "full"), default=None,
                   help="output file names (default: full for 4096-wide, else pca)")
    c.add_argument("--features-dataset", default="features",
                   help="dataset name inside .h5 feature files (default: features)")
    c.set_defaults(func=_guard(_import_coco))

    k = sub.add_parser("check", help="validate a data directory and print a summary")
    k.add_argument("dir")
    k.add_argument("--full-features", action="store_true",
                   help="check the 4096-wide fc7 features instead of the PCA ones")
    k.add_argument("--max-train", type=int, default=None)
    k.set_defaults(func=_guard(_check))
    return p


def main(argv=None) -> int:
    """Standalone entry point (`python -m dtrain.commands.data ...`), mostly for tests."""
    parser = argparse.ArgumentParser(prog="dtrain")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
