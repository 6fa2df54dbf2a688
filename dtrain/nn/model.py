"""The CS231n image-captioning network, its parameters in one flat buffer.

Image feature -> initial hidden state (affine), caption words -> embeddings,
a recurrent cell (any of ``dtrain.nn.cells``: rnn, lstm, gru), a vocabulary
projection at every step, and the masked softmax loss (sum over real tokens
/ batch).

Parameters are views into one contiguous ``param_buffer`` and gradients views
into one ``grad_buffer`` of the same layout, so the optimizer updates all of
them in one vectorised pass and the communicator reduces them in one call.
``W_embed`` is laid out last, so that when its gradient is reduced row-sparse
the rest of the gradient is still one contiguous prefix.

The parameter layout lives in params.py, the caption batch layouts in batches.py,
the row gathers/scatters in row_ops.py and StepGrads in step_grads.py; their
public names are importable from here too.
"""

from __future__ import annotations

import time

import numpy as np

from .. import alloc
from ..backend import to_device
from . import layers
from .batches import FixedBatch, PackedBatch, fixed_batch, pack_captions
from .cells import get_cell
from .fixed_pass import fixed_forward_backward
from .params import PARAM_ORDER, ParamDict, flat_views, param_shapes
from .row_ops import _embedding_grad_segments_xp, _masked_softmax_xp, scatter_rows, take_rows
from .step_grads import StepGrads

# Names importable from here as before the split (batches, params, row_ops, step_grads).
__all__ = ["PARAM_ORDER", "CaptioningModel", "FixedBatch", "PackedBatch", "ParamDict",
           "StepGrads", "fixed_batch", "flat_views", "pack_captions", "param_shapes",
           "scatter_rows", "take_rows",
           # the fixed-shape kernels' plain references, which tests/test_gpu.py imports
           "_embedding_grad_segments_xp", "_masked_softmax_xp"]

class CaptioningModel:
    """CS231n CaptioningRNN with a flat parameter buffer and a packed fast path.

    Two ways to get gradients:

    * ``loss(features, captions) -> (loss, grads)`` is CS231n's: ``grads`` are
      arrays the caller owns (a later call does not change them);
    * ``forward_backward(features, packed, normalizer) -> StepGrads`` is the
      training hot path: gradients land in the model's own ``grad_buffer``
      (no allocation, no copy) and the embedding gradient is row-sparse.
    """

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
        precision="fp32",
    ):
        self.cell = get_cell(cell_type)
        # the GEMMs' operand precision (fp32, or bf16: operands rounded to bf16, sums and
        # everything else float32; needs the fused kernels: dtrain/kernels/cpu/gemm_bf16.py)
        self.precision = precision
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
        self.param_buffer = alloc.zeros(self.num_params, self.dtype, xp)
        self.grad_buffer = alloc.zeros(self.num_params, self.dtype, xp)
        self.params = ParamDict(flat_views(self.param_buffer, self.shapes))
        self.grads = flat_views(self.grad_buffer, self.shapes)
        # Offset where W_embed starts: everything before it is the dense part.
        self.embed_offset = self.num_params - int(np.prod(self.shapes["W_embed"]))
        # (name, start, stop) of every parameter in the flat buffers, in layout order
        self.segments = []
        for name in PARAM_ORDER:
            start = self.segments[-1][2] if self.segments else 0
            self.segments.append((name, start, start + int(np.prod(self.shapes[name]))))
        self._init_params(seed)
        self.ws = layers.Workspace()
        self.kernels = None
        if use_kernels or precision != "fp32":
            from .. import kernels

            self.kernels = kernels.for_arrays(xp, self.dtype, precision)

    @property
    def null_idx(self):
        return self._null

    @property
    def gemm(self):
        """The one call site of this model's GEMMs: its kernel set's, or the plain one
        (``dtrain/kernels/gemm.py``)."""
        return layers.gemm_of(self.kernels)

    def _init_params(self, seed):
        """CS231n initialisation, drawn on the host in float64 from ``seed``."""
        rng = np.random.default_rng(seed)
        D, H, V = self.input_dim, self.hidden_dim, self.vocab_size
        init = {"W_embed": rng.standard_normal((V, self.wordvec_dim)) / 100,
                "W_proj": rng.standard_normal((D, H)) / np.sqrt(D)}
        init.update(self.cell.init_params(rng, self.wordvec_dim, H))
        init["W_vocab"] = rng.standard_normal((H, V)) / np.sqrt(H)
        for name, value in init.items():
            self.params[name] = value.astype(self.dtype)

    # ------------------------------------------------------------------
    # CS231n's API: gradients the caller owns

    def loss(self, features, captions, normalizer=None):
        """Loss and gradients of a caption batch, as CS231n's ``loss``.

        ``features`` (N, D) and ``captions`` (N, T+1) ids (host or device). The
        loss is the summed cross-entropy of the real tokens divided by
        ``normalizer`` (default N). ``grads`` maps every parameter name to a
        new array (copies, not views of the model's buffers).
        """
        g = self.forward_backward(features, self.pack(captions),
                                  self._normalizer(captions, normalizer))
        g.scatter_embedding()
        return float(g.loss), {name: view.copy() for name, view in self.grads.items()}

    def forward_loss(self, features, captions, normalizer=None):
        """The loss alone (no backward pass): evaluation and numeric gradients."""
        return self._packed_pass(features, self.pack(captions),
                                 self._normalizer(captions, normalizer), forward_only=True)

    def pack(self, captions):
        host = captions if isinstance(captions, np.ndarray) else captions.get()
        return pack_captions(host, self._null, self.kernels)

    @staticmethod
    def _normalizer(captions, normalizer):
        return captions.shape[0] if normalizer is None else normalizer

    # ------------------------------------------------------------------
    # The training hot path: the model's own buffers

    def forward_backward(self, features, packed, normalizer, vocab_ready=None):
        """Loss and gradients of a :class:`PackedBatch` into ``grad_buffer``; a :class:`StepGrads`.

        W_embed's gradient is left row-sparse (``embed_dense`` False): the
        reducer decides whether it travels sparse or is scattered densely.
        ``vocab_ready()``, when given, is called once W_vocab's and b_vocab's gradients
        are final, before backpropagation through time (the reducer may send them then).
        """
        return self._packed_pass(features, packed, normalizer, forward_only=False,
                                 vocab_ready=vocab_ready)

    def step_grads(self, loss, tokens, ids, rows, dense):
        return StepGrads(loss=loss, tokens=int(tokens), grad_buffer=self.grad_buffer,
                         embed_offset=self.embed_offset, embed_shape=self.shapes["W_embed"],
                         embed_ids=ids, embed_rows=rows, embed_dense=dense, kernels=self.kernels)

    def weights_fixed(self, converted=None):
        """``gemm.operands_fixed`` over the four GEMM weights: a converting Gemm (bf16) converts
        them once for the block (or takes them from ``converted``, the optimizer's rounding of
        the flat parameters, ``Gemm.param_twin``). A pass opens one; the training step opens
        one around all the passes of a step, so they are converted once per step."""
        p = self.params
        return self.gemm.operands_fixed(p["W_proj"], p["Wx"], p["Wh"], p["W_vocab"],
                                        converted=converted)

    def _packed_pass(self, features, packed, normalizer, forward_only, vocab_ready=None):
        # the weights do not change during a pass (already converted if a step's block is open)
        with self.weights_fixed():
            return self._packed_body(features, packed, normalizer, forward_only, vocab_ready)

    def _packed_body(self, features, packed, normalizer, forward_only, vocab_ready):
        xp, ws, dtype, cell, gemm = self.xp, self.ws, self.dtype, self.cell, self.gemm
        p, g = self.params, self.grads
        if not packed.batch_sizes:  # no real token anywhere: zero loss and gradient
            if forward_only:
                return 0.0
            self.grad_buffer.fill(0)
            return self.step_grads(0.0, 0, xp.zeros(0, np.int64),
                                    xp.zeros((0, self.wordvec_dim), dtype), dense=True)
        total = len(packed.words_in)
        words = to_device(packed.words_in, xp)
        targets = to_device(packed.targets, xp)
        order = to_device(packed.order, xp)
        n0 = len(packed.order)

        # Initial hidden state from the image features (sorted active rows only).
        feats = ws.get("feats", (n0, self.input_dim), dtype, xp)
        features = xp.asarray(features, dtype=dtype)
        if xp is np:  # the kernels' gather takes C-ordered rows
            features = np.ascontiguousarray(features)
        take_rows(features, order, feats, self.kernels, bits=gemm.twin(feats, "feats"))
        h0 = ws.get("h0", (n0, self.hidden_dim), dtype, xp)
        gemm.matmul(feats, p["W_proj"], h0)
        h0 += p["b_proj"]

        x = ws.get("embed", (total, self.wordvec_dim), dtype, xp)
        # twin: a Gemm that rounds its operands (bf16) gets them from the kernel writing them
        take_rows(p["W_embed"], words, x, self.kernels, bits=gemm.twin(x, "embed"))
        hidden, cache = cell.packed_forward(x, h0, p["Wx"], p["Wh"], p["b"], packed.batch_sizes, ws,
                                            self.kernels)

        # Vocabulary projection and softmax only where there is a real target.
        if packed.score_pos is None:
            scored = hidden
        else:
            score_pos = to_device(packed.score_pos, xp)
            scored = ws.get("scored", (len(packed.score_pos), self.hidden_dim), dtype, xp)
            take_rows(hidden, score_pos, scored, self.kernels, bits=gemm.twin(scored, "scored"))
        scores = ws.get("scores", (scored.shape[0], self.vocab_size), dtype, xp)
        gemm.matmul(scored, p["W_vocab"], scores)
        # the kernel adds b_vocab in its first pass and sums its gradient in its last
        if self.kernels is not None:
            bits = None if forward_only else gemm.twin(scores, "dscores")
            loss = self.kernels.softmax_cross_entropy(
                scores, targets, normalizer, bias=p["b_vocab"],
                bias_grad=None if forward_only else g["b_vocab"],
                **({} if bits is None else {"bits": bits}))
            dscores = scores
        else:
            scores += p["b_vocab"]
            loss, dscores = layers.softmax_cross_entropy(scores, targets, normalizer,
                                                         dscores=scores)
            if not forward_only:
                dscores.sum(axis=0, out=g["b_vocab"])
        if forward_only:
            return float(loss)
        forward_end = time.perf_counter()
        dscored = ws.get("dscored", scored.shape, dtype, xp)
        with gemm.operands_fixed(dscores):  # two GEMMs read it (rounded once in bf16)
            gemm.matmul(scored.T, dscores, g["W_vocab"])
            if vocab_ready is not None:  # W_vocab's and b_vocab's gradients are final: may travel
                vocab_ready()
            gemm.matmul(dscores, p["W_vocab"].T, dscored)
        if packed.score_pos is None:
            dhidden = dscored
        else:
            dhidden = ws.get("dhidden", (total, self.hidden_dim), dtype, xp)
            scatter_rows(dscored, score_pos, dhidden, self.kernels)

        # W_embed's gradient: the rows of dx = da_x Wx^T summed per word. Summing da_x per word
        # first gives the same sums with one GEMM row per distinct word instead of one per
        # position (at batch 128, about 800 words for 1,556 positions); the same pass sums
        # db (the gate bias gradient, da_x's column sums).
        da_x, dh0, *_ = cell.packed_backward(dhidden, cache, ws, self.kernels,
                                             out=(g["Wx"], g["Wh"], g["b"]), input_grad=False)
        gemm.matmul(feats.T, dh0[:n0], g["W_proj"])
        dh0[:n0].sum(axis=0, out=g["b_proj"])

        if getattr(gemm, "precision", "fp32") != "fp32":
            # A GEMM that rounds its operands would round each rank's partial per-word sums
            # (other bits on another number of ranks): one GEMM row per position, then the sums
            dx = ws.get("embed_dx", (total, self.wordvec_dim), dtype, xp)
            gemm.matmul(da_x, p["Wx"].T, dx)
            da_x.sum(axis=0, out=g["b"])
            ids, rows = layers.embedding_grad_sparse(words, dx, self.kernels, self.vocab_size)
        else:
            ids, da_rows = layers.embedding_grad_sparse(words, da_x, self.kernels, self.vocab_size,
                                                        col_sum=g["b"])
            rows = ws.get("embed_rows", (da_rows.shape[0], self.wordvec_dim), dtype, xp)
            gemm.matmul(da_rows, p["Wx"].T, rows)
        grads = self.step_grads(float(loss), packed.num_tokens, ids, rows, dense=False)
        grads.forward_end = forward_end
        return grads

    # ------------------------------------------------------------------
    # Fixed-shape mode (GPU): every row for all T steps, so CUDA graphs replay

    def forward_backward_fixed(self, features, batch, normalizer, ws=None, loss_out=None):
        """Loss and gradients of a :class:`FixedBatch` whose arrays are on this
        model's device: all N rows run all T steps, every position is scored and
        the 0/1 weights mask the loss. Same mathematics as :meth:`forward_backward`;
        no device synchronisation and no data-dependent shape, so the call can be
        captured as a CUDA graph. The loss is a 0-d float64 array left on the
        device (``loss_out`` if given). Both the dense W_embed gradient and its
        rows are filled (``embed_ids`` holds -1 past ``batch.num_ids``).
        """
        return fixed_forward_backward(self, features, batch, normalizer, ws, loss_out)

    # ------------------------------------------------------------------
    # The plain computation (CS231n layer by layer), the reference for tests

    def loss_reference(self, features, captions):
        """Loss and gradients the plain CS231n way: every step, every position."""
        xp, cell = self.xp, self.cell
        p = {k: v for k, v in self.params.items()}
        features = xp.asarray(features, dtype=self.dtype)
        captions = xp.asarray(captions)
        cin, cout = captions[:, :-1], captions[:, 1:]
        mask = cout != self._null
        h0 = features @ p["W_proj"] + p["b_proj"]
        x, emb_cache = layers.word_embedding_forward(cin, p["W_embed"])
        h, cache = cell.forward(x, h0, p["Wx"], p["Wh"], p["b"])
        scores, aff_cache = layers.temporal_affine_forward(h, p["W_vocab"], p["b_vocab"])
        loss, dscores = layers.temporal_softmax_loss(scores, cout, mask)
        grads = {}
        dh, grads["W_vocab"], grads["b_vocab"] = layers.temporal_affine_backward(dscores, aff_cache)
        dx, dh0, grads["Wx"], grads["Wh"], grads["b"] = cell.backward(dh, cache)
        grads["W_embed"] = layers.word_embedding_backward(dx, emb_cache)
        grads["W_proj"] = features.T @ dh0
        grads["b_proj"] = dh0.sum(axis=0)
        return loss, grads

    # ------------------------------------------------------------------
    # Greedy sampling

    def sample(self, features, max_length=30):
        """Greedy captions (N, max_length) for any N; <NULL> after <END>."""
        xp, p, cell = self.xp, self.params, self.cell
        if self._start is None or self._end is None:
            raise ValueError("sample() needs <START> and <END> in word_to_idx")
        features = xp.asarray(features, dtype=self.dtype)
        N = features.shape[0]
        captions = xp.full((N, max_length), self._null, dtype=np.int64)
        state = cell.init_state(features @ p["W_proj"] + p["b_proj"])
        word = xp.full(N, self._start, dtype=np.int64)
        finished = xp.zeros(N, dtype=bool)
        for t in range(max_length):
            h, state = cell.sample_step(p["W_embed"][word], state, p["Wx"], p["Wh"], p["b"])
            word = xp.argmax(h @ p["W_vocab"] + p["b_vocab"], axis=1)
            word = xp.where(finished, self._null, word)
            captions[:, t] = word
            finished |= word == self._end
            if t % 4 == 3 and bool(finished.all()):
                break
        return captions
