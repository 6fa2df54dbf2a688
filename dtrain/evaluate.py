"""Sharded evaluation: validation loss and the COCO caption metrics (BLEU-1..4, ROUGE-L,
CIDEr-D), the same for any number of ranks."""

from __future__ import annotations

import math
import time

import numpy as np

from .backend import to_device, to_host
from .data.coco import caption_tokens, decode_captions
from .data.metrics import OWN_METRICS, caption_metrics
from .decode import decode

CHUNK = 256  # rows per forward pass


def _chunks(rows):
    return [c for c in np.array_split(rows, max(1, math.ceil(len(rows) / CHUNK))) if c.size]


def evaluate(model, comm, split, idx_to_word, eval_captions, eval_images, max_length,
             should_stop=None, beam_size=1, length_penalty=0.0):
    """Val loss and the caption metrics with the val set sharded across ranks.

    Each rank computes the loss of its block of captions and decodes captions
    for its block of images (greedy, or beam search with ``beam_size`` > 1; see
    decode.py); sums and decoded ids are reduced/gathered, and every rank scores
    the whole gathered set, so the result is the same for any number of ranks.
    ``metrics`` holds bleu1..4, rouge_l and cider_d; ``image_ids`` the data
    set's image index of each decoded caption, in order. ``should_stop()`` is asked
    between chunks (and agreed on by all ranks): a stop request (a signal)
    ends the evaluation early; the result then says ``"stopped": True``.
    """
    xp = model.xp
    stopped = False

    def stop_now():
        nonlocal stopped
        if should_stop is None:
            return False
        stopped = bool(comm.allreduce_scalars(np.array([1.0 if should_stop() else 0.0]))[0] > 0)
        return stopped

    n_caps = min(eval_captions, split.num_captions)
    mine = np.array_split(np.arange(n_caps), comm.size)[comm.rank]
    loss_sum, tokens = 0.0, 0
    # every rank runs the same number of chunks (so the stop votes line up)
    chunks = _chunks(np.array_split(np.arange(n_caps), comm.size)[0])
    for i in range(len(chunks)):
        if stop_now():
            break
        chunk = np.array_split(mine, len(chunks))[i] if len(mine) else mine
        if chunk.size == 0:
            continue
        caps, feats = split.batch(chunk)
        loss_sum += model.forward_loss(to_device(feats, xp), caps, normalizer=1.0)
        tokens += int((caps[:, 1:] != model.null_idx).sum())
    totals = comm.allreduce_scalars(np.array([loss_sum, tokens]))

    image_ids, refs = split.image_references()
    n_img = min(eval_images, len(image_ids))
    my_images = np.array_split(np.arange(n_img), comm.size)[comm.rank]
    parts = []
    t_decode = time.perf_counter()
    img_chunks = _chunks(np.array_split(np.arange(n_img), comm.size)[0])
    for i in range(len(img_chunks)):
        if stopped or stop_now():
            break
        chunk = np.array_split(my_images, len(img_chunks))[i] if len(my_images) else my_images
        if chunk.size == 0:
            continue
        feats = to_device(split.features(image_ids[chunk]), xp)
        ids = decode(model, feats, max_length, beam_size, length_penalty)
        parts.append(to_host(ids).astype(np.int64))
    sampled = np.concatenate(parts) if parts else np.zeros((0, max_length), dtype=np.int64)
    all_sampled = comm.allgatherv(sampled)
    decode_s = time.perf_counter() - t_decode
    n_done = all_sampled.shape[0]
    hyps = [caption_tokens(row, idx_to_word) for row in all_sampled]
    metrics = caption_metrics(hyps, refs[:n_done]) if n_done and not stopped \
        else dict.fromkeys(OWN_METRICS, 0.0)
    bleu = [metrics[f"bleu{k}"] for k in range(1, 5)]
    examples = [(decode_captions(all_sampled[i], idx_to_word), [" ".join(r) for r in refs[i]])
                for i in range(0 if stopped else min(5, n_done))]
    # a loss over zero tokens, or over the part a stop left done, is no val loss (None), never 0
    known = not stopped and totals[1] > 0
    return {"val_loss": float(totals[0]) / n_caps if known else None,
            "val_loss_per_token": float(totals[0]) / float(totals[1]) if known else None,
            "bleu": [float(b) for b in bleu], "metrics": metrics, "images": n_done,
            "examples": examples, "sampled": all_sampled, "image_ids": image_ids[:n_done],
            "references": refs[:n_done], "hypotheses": hyps, "stopped": stopped,
            "beam_size": beam_size, "length_penalty": length_penalty,
            "decode_ms_per_image": 1e3 * decode_s / max(n_done, 1)}
