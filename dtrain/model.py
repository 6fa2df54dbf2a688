"""The CS231n image-captioning network, its parameters in one flat buffer.

Image feature -> initial hidden state (affine), caption words -> embeddings,
a vanilla RNN or LSTM, a vocabulary projection at every step, and the masked
softmax loss (sum over real tokens / batch).

Parameters are views into one contiguous ``param_buffer`` and gradients views
into one ``grad_buffer`` of the same layout, so the optimizer updates all of
them in one vectorised pass and the communicator reduces them in one call.
``W_embed`` is laid out last, so that when its gradient is reduced row-sparse
the rest of the gradient is still one contiguous prefix.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np

from . import layers
from .backend import to_device

# Flat-buffer order; W_embed last (see the module docstring).
PARAM_ORDER = ("W_proj", "b_proj", "Wx", "Wh", "b", "W_vocab", "b_vocab", "W_embed")


def param_shapes(vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type):
    gates = {"lstm": 4, "rnn": 1}[cell_type]
    return {
        "W_proj": (input_dim, hidden_dim),
        "b_proj": (hidden_dim,),
        "Wx": (wordvec_dim, gates * hidden_dim),
        "Wh": (hidden_dim, gates * hidden_dim),
        "b": (gates * hidden_dim,),
        "W_vocab": (hidden_dim, vocab_size),
        "b_vocab": (vocab_size,),
        "W_embed": (vocab_size, wordvec_dim),
    }


class ParamDict(MutableMapping):
    """``model.params`` as the CS231n notebooks use it, backed by a flat buffer.

    ``params[name]`` is a view into the buffer (in-place edits take effect);
    ``params[name] = array`` copies the values into that view.
    """

    def __init__(self, views):
        self._views = views

    def __getitem__(self, name):
        return self._views[name]

    def __setitem__(self, name, value):
        if name not in self._views:
            raise KeyError(f"unknown parameter {name!r}; expected one of {sorted(self._views)}")
        view = self._views[name]
        if tuple(np.shape(value)) != view.shape:
            raise ValueError(f"parameter {name}: expected shape {view.shape}, got {np.shape(value)}")
        view[...] = to_device(value, _module_of(view)) if not isinstance(value, type(view)) else value

    def __delitem__(self, name):
        raise TypeError("parameters cannot be deleted")

    def __iter__(self):
        return iter(self._views)

    def __len__(self):
        return len(self._views)


def _module_of(a):
    from .backend import get_array_module

    return get_array_module(a)


def flat_views(buffer, shapes, order=PARAM_ORDER):
    """Views into ``buffer`` for each named shape, laid out in ``order``."""
    views, offset = {}, 0
    for name in order:
        size = int(np.prod(shapes[name]))
        views[name] = buffer[offset : offset + size].reshape(shapes[name])
        offset += size
    return views


@dataclass
class PackedBatch:
    """Host-side packing of a caption batch for the packed recurrence.

    Rows are sorted by caption length (last real token), longest first; step
    t then involves only the first ``batch_sizes[t]`` sorted rows, and the
    recurrence stops at the longest caption. ``score_pos`` lists the packed
    positions with a real target (None when all are real).
    """

    order: np.ndarray  # (n0,) original row of each sorted active row
    batch_sizes: list
    words_in: np.ndarray  # (total,) input word per packed position
    targets: np.ndarray  # (total or M,) target word per scored position
    score_pos: np.ndarray | None
    num_tokens: int


def pack_captions(captions, null_idx):
    """Pack (N, T+1) caption ids (host NumPy) for the packed recurrence."""
    captions = np.asarray(captions)
    cin, cout = captions[:, :-1], captions[:, 1:]
    mask = cout != null_idx
    T = cin.shape[1]
    has_token = mask.any(axis=1)
    lengths = np.where(has_token, T - np.argmax(mask[:, ::-1], axis=1), 0)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    t_max = int(sorted_len[0]) if sorted_len.size else 0
    active = np.arange(t_max)[:, None] < sorted_len[None, :]
    t_idx, j_idx = np.nonzero(active)  # time-major: packed order
    rows = order[j_idx]
    batch_sizes = active.sum(axis=1).tolist()
    words_in = cin[rows, t_idx]
    targets = cout[rows, t_idx]
    real = mask[rows, t_idx]
    score_pos = None
    if not real.all():
        score_pos = np.flatnonzero(real)
        targets = targets[score_pos]
    n0 = batch_sizes[0] if batch_sizes else 0
    return PackedBatch(
        order=order[:n0],
        batch_sizes=batch_sizes,
        words_in=words_in,
        targets=targets,
        score_pos=score_pos,
        num_tokens=int(mask.sum()),
    )


@dataclass
class FixedBatch:
    """A caption batch in the fixed-shape layout (the GPU graph mode).

    Every one of the N rows runs all T steps, T being the batch's longest
    caption, so a step's shapes depend on (N, T) alone and one captured CUDA
    graph per shape replays every batch of that shape. Arrays are time-major
    (position t*N + n), int32, and of fixed length M = T*N: every position is
    scored and ``weights`` (1 real target, 0 padding) masks the loss inside
    the softmax kernel. The embedding gradient is summed per word over the
    positions inside a caption: ``order`` lists them grouped by word (stable),
    word s's group is order[seg_start[s]:seg_start[s+1]], ``ids[s]`` its word;
    the unused tail (s >= num_ids) holds empty segments with id -1.
    """

    N: int
    T: int
    words: np.ndarray  # (M,) input word per position
    targets: np.ndarray  # (M,) target word per position
    weights: np.ndarray  # (M,) 1.0 where the target is a real token, else 0.0
    order: np.ndarray  # (M,) positions grouped by input word; tail unused
    seg_start: np.ndarray  # (M+1,) start of each word's group in ``order``
    ids: np.ndarray  # (M,) word of each group, -1 for the unused tail
    num_ids: int
    num_tokens: int


def fixed_batch(captions, null_idx, dtype=np.float32):
    """Lay out (N, T+1) caption ids (host NumPy) for the fixed-shape mode."""
    captions = np.asarray(captions)
    N = captions.shape[0]
    cin, cout = captions[:, :-1], captions[:, 1:]
    mask = cout != null_idx
    has_token = mask.any(axis=1)
    lengths = np.where(has_token, cin.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
    T = max(1, int(lengths.max()) if N else 1)
    M = T * N
    words = np.ascontiguousarray(cin[:, :T].T, dtype=np.int32).reshape(M)
    targets = np.ascontiguousarray(cout[:, :T].T, dtype=np.int32).reshape(M)
    weights = np.ascontiguousarray(mask[:, :T].T, dtype=dtype).reshape(M)
    inside = (np.arange(T)[:, None] < lengths[None, :]).reshape(M)
    pos = np.flatnonzero(inside)
    grouped = pos[np.argsort(words[pos], kind="stable")]
    sorted_words = words[grouped]
    starts = np.flatnonzero(np.r_[True, sorted_words[1:] != sorted_words[:-1]]) if pos.size else pos[:0]
    S = starts.size
    order = np.zeros(M, dtype=np.int32)
    order[: pos.size] = grouped
    seg_start = np.full(M + 1, pos.size, dtype=np.int32)
    seg_start[:S] = starts
    ids = np.full(M, -1, dtype=np.int32)
    ids[:S] = sorted_words[starts]
    return FixedBatch(N=N, T=T, words=words, targets=targets, weights=weights, order=order,
                      seg_start=seg_start, ids=ids, num_ids=int(S), num_tokens=int(mask.sum()))


def _masked_softmax_xp(scores, targets, weights, normalizer, row_loss):
    """Plain xp reference of the masked softmax kernel (in place in ``scores``)."""
    xp = _module_of(scores)
    rows = xp.arange(scores.shape[0])
    shifted = scores - scores.max(axis=1, keepdims=True)
    target_logit = shifted[rows, targets]
    xp.exp(shifted, out=scores)
    sums = scores.sum(axis=1)
    row_loss[...] = (xp.log(sums) - target_logit) * weights
    scores /= sums[:, None]
    scores[rows, targets] -= 1.0
    scores *= (weights / normalizer)[:, None]


def _embedding_grad_segments_xp(dx, order, seg_start, ids, rows, dense):
    """Plain xp reference of the per-word embedding gradient sums."""
    xp = _module_of(dx)
    counts = seg_start[1:] - seg_start[:-1]
    segment = xp.repeat(xp.arange(ids.shape[0]), counts.tolist() if xp is not np else counts)
    rows.fill(0)
    xp.add.at(rows, segment, dx[order[: segment.shape[0]]])
    dense.fill(0)
    real = ids >= 0
    dense[ids[real]] = rows[real]


class CaptioningModel:
    """CS231n CaptioningRNN with a flat parameter buffer and a packed fast path."""

    def __init__(
        self,
        word_to_idx,
        input_dim=512,
        wordvec_dim=256,
        hidden_dim=512,
        cell_type="lstm",
        dtype=np.float32,
        seed=0,
        xp=np,
        use_kernels=True,
    ):
        if cell_type not in ("rnn", "lstm"):
            raise ValueError(f'cell_type: expected "rnn" or "lstm", got {cell_type!r}')
        self.cell_type = cell_type
        self.dtype = np.dtype(dtype)
        self.xp = xp
        self.word_to_idx = dict(word_to_idx)
        self.idx_to_word = {i: w for w, i in self.word_to_idx.items()}
        self.vocab_size = len(self.word_to_idx)
        self.input_dim, self.wordvec_dim, self.hidden_dim = input_dim, wordvec_dim, hidden_dim
        self._null = self.word_to_idx["<NULL>"]
        self._start = self.word_to_idx.get("<START>")
        self._end = self.word_to_idx.get("<END>")

        self.shapes = param_shapes(self.vocab_size, input_dim, wordvec_dim, hidden_dim, cell_type)
        self.num_params = sum(int(np.prod(s)) for s in self.shapes.values())
        self.param_buffer = xp.zeros(self.num_params, dtype=self.dtype)
        self.grad_buffer = xp.zeros(self.num_params, dtype=self.dtype)
        self.params = ParamDict(flat_views(self.param_buffer, self.shapes))
        self.grads = flat_views(self.grad_buffer, self.shapes)
        # Offset where W_embed starts: everything before it is the dense part.
        self.embed_offset = self.num_params - int(np.prod(self.shapes["W_embed"]))
        self._init_params(seed)
        self.ws = layers.Workspace()
        self.kernels = None
        if use_kernels:
            from . import kernels

            self.kernels = kernels.for_arrays(xp, self.dtype)
        # Row-sparse W_embed gradient of the last loss() call: (ids, rows).
        self.embed_grad_sparse = None

    def _init_params(self, seed):
        """CS231n initialisation, drawn on the host in float64 from ``seed``."""
        rng = np.random.default_rng(seed)
        D, W, H, V = self.input_dim, self.wordvec_dim, self.hidden_dim, self.vocab_size
        gates = {"lstm": 4, "rnn": 1}[self.cell_type]
        init = {
            "W_embed": rng.standard_normal((V, W)) / 100,
            "W_proj": rng.standard_normal((D, H)) / np.sqrt(D),
            "Wx": rng.standard_normal((W, gates * H)) / np.sqrt(W),
            "Wh": rng.standard_normal((H, gates * H)) / np.sqrt(H),
            "W_vocab": rng.standard_normal((H, V)) / np.sqrt(H),
        }
        for name, value in init.items():
            self.params[name] = value.astype(self.dtype)

    # ------------------------------------------------------------------
    # Training loss (the fast path)

    def loss(self, features, captions, normalizer=None, embed_grad="dense", forward_only=False):
        """Loss and gradients of a caption batch.

        ``features`` (N, D) and ``captions`` (N, T+1) ids (host or device).
        The loss is the summed cross-entropy of the real tokens divided by
        ``normalizer`` (default N; the trainer passes the global batch size).
        Gradients are written into ``grad_buffer`` and returned as a dict of
        views. With ``embed_grad="sparse"`` the W_embed gradient is left out
        of the buffer and kept in ``embed_grad_sparse`` as (ids, rows).
        """
        host_captions = captions if isinstance(captions, np.ndarray) else captions.get()
        packed = pack_captions(host_captions, self._null)
        normalizer = host_captions.shape[0] if normalizer is None else normalizer
        return self.loss_packed(features, packed, normalizer, embed_grad, forward_only)

    def loss_packed(self, features, packed, normalizer, embed_grad="dense", forward_only=False):
        xp, ws, dtype = self.xp, self.ws, self.dtype
        p, g = self.params, self.grads
        if not packed.batch_sizes:  # no real token anywhere: zero loss and gradient
            if forward_only:
                return 0.0, None
            self.grad_buffer.fill(0)
            self.embed_grad_sparse = (xp.zeros(0, np.int64), xp.zeros((0, self.wordvec_dim), dtype))
            return 0.0, self.grads
        total = len(packed.words_in)
        words = to_device(packed.words_in, xp)
        targets = to_device(packed.targets, xp)
        order = to_device(packed.order, xp)
        n0 = len(packed.order)

        # Initial hidden state from the image features (sorted active rows only).
        feats = ws.get("feats", (n0, self.input_dim), dtype, xp)
        xp.take(xp.asarray(features, dtype=dtype), order, axis=0, out=feats)
        h0 = ws.get("h0", (n0, self.hidden_dim), dtype, xp)
        xp.matmul(feats, p["W_proj"], out=h0)
        h0 += p["b_proj"]

        x = ws.get("embed", (total, self.wordvec_dim), dtype, xp)
        xp.take(p["W_embed"], words, axis=0, out=x)
        forward = layers.lstm_packed_forward if self.cell_type == "lstm" else layers.rnn_packed_forward
        backward = layers.lstm_packed_backward if self.cell_type == "lstm" else layers.rnn_packed_backward
        hidden, cache = forward(x, h0, p["Wx"], p["Wh"], p["b"], packed.batch_sizes, ws, self.kernels)

        # Vocabulary projection and softmax only where there is a real target.
        if packed.score_pos is None:
            scored = hidden
        else:
            score_pos = to_device(packed.score_pos, xp)
            scored = ws.get("scored", (len(packed.score_pos), self.hidden_dim), dtype, xp)
            xp.take(hidden, score_pos, axis=0, out=scored)
        scores = ws.get("scores", (scored.shape[0], self.vocab_size), dtype, xp)
        xp.matmul(scored, p["W_vocab"], out=scores)
        scores += p["b_vocab"]
        if self.kernels is not None:
            loss = self.kernels.softmax_cross_entropy(scores, targets, normalizer)
            dscores = scores
        else:
            loss, dscores = layers.softmax_cross_entropy(scores, targets, normalizer, dscores=scores)
        if forward_only:
            return float(loss), None
        xp.matmul(scored.T, dscores, out=g["W_vocab"])
        dscores.sum(axis=0, out=g["b_vocab"])
        dscored = ws.get("dscored", scored.shape, dtype, xp)
        xp.matmul(dscores, p["W_vocab"].T, out=dscored)
        if packed.score_pos is None:
            dhidden = dscored
        else:
            dhidden = ws.get("dhidden", (total, self.hidden_dim), dtype, xp, zero=True)
            dhidden[score_pos] = dscored

        dx, dh0, *_ = backward(dhidden, cache, ws, self.kernels, out=(g["Wx"], g["Wh"], g["b"]))
        xp.matmul(feats.T, dh0[:n0], out=g["W_proj"])
        dh0[:n0].sum(axis=0, out=g["b_proj"])

        ids, rows = layers.embedding_grad_sparse(words, dx)
        self.embed_grad_sparse = (ids, rows)
        if embed_grad == "dense":
            g["W_embed"].fill(0)
            g["W_embed"][ids] = rows
        return float(loss), self.grads

    # ------------------------------------------------------------------
    # Fixed-shape mode (GPU): every row for all T steps, so CUDA graphs replay

    def loss_fixed(self, features, batch, normalizer, ws=None, loss_out=None):
        """Loss and gradients of a :class:`FixedBatch` whose arrays are on this
        model's device: all N rows run all T steps, every position is scored and
        the 0/1 weights mask the loss. Same mathematics as :meth:`loss`; no
        device synchronisation and no data-dependent shape, so the call can be
        captured as a CUDA graph. Returns (loss, grads) with the loss a 0-d
        float64 array left on the device (``loss_out`` if given). Both the dense
        W_embed gradient and the row-sparse ``embed_grad_sparse`` are filled.
        """
        xp, dtype, kern = self.xp, self.dtype, self.kernels
        ws = self.ws if ws is None else ws
        p, g = self.params, self.grads
        N, T = batch.N, batch.T
        M, H = N * T, self.hidden_dim
        h0 = ws.get("fx_h0", (N, H), dtype, xp)
        xp.matmul(features, p["W_proj"], out=h0)
        h0 += p["b_proj"]
        x = ws.get("fx_embed", (M, self.wordvec_dim), dtype, xp)
        xp.take(p["W_embed"], batch.words, axis=0, out=x)
        forward = layers.lstm_packed_forward if self.cell_type == "lstm" else layers.rnn_packed_forward
        backward = layers.lstm_packed_backward if self.cell_type == "lstm" else layers.rnn_packed_backward
        hidden, cache = forward(x, h0, p["Wx"], p["Wh"], p["b"], [N] * T, ws, kern)

        scores = ws.get("fx_scores", (M, self.vocab_size), dtype, xp)
        xp.matmul(hidden, p["W_vocab"], out=scores)
        scores += p["b_vocab"]
        row_loss = ws.get("fx_row_loss", (M,), np.float64, xp)
        if hasattr(kern, "softmax_cross_entropy_masked"):
            kern.softmax_cross_entropy_masked(scores, batch.targets, batch.weights, normalizer, row_loss)
        else:
            _masked_softmax_xp(scores, batch.targets, batch.weights, normalizer, row_loss)
        loss = ws.get("fx_loss", (), np.float64, xp) if loss_out is None else loss_out
        row_loss.sum(out=loss)
        xp.divide(loss, normalizer, out=loss)

        xp.matmul(hidden.T, scores, out=g["W_vocab"])
        scores.sum(axis=0, out=g["b_vocab"])
        dhidden = ws.get("fx_dhidden", (M, H), dtype, xp)
        xp.matmul(scores, p["W_vocab"].T, out=dhidden)
        dx, dh0, *_ = backward(dhidden, cache, ws, kern, out=(g["Wx"], g["Wh"], g["b"]))
        xp.matmul(features.T, dh0, out=g["W_proj"])
        dh0.sum(axis=0, out=g["b_proj"])

        rows = ws.get("fx_embed_rows", (M, self.wordvec_dim), dtype, xp)
        if hasattr(kern, "embedding_grad_segments"):
            kern.embedding_grad_segments(dx, batch.order, batch.seg_start, batch.ids, rows, g["W_embed"])
        else:
            _embedding_grad_segments_xp(dx, batch.order, batch.seg_start, batch.ids, rows, g["W_embed"])
        self.embed_grad_sparse = (batch.ids[: batch.num_ids], rows[: batch.num_ids])
        return loss, self.grads

    # ------------------------------------------------------------------
    # The plain computation (CS231n layer by layer), the reference for tests

    def loss_reference(self, features, captions):
        """Loss and gradients the plain CS231n way: every step, every position."""
        xp = self.xp
        p = {k: v for k, v in self.params.items()}
        features = xp.asarray(features, dtype=self.dtype)
        captions = xp.asarray(captions)
        cin, cout = captions[:, :-1], captions[:, 1:]
        mask = cout != self._null
        h0 = features @ p["W_proj"] + p["b_proj"]
        x, emb_cache = layers.word_embedding_forward(cin, p["W_embed"])
        if self.cell_type == "lstm":
            h, cache = layers.lstm_forward(x, h0, p["Wx"], p["Wh"], p["b"])
        else:
            h, cache = layers.rnn_forward(x, h0, p["Wx"], p["Wh"], p["b"])
        scores, aff_cache = layers.temporal_affine_forward(h, p["W_vocab"], p["b_vocab"])
        loss, dscores = layers.temporal_softmax_loss(scores, cout, mask)
        grads = {}
        dh, grads["W_vocab"], grads["b_vocab"] = layers.temporal_affine_backward(dscores, aff_cache)
        backward = layers.lstm_backward if self.cell_type == "lstm" else layers.rnn_backward
        dx, dh0, grads["Wx"], grads["Wh"], grads["b"] = backward(dh, cache)
        grads["W_embed"] = layers.word_embedding_backward(dx, emb_cache)
        grads["W_proj"] = features.T @ dh0
        grads["b_proj"] = dh0.sum(axis=0)
        return loss, grads

    # ------------------------------------------------------------------
    # Greedy sampling

    def sample(self, features, max_length=30):
        """Greedy captions (N, max_length) for any N; <NULL> after <END>."""
        xp, p = self.xp, self.params
        if self._start is None or self._end is None:
            raise ValueError("sample() needs <START> and <END> in word_to_idx")
        features = xp.asarray(features, dtype=self.dtype)
        N = features.shape[0]
        captions = xp.full((N, max_length), self._null, dtype=np.int64)
        h = features @ p["W_proj"] + p["b_proj"]
        c = xp.zeros_like(h)
        word = xp.full(N, self._start, dtype=np.int64)
        finished = xp.zeros(N, dtype=bool)
        for t in range(max_length):
            x = p["W_embed"][word]
            if self.cell_type == "lstm":
                h, c, _ = layers.lstm_step_forward(x, h, c, p["Wx"], p["Wh"], p["b"])
            else:
                h, _ = layers.rnn_step_forward(x, h, p["Wx"], p["Wh"], p["b"])
            word = xp.argmax(h @ p["W_vocab"] + p["b_vocab"], axis=1)
            word = xp.where(finished, self._null, word)
            captions[:, t] = word
            finished |= word == self._end
            if t % 4 == 3 and bool(finished.all()):
                break
        return captions
