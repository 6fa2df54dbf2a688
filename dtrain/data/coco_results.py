"""COCO caption result files and annotations: writing, reading, checking.

A results file is the COCO format that every captioning tool writes and the COCO caption
evaluation reads: a JSON list ``[{"image_id": int, "caption": str}, ...]``, one caption per
image. Annotations are COCO's ``captions_*.json``: ``{"images": [{"id", ...}],
"annotations": [{"image_id", "caption", ...}]}``. Every problem is a DataError of one line:
``<file>: <where>: expected ..., got ...``.

Image ids. The CS231n layout indexes images by feature row and keeps no COCO id, but
``data import-coco`` writes each image's COCO URL to ``<split>2014_urls.txt``, whose file name
carries the id (``COCO_val2014_000000391895.jpg`` -> 391895, or ``391895.jpg``).
:func:`split_image_ids` takes the ids from there when every URL has one, and the feature rows
otherwise (saying so), so a results file names the data set's images either way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..atomic import write_text_atomic
from .checks import DataError, fail, read_json

_ID_IN_NAME = re.compile(r"(?:^|_)(\d+)\.[A-Za-z]+$")


def coco_id_from_url(url: str):
    """The COCO image id in an image URL's file name, or None."""
    match = _ID_IN_NAME.search(url.strip().rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def split_image_ids(split, rows) -> tuple[list[int], str]:
    """(the image id of each feature row in ``rows``, where the ids come from)."""
    rows = [int(r) for r in rows]
    urls = getattr(split, "urls", None)
    if urls:
        ids = [coco_id_from_url(urls[r]) for r in rows]
        if all(i is not None for i in ids) and len(set(ids)) == len(ids):
            return ids, "image ids from the file names in the URL list"
    return rows, "feature row numbers (the data set's URL list has no COCO ids)"


def write_results(path, image_ids, captions):
    """Write ``[{"image_id", "caption"}]`` atomically (temporary name, then rename)."""
    if len(image_ids) != len(captions):
        raise ValueError(f"{len(image_ids)} image ids but {len(captions)} captions")
    path = Path(path)
    blob = [{"image_id": int(i), "caption": str(c)} for i, c in zip(image_ids, captions)]
    return write_text_atomic(path, json.dumps(blob))


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def read_results(path) -> dict[int, str]:
    """{image_id: caption} of a results file; DataError on the first problem."""
    path = Path(path)
    blob = read_json(path, 'a COCO results list [{"image_id": int, "caption": str}]')
    if not isinstance(blob, list):
        raise fail(path, "(file)", 'a JSON list of {"image_id", "caption"} objects',
                    type(blob).__name__)
    if not blob:
        raise fail(path, "(file)", "at least one result", "an empty list")
    out = {}
    for k, entry in enumerate(blob):
        if not isinstance(entry, dict):
            raise fail(path, f"[{k}]", 'an object {"image_id", "caption"}', type(entry).__name__)
        for key in ("image_id", "caption"):
            if key not in entry:
                raise fail(path, f"[{k}]", f'a "{key}" key', f"keys {sorted(entry)}")
        image_id, caption = entry["image_id"], entry["caption"]
        if not _is_id(image_id):
            raise fail(path, f"[{k}].image_id", "an integer", repr(image_id)[:40])
        if not isinstance(caption, str):
            raise fail(path, f"[{k}].caption", "a string", type(caption).__name__)
        if not caption.strip():
            raise fail(path, f"[{k}].caption", "a non-empty caption",
                        f"an empty one for image_id {image_id}")
        if image_id in out:
            raise fail(path, f"[{k}].image_id", "one caption per image",
                        f"a second caption for image_id {image_id}")
        out[image_id] = caption
    return out


def read_caption_annotations(path) -> tuple[list[tuple[int, str]], dict[int, str]]:
    """([(image_id, caption)] in file order, {image_id: URL or ""} of every listed image) of
    a COCO caption annotation file (captions_*2014.json); DataError naming the entry at
    fault. Every caption's image must be listed in "images"."""
    path = Path(path)
    blob = read_json(path, "a COCO caption annotation file")
    if not isinstance(blob, dict):
        raise fail(path, "(file)", 'a JSON object with "images" and "annotations"',
                   type(blob).__name__)
    for key in ("images", "annotations"):
        if not isinstance(blob.get(key), list):
            raise fail(path, key, "a list", "no such key" if key not in blob
                       else type(blob[key]).__name__)
    urls = {}
    for k, im in enumerate(blob["images"]):
        if not isinstance(im, dict) or not _is_id(im.get("id")):
            raise fail(path, f"images[{k}].id", "an integer image id", repr(im)[:60])
        urls[im["id"]] = im.get("coco_url") or im.get("flickr_url") or ""
    pairs = []
    for k, ann in enumerate(blob["annotations"]):
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")):
            raise fail(path, f"annotations[{k}].image_id", "an integer image id", repr(ann)[:60])
        if not isinstance(ann.get("caption"), str):
            raise fail(path, f"annotations[{k}].caption", "a string",
                       repr(ann.get("caption"))[:60])
        if ann["image_id"] not in urls:
            raise fail(path, f"annotations[{k}].image_id", "an id listed in images",
                       ann["image_id"])
        pairs.append((ann["image_id"], ann["caption"]))
    return pairs, urls


def read_annotations(path) -> dict[int, list[str]]:
    """{image_id: [reference captions]} of a COCO caption annotation file, every listed
    image present (an image without captions has an empty list)."""
    pairs, urls = read_caption_annotations(path)
    refs = {image_id: [] for image_id in urls}
    for image_id, caption in pairs:
        refs[image_id].append(caption)
    return refs


def match_results(results: dict, annotations: dict, results_path, annotations_path):
    """(image ids, hypotheses, reference lists) of the results' images, in id order; every
    result must name an annotated image that has at least one caption."""
    for image_id in results:
        if image_id not in annotations:
            raise DataError(f"{results_path}: image_id {image_id}: expected an image of "
                            f"{annotations_path}, got an id it does not list")
        if not annotations[image_id]:
            raise DataError(f"{annotations_path}: image {image_id}: expected at least one "
                            "reference caption, got none")
    ids = sorted(results)
    return ids, [results[i] for i in ids], [annotations[i] for i in ids]


__all__ = ["coco_id_from_url", "match_results", "read_annotations", "read_caption_annotations",
           "read_results", "split_image_ids", "write_results"]
