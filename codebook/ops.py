"""The codebook bottleneck as one custom op: ``codebook::topk_codebook``.

Given activations ``x`` of shape ``[..., g, d]`` (``g`` groups, e.g. one per attention head) and a
codebook of shape ``[g, C, d]``, every group vector is replaced by the combination (mean or sum) of
its ``k`` most similar codes. The same op serves training (through its autograd formula), eager
inference, TorchScript tracing and ONNX export, so the method lives in exactly one place.

Steering reaches the op through two optional per-code tensors of shape ``[g, C]``:

* ``bias`` is added to the similarity scores before the top-k. A large positive bias forces a code
  into the top-k (displacing the weakest one); ``-inf`` blocks it. A code whose biased score is
  ``-inf`` never contributes to the output even when fewer than ``k`` codes remain, so blocking
  every code but one replaces all ``k`` slots with that code.
* ``scale`` multiplies each selected code's vector in the combination (the steering strength).

Memory and speed: the ``[tokens, g, C]`` score matrix is never materialised whole; tokens are
processed in chunks, so the extra memory stays bounded whatever the number of tokens, and on CPU
each chunk is small enough to stay in cache between the matrix multiply that writes it and the
top-k that reads it. With many codes the top-k itself goes through block maxima (see
:func:`top_codes`), which is exact and several times cheaper than ``torch.topk`` over every code.

Gradients (straight-through estimator, as in the paper): the gradient of the output flows to ``x``
unchanged, and to each selected code (weighted as in the combination). In addition, the backward
pass adds the gradient of the paper's reconstruction term
``reconstruction_weight * mean((out - stopgrad(x))**2)`` with respect to the selected codes, which
pulls codes toward the activations they stand for. That term is not part of the forward value; the
training code reports it separately (see :func:`reconstruction_mse`). Its gradient is added as it
is, unaffected by any scaling of the loss: a caller that scales the loss (e.g. by 1 / gradient
accumulation steps) scales ``reconstruction_weight`` alike, as ``training/trainer.py`` does.

The op is registered with ``torch.library``'s low-level API rather than ``torch.library.custom_op``:
custom_op wraps every eager call in ``torch._dynamo.disable``, which, whenever a ``torch.export``
runs anywhere in the process, writes to a process-wide dict in ``torch.fx.traceback`` without a
lock; two threads calling the op then corrupt it (a ``KeyError`` in ``annotate``, or metadata left
behind). Registered this way, an eager call touches no such state, and skips the wrapper's cost.

Similarities are entries of one registry, :data:`SIMILARITIES` (see :class:`Similarity`): the op,
the configuration, k-means initialisation and the ONNX export all look a similarity up there, so
adding one is one :func:`register_similarity` call. :func:`reference_topk_codebook` is the op
written plainly (score, top-k, combine), the tests' oracle for the chunked path.

This file needs nothing but torch: TorchScript bundles ship a verbatim copy of it (so the ONNX
emitters below build nodes through the caller's ``body`` and import nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

COMBINES = ("mean", "sum")

# The defaults of every codebook: this op's Python API, CodebookLayer, CodebookConfig and the
# training recipe all use these. Sum, as the paper writes the method (its library used mean).
DEFAULT_SIMILARITY = "cosine"
DEFAULT_COMBINE = "sum"

# The registered schema's defaults are a different thing, frozen: a serialized graph (TorchScript,
# torch.export) leaves out every argument equal to its schema default, so graphs saved with
# combine="mean" rely on "mean" staying the schema's default. Every call made through
# topk_codebook() passes both arguments explicitly.
_SCHEMA_SIMILARITY = "cosine"
_SCHEMA_COMBINE = "mean"

# Score-matrix elements (``chunk_tokens * g * C``) computed at once. On CPU, 2**22 float32 scores
# (16 MiB) stay in the last-level cache between the matrix multiply that writes them and the top-k
# that reads them: at 4096 tokens x 8 groups x 512 codes the multiply ran 6x slower into one 64 MiB
# chunk, and smaller chunks than 2**22 were no faster. MIN_CHUNK_TOKENS keeps the multiply
# efficient where groups x codes is large (4096 tokens x 16 groups x 10k codes: the op ran 1.7x
# faster in 128-token chunks than in the budget's 26). GPUs want big chunks to stay busy; 2**24
# float32 scores are 64 MiB, a small fraction of the full matrix where it matters (2.6 GB at the
# shape above). benchmarks/bench_op.py measures both the time and the memory.
CPU_SCORE_BUDGET = 2**22
GPU_SCORE_BUDGET = 2**24
MIN_CHUNK_TOKENS = 128

# Block maxima pay off when torch.topk has many codes per row to go through; below this many codes
# the two smaller top-k calls of top_codes cost more than one over all codes (measured on CPU; on
# GPUs torch.topk is a radix select, so the plain call is kept there).
BLOCK_TOPK_MIN_CODES = 2048

_EPS = 1e-8


def _check_args(x: Tensor, codebook: Tensor, k: int, bias, scale, similarity: str, combine: str):
    if codebook.dim() != 3:
        raise ValueError(
            f"codebook must have shape [groups, codes, dim], got {tuple(codebook.shape)}"
        )
    groups, num_codes, dim = codebook.shape
    if x.dim() < 2 or x.shape[-2] != groups or x.shape[-1] != dim:
        raise ValueError(
            f"activations must have shape [..., {groups}, {dim}] to match the codebook "
            f"[{groups}, {num_codes}, {dim}], got {tuple(x.shape)}"
        )
    if not 1 <= k <= num_codes:
        raise ValueError(f"k must be between 1 and the number of codes ({num_codes}), got {k}")
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and tuple(t.shape) != (groups, num_codes):
            raise ValueError(
                f"{name} must have shape [{groups}, {num_codes}], got {tuple(t.shape)}"
            )
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got {similarity!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


# -- similarities --------------------------------------------------------------------------------


# score(xg, out): the scores [g, n, C] of one chunk of activations (see Similarity.chunk_scorer).
ChunkScore = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Similarity:
    """One similarity between activations and codes, in every form the project computes it.

    ``scores(x, codebook)``
        The similarity itself: ``x`` ``[..., g, d]`` against ``codebook`` ``[g, C, d]`` gives
        ``[..., g, C]``, higher = more similar. The reference op, k-means assignment and the
        export's near-tie check use it, and the op too where ``chunk_scorer`` is not given.
    ``kmeans_distance(points, centre)``
        ``[g, n, d]`` prepared points and one prepared centre ``[g, d]`` per group give a
        non-negative ``[g, n]`` distance; k-means++ seeding draws points in proportion to it.
    ``onnx_scores(body, x, codebook)``
        The scores in an ONNX function: given the names of ``x`` ``[g, N, d]`` and ``codebook``
        ``[g, C, d]``, adds standard-domain nodes with ``body.op(op_type, inputs, output,
        **attributes)`` (which returns the output's name), ``body.ints(name, values)`` and
        ``body.scalar_like(name, value, like)``, and returns the name of the scores ``[g, N, C]``
        (see cbexport/onnx_function.py).
    ``scale_invariant``
        Whether multiplying every code by one positive factor leaves each token's ranking of the
        codes unchanged: only then may k-means start ``combine="sum"`` codebooks at ``1/k`` of the
        centroids (training/kmeans.py).
    ``prepare(vectors)`` (optional)
        Maps activations and codes alike to the form the similarity compares (cosine: unit
        vectors), with ``scores(prepare(x), prepare(c))`` equal to ``scores(x, c)``. The op and
        k-means++ prepare the codebook and the points once, not once per chunk or per centre.
    ``chunk_scorer(codebook)`` (optional, for speed)
        Takes the prepared codebook and returns ``with_bias(bias)``, which takes the bias
        ``[g, C]`` (or None) once per call and returns ``score(xg, out)``: the scores of one chunk
        of prepared activations ``xg`` ``[g, n, d]``, bias added, written into the buffer ``out``
        ``[g, n, C]`` where it can. They only rank the codes, so they may differ from ``scores``
        by a constant per token and group. The work that depends on the codebook alone belongs in
        the first stage: inside :func:`prepared_codebooks` the op keeps its result from call to
        call while the codebook is unchanged.
    """

    name: str
    scores: Callable[[Tensor, Tensor], Tensor]
    kmeans_distance: Callable[[Tensor, Tensor], Tensor]
    onnx_scores: Callable[[Any, str, str], str]
    scale_invariant: bool
    prepare: Callable[[Tensor], Tensor] | None = None
    chunk_scorer: Callable[[Tensor], Callable[[Tensor | None], ChunkScore]] | None = None

    def prepared(self, vectors: Tensor) -> Tensor:
        return vectors if self.prepare is None else self.prepare(vectors)

    def scorer(self, codebook: Tensor) -> Callable[[Tensor | None], ChunkScore]:
        """The op's ``with_bias(bias) -> score(xg, out)`` for the prepared ``codebook``:
        ``chunk_scorer``'s, or ``scores`` plus ``bias``."""
        if self.chunk_scorer is not None:
            return self.chunk_scorer(codebook)

        def with_bias(bias: Tensor | None) -> ChunkScore:
            def score(xg: Tensor, out: Tensor) -> Tensor:
                scores = self.scores(xg.transpose(0, 1), codebook).transpose(0, 1)
                return scores if bias is None else scores + bias[:, None, :]

            return score

        return with_bias


# Every similarity by name. Register one with register_similarity; delete its entry to unregister.
SIMILARITIES: dict[str, Similarity] = {}


def register_similarity(similarity: Similarity) -> None:
    """Make ``similarity`` available by its name to the op, the configuration, k-means and the
    ONNX export. A TorchScript bundle's op module knows only the similarities defined here."""
    if similarity.name in SIMILARITIES:
        raise ValueError(f"a similarity named {similarity.name!r} is already registered")
    SIMILARITIES[similarity.name] = similarity


def _unit(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _dot(x: Tensor, codebook: Tensor) -> Tensor:
    """``[..., g, C]`` inner products of ``x`` ``[..., g, d]`` with every code ``[g, C, d]``, as one
    batched matrix multiply per group (the op's own layout, so the rounding is the op's)."""
    xg = x.reshape(-1, *x.shape[-2:]).transpose(0, 1)  # [g, n, d]
    scores = torch.bmm(xg, codebook.transpose(1, 2).contiguous())  # [g, n, C]
    return scores.transpose(0, 1).reshape(*x.shape[:-1], codebook.shape[1])


def _cosine_scores(x: Tensor, codebook: Tensor) -> Tensor:
    return _dot(_unit(x), _unit(codebook))


def _euclidean_scores(x: Tensor, codebook: Tensor) -> Tensor:
    """``-||x - c||^2``, expanded as ``2 x.c - ||c||^2 - ||x||^2`` (no ``[..., g, C, d]``
    differences in memory)."""
    return 2 * _dot(x, codebook) - codebook.pow(2).sum(-1) - x.pow(2).sum(-1, keepdim=True)


def _one_minus_dot(points: Tensor, centre: Tensor) -> Tensor:
    """``1 - cos`` between unit vectors."""
    return (1 - torch.einsum("gnd,gd->gn", points, centre)).clamp_min(0)


def _squared_distance(points: Tensor, centre: Tensor) -> Tensor:
    return (points - centre[:, None]).pow(2).sum(-1)


def _matmul_scorer(squared_distance: bool):
    """``chunk_scorer`` of the similarities that are one matrix multiply (the cosine's inputs are
    already unit vectors): the codebook is transposed once to ``[g, d, C]``, and the terms added
    to every token's scores (the bias; for ``-||x - c||^2 = 2 x.c - ||c||^2 - ||x||^2`` also
    ``-||c||^2``) are folded into the multiply (baddbmm). ``-||x||^2`` is the same for every code
    of a token and group, so it is left out: it cannot change the ranking."""

    def chunk_scorer(codebook: Tensor):
        sq_norm = codebook.pow(2).sum(-1) if squared_distance else None
        table = codebook.transpose(1, 2).contiguous()
        alpha = 2 if squared_distance else 1

        def with_bias(bias: Tensor | None) -> ChunkScore:
            offset = bias
            if sq_norm is not None:
                offset = -sq_norm if offset is None else offset - sq_norm

            def score(xg: Tensor, out: Tensor) -> Tensor:
                if offset is None:
                    return torch.bmm(xg, table, out=out)
                return torch.baddbmm(offset[:, None, :], xg, table, alpha=alpha, out=out)

            return score

        return with_bias

    return chunk_scorer


def _onnx_unit(body, vectors: str, name: str) -> str:
    """``v / max(||v||, eps)`` along the last axis, as :func:`_unit`."""
    squares = body.op("Mul", [vectors, vectors], name + "_sq")
    total = body.op("ReduceSum", [squares, body.ints(name + "_axis", [-1])], name + "_sum",
                    keepdims=1)
    norm = body.op("Sqrt", [total], name + "_norm")
    floor = body.op("Max", [norm, body.scalar_like(name + "_eps", _EPS, vectors)],
                    name + "_clamped")
    return body.op("Div", [vectors, floor], name)


def _onnx_dot(body, x: str, codebook: str) -> str:
    codebook_t = body.op("Transpose", [codebook], "codebook_t", perm=[0, 2, 1])
    return body.op("MatMul", [x, codebook_t], "dot")


def _onnx_cosine_scores(body, x: str, codebook: str) -> str:
    return _onnx_dot(body, _onnx_unit(body, x, "x_unit"), _onnx_unit(body, codebook, "cb_unit"))


def _onnx_euclidean_scores(body, x: str, codebook: str) -> str:
    """``2 x.c - ||c||^2 - ||x||^2``, the expansion :func:`_euclidean_scores` uses."""
    last = body.ints("last_axis", [-1])
    code_sq = body.op("ReduceSum", [body.op("Mul", [codebook, codebook], "cb_sq"), last],
                      "code_sq_norm", keepdims=0)  # [g, C]
    x_sq = body.op("ReduceSum", [body.op("Mul", [x, x], "x_sq_el"), last], "x_sq", keepdims=1)
    scores = body.op("Mul", [body.scalar_like("two", 2.0, x), _onnx_dot(body, x, codebook)],
                     "dot2")
    code_sq = body.op("Unsqueeze", [code_sq, body.ints("axis1", [1])], "code_sq_b")
    scores = body.op("Sub", [scores, code_sq], "dot2_minus_c")
    return body.op("Sub", [scores, x_sq], "neg_sq_dist")


register_similarity(Similarity(
    "cosine", _cosine_scores, _one_minus_dot, _onnx_cosine_scores, scale_invariant=True,
    prepare=_unit, chunk_scorer=_matmul_scorer(squared_distance=False),
))
register_similarity(Similarity(
    "inner_product", _dot, _squared_distance, _onnx_dot, scale_invariant=True,
    chunk_scorer=_matmul_scorer(squared_distance=False),
))
register_similarity(Similarity(
    "euclidean", _euclidean_scores, _squared_distance, _onnx_euclidean_scores,
    scale_invariant=False, chunk_scorer=_matmul_scorer(squared_distance=True),
))
# The similarities this file defines: all that a TorchScript bundle's copy of it knows.
BUILT_IN_SIMILARITIES = tuple(SIMILARITIES)


# -- the op --------------------------------------------------------------------------------------


def top_codes(scores: Tensor, k: int, block: int = 0) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of the ``k`` largest scores along the last dimension, best first, as
    ``scores.topk(k, dim=-1)`` gives them (see :func:`_topk` for NaN scores).

    With ``block`` (a divisor of the number of codes, at least ``k`` blocks), the codes are cut
    into blocks of that many; the ``k`` blocks with the largest maxima are kept and the top-k is
    taken over their codes only. That is exact: those ``k`` maxima are ``k`` scores at least as
    large as any score outside the kept blocks, so every score above the k-th largest, and enough
    scores equal to it, lie inside them. As with ``torch.topk``, which of several equal scores is
    picked is unspecified; the selected values are always those of a full top-k.
    """
    if not block:
        return _topk(scores, k)
    *lead, num_codes = scores.shape
    blocks = scores.reshape(-1, num_codes // block, block)
    rows, num_blocks = blocks.shape[:2]
    _, kept = _topk(blocks.amax(-1), k, sorted=False)  # [rows, k]
    first_block = torch.arange(rows, device=scores.device)[:, None] * num_blocks
    candidates = blocks.reshape(rows * num_blocks, block).index_select(
        0, (kept + first_block).reshape(-1)
    )
    values, position = _topk(candidates.reshape(rows, k * block), k)
    indices = kept.gather(-1, position // block) * block + position % block
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def _topk(scores: Tensor, k: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, dim=-1, sorted=sorted)``; on CPU, float32 scores are ranked by their bit
    patterns read as int32, which torch.topk goes through about a quarter faster (no NaN checks).

    Those integers rank non-negative floats (sign bit clear: +0.0 up to +inf, then NaN) exactly as
    the floats, and every negative float below them. So wherever the k-th largest integer has its
    sign bit clear, the k integers picked are the k largest floats; the other rows (fewer than
    ``k`` non-negative scores: distances, blocked codes) are ranked again as floats. The one
    difference from torch.topk: a NaN with its sign bit set ranks last instead of first (NaN
    scores only come from NaN or infinite activations or codes).
    """
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        return scores.topk(k, dim=-1, sorted=sorted)
    keys, indices = scores.view(torch.int32).topk(k, dim=-1, sorted=sorted)
    smallest_key = keys[..., -1] if sorted else keys.amin(-1)
    unsure = smallest_key < 0
    values = keys.view(torch.float32)
    if bool(unsure.any()):
        values[unsure], indices[unsure] = scores[unsure].topk(k, dim=-1, sorted=sorted)
    return values, indices


def combine_codes(
    codebook: Tensor,
    indices: Tensor,
    valid: Tensor,
    scale: Tensor | None,
    combine: str,
) -> Tensor:
    """Combination (float32) ``[..., g, d]`` of the selected codes ``indices`` ``[..., g, k]``."""
    groups, num_codes, dim = codebook.shape
    k = indices.shape[-1]
    weights = _code_weights(indices, valid, scale, combine)  # [..., g, k]
    offsets = torch.arange(groups, device=indices.device)[:, None] * num_codes
    # One bag of k rows per (token, group) of the flattened [g * C, d] table: this sums the codes
    # without materialising the [..., g, k, d] gathered vectors (16x faster on CPU at g=16, d=64).
    combined = F.embedding_bag(
        (indices + offsets).reshape(-1, k),
        codebook.float().reshape(groups * num_codes, dim),
        mode="sum",
        per_sample_weights=weights.reshape(-1, k),
    )
    return combined.reshape(*indices.shape[:-1], dim)


def _code_weights(indices: Tensor, valid: Tensor, scale: Tensor | None, combine: str) -> Tensor:
    weights = valid.to(torch.float32)
    if combine == "mean":
        weights = weights / valid.sum(-1, keepdim=True).clamp_min(1)
    if scale is not None:
        groups = torch.arange(scale.shape[0], device=indices.device)[:, None]
        weights = weights * scale.float()[groups, indices]
    return weights


def _chunk_tokens(num_tokens: int, groups: int, num_codes: int, chunk_size: int,
                  device: torch.device) -> int:
    if chunk_size > 0:
        return chunk_size
    budget = CPU_SCORE_BUDGET if device.type == "cpu" else GPU_SCORE_BUDGET
    return max(MIN_CHUNK_TOKENS, min(num_tokens, budget // (groups * num_codes)))


def _topk_block(num_codes: int, k: int, device: torch.device) -> int:
    """The block size :func:`top_codes` uses for ``num_codes`` codes on ``device`` (0: a plain
    top-k)."""
    if device.type != "cpu" or num_codes < BLOCK_TOPK_MIN_CODES:
        return 0
    return _block_size(num_codes, k)


@functools.lru_cache(maxsize=64)
def _block_size(num_codes: int, k: int) -> int:
    """The divisor of ``num_codes`` closest to ``sqrt(num_codes)`` that leaves at least ``k``
    blocks (0 if none): it balances the block maxima's top-k against the candidates' (100 for
    10,000 codes, 64 for 4096). A prime number of codes gets a plain top-k."""
    root = math.sqrt(num_codes)
    divisors = [b for b in range(2, num_codes // k + 1) if num_codes % b == 0]
    return min(divisors, key=lambda b: abs(math.log(b / root)), default=0)


# The codebooks prepared inside prepared_codebooks(): (id, similarity, dtype) -> _Prepared.
_PREPARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "codebook_prepared", default=None)


@dataclasses.dataclass
class _Prepared:
    codebook: weakref.ref  # the codebook it was made from
    similarity: Similarity
    stamp: tuple  # what the codebook was then (see _stamp)
    scorer: Callable[[Tensor | None], ChunkScore]


def _stamp(codebook: Tensor) -> tuple:
    """What tells an unchanged codebook: an in-place write bumps ``_version``, a new tensor put in
    its place has a new data pointer (or device, dtype, shape)."""
    return (codebook._version, codebook.data_ptr(), codebook.device, codebook.dtype,
            codebook.shape, codebook.stride())


@contextlib.contextmanager
def prepared_codebooks(kept: dict | None = None) -> Iterator[dict]:
    """Inside the block (in the current context only), the op prepares each codebook once
    (cosine: unit codes, transposed for the multiply) and reuses that for later calls while the
    codebook is unchanged, instead of preparing it on every call: for inference, where a decoding
    step is a forward over a few tokens and the preparation cost as much as the rest of the op.
    The results are the same bit for bit.

    A codebook counts as changed when an in-place write bumped its version counter or it was
    replaced (another tensor, device, dtype or shape). Writes through ``.data`` do not bump the
    version: a block must not change a codebook that way (training, which does, runs outside
    any block). ``kept`` (the dict yielded by an earlier block) carries the prepared codebooks
    from one block to the next."""
    kept = {} if kept is None else kept
    token = _PREPARED.set(kept)
    try:
        yield kept
    finally:
        _PREPARED.reset(token)


def _codebook_scorer(measure: Similarity, codebook: Tensor,
                     dtype: torch.dtype) -> Callable[[Tensor | None], ChunkScore]:
    """``measure.scorer`` of the prepared ``codebook`` (in ``dtype``), kept inside
    :func:`prepared_codebooks`."""
    kept = _PREPARED.get()
    if kept is None or codebook.is_inference():  # (inference tensors have no version counter)
        return measure.scorer(measure.prepared(codebook.to(dtype)))
    key = (id(codebook), measure.name, dtype)
    entry = kept.get(key)
    stamp = _stamp(codebook)
    if (entry is None or entry.codebook() is not codebook or entry.similarity is not measure
            or entry.stamp != stamp):
        entry = _Prepared(weakref.ref(codebook), measure, stamp,
                          measure.scorer(measure.prepared(codebook.to(dtype))))
        kept[key] = entry
    return entry.scorer


def topk_codebook(
    x: Tensor,
    codebook: Tensor,
    k: int,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    similarity: str = DEFAULT_SIMILARITY,
    combine: str = DEFAULT_COMBINE,
    reconstruction_weight: float = 1.0,
    chunk_size: int = 0,
) -> tuple[Tensor, Tensor]:
    """Replace each group vector of ``x`` by the combination of its top-``k`` codes.

    Returns ``(out, indices)``: ``out`` has the shape and dtype of ``x``; ``indices`` (int64,
    ``[..., g, k]``) are the chosen codes, best first. ``chunk_size`` is the number of tokens
    scored at once (0: chosen so that the score chunk holds about :data:`CPU_SCORE_BUDGET`
    elements on CPU, :data:`GPU_SCORE_BUDGET` elsewhere).
    ``reconstruction_weight`` only affects the backward pass (see the module docstring).
    """
    return torch.ops.codebook.topk_codebook.default(
        x, codebook, k, bias, scale, similarity, combine, reconstruction_weight, chunk_size
    )


def reference_topk_codebook(
    x: Tensor,
    codebook: Tensor,
    k: int,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    similarity: str = DEFAULT_SIMILARITY,
    combine: str = DEFAULT_COMBINE,
) -> tuple[Tensor, Tensor]:
    """:func:`topk_codebook` written plainly, all scores at once: the tests' oracle.

    Same outputs (up to rounding). Its gradient reaches the selected codes only; the op also
    passes the output's gradient straight through to ``x`` and adds the reconstruction term's.
    """
    scores = SIMILARITIES[similarity].scores(x, codebook)  # [..., g, C]
    if bias is not None:
        scores = scores + bias  # steering: +inf forces a code, -inf blocks it
    top, indices = scores.topk(k, dim=-1)  # [..., g, k], best first
    weights = (top > -math.inf).to(codebook.dtype)  # a blocked code adds nothing
    if combine == "mean":
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
    groups = torch.arange(codebook.shape[0], device=codebook.device)[:, None]
    if scale is not None:
        weights = weights * scale[groups, indices]
    return (weights[..., None] * codebook[groups, indices]).sum(-2), indices


# Defaults as in the schema: the dispatcher leaves out trailing arguments that have them.
def _forward(x, codebook, k, bias=None, scale=None, similarity=_SCHEMA_SIMILARITY,
             combine=_SCHEMA_COMBINE, reconstruction_weight=1.0, chunk_size=0):
    _check_args(x, codebook, k, bias, scale, similarity, combine)
    groups, num_codes, dim = codebook.shape
    flat = x.reshape(-1, groups, dim)
    num_tokens = flat.shape[0]
    measure = SIMILARITIES[similarity]
    score = _codebook_scorer(measure, codebook, x.dtype)(None if bias is None else bias.to(x.dtype))
    table = codebook.float()  # combined in float32 whatever the input dtype
    block = _topk_block(num_codes, k, x.device)
    out = torch.empty_like(flat)
    indices = torch.empty(num_tokens, groups, k, dtype=torch.long, device=x.device)
    step = _chunk_tokens(num_tokens, groups, num_codes, chunk_size, x.device)
    # One score buffer for all chunks: a fresh allocation of this size costs page faults on
    # every chunk (on CPU a bmm into a reused buffer ran 2.5x faster than into a new one).
    buffer = torch.empty(groups * min(step, num_tokens) * num_codes, dtype=x.dtype,
                         device=x.device)
    for start in range(0, num_tokens, step):
        xg = measure.prepared(flat[start : start + step].transpose(0, 1))  # [g, n, d]
        scores = score(xg, buffer[: xg.shape[0] * xg.shape[1] * num_codes].view(
            *xg.shape[:2], num_codes))  # [g, n, C]
        top_scores, top_idx = top_codes(scores, k, block)
        chosen = top_idx.transpose(0, 1)  # [n, g, k]
        indices[start : start + step] = chosen
        valid = top_scores.transpose(0, 1) > -math.inf
        out[start : start + step] = combine_codes(table, chosen, valid, scale, combine)
    return out.reshape(x.shape), indices.reshape(*x.shape[:-1], k)


def _fake(x, codebook, k, bias=None, scale=None, similarity=_SCHEMA_SIMILARITY,
          combine=_SCHEMA_COMBINE, reconstruction_weight=1.0, chunk_size=0):
    torch._check(k >= 1)
    out = torch.empty_like(x)
    indices = x.new_empty((*x.shape[:-1], k), dtype=torch.long)
    return out, indices


def _setup_context(ctx, inputs, output):
    x, codebook, k, bias, scale, similarity, combine, reconstruction_weight, chunk_size = inputs
    out, indices = output
    ctx.save_for_backward(x, codebook, out, indices, bias, scale)
    ctx.combine = combine
    ctx.reconstruction_weight = reconstruction_weight


def _backward(ctx, grad_out, _grad_indices):
    x, codebook, out, indices, bias, scale = ctx.saved_tensors
    grad_x = grad_out if ctx.needs_input_grad[0] else None
    grad_codebook = None
    if ctx.needs_input_grad[1]:
        grad_codebook = codebook_grad(
            x, codebook, out, indices, grad_out, bias, scale,
            ctx.combine, ctx.reconstruction_weight,
        )
    return grad_x, grad_codebook, None, None, None, None, None, None, None


def codebook_grad(
    x: Tensor,
    codebook: Tensor,
    out: Tensor,
    indices: Tensor,
    grad_out: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    combine: str,
    reconstruction_weight: float,
) -> Tensor:
    """Gradient w.r.t. the codebook: each selected code receives, weighted as in the combination,
    the output gradient plus the gradient of ``reconstruction_weight * mean((out - sg(x))**2)``."""
    groups, num_codes, dim = codebook.shape
    k = indices.shape[-1]
    flat_idx = indices.reshape(-1, groups, k)
    grad = grad_out.reshape(-1, groups, dim).float()
    if reconstruction_weight:
        # d/d(out) of weight * mean((out - x)**2); divided as a tensor so that tracing with
        # symbolic shapes does not turn the element count into a Python float.
        diff = out.reshape(-1, groups, dim).float() - x.reshape(-1, groups, dim).float()
        grad = grad + diff * (2.0 * reconstruction_weight) / x.numel()
    uniform = bias is None and scale is None  # every selected code has the same weight
    if uniform and combine == "mean":
        grad = grad / k
    weights = None if uniform else _code_weights(
        flat_idx, _selected_is_valid(flat_idx, bias), scale, combine
    )
    grad_cb = torch.zeros(groups * num_codes, dim, dtype=torch.float32, device=codebook.device)
    offsets = torch.arange(groups, device=codebook.device)[None, :] * num_codes
    # One scatter per slot of the top-k keeps the scattered source at the input's size instead
    # of materialising a [tokens, g, k, d] tensor (and one scatter of that was 2x slower on CPU).
    for slot in range(k):
        source = grad if weights is None else grad * weights[..., slot, None]
        rows = (flat_idx[..., slot] + offsets).reshape(-1)
        grad_cb.index_add_(0, rows, source.reshape(-1, dim))
    return grad_cb.reshape(groups, num_codes, dim).to(codebook.dtype)


def _selected_is_valid(indices: Tensor, bias: Tensor | None) -> Tensor:
    """Whether each selected code was a real choice (its bias is not -inf, i.e. not blocked)."""
    if bias is None:
        return torch.ones_like(indices, dtype=torch.bool)
    groups = torch.arange(bias.shape[0], device=indices.device)[:, None]
    return bias[groups, indices] > -math.inf


_LIBRARY = torch.library.Library("codebook", "FRAGMENT")
_LIBRARY.define(
    "topk_codebook(Tensor x, Tensor codebook, SymInt k, Tensor? bias=None, Tensor? scale=None, "
    f'str similarity="{_SCHEMA_SIMILARITY}", str combine="{_SCHEMA_COMBINE}", '
    "float reconstruction_weight=1., SymInt chunk_size=0) -> (Tensor, Tensor)",
    tags=(torch.Tag.pt2_compliant_tag,),
)
torch.library.impl("codebook::topk_codebook", "default", _forward, lib=_LIBRARY)
torch.library.register_fake("codebook::topk_codebook", _fake, lib=_LIBRARY)
torch.library.register_autograd(
    "codebook::topk_codebook", _backward, setup_context=_setup_context, lib=_LIBRARY
)


def reconstruction_mse(x: Tensor, out: Tensor) -> Tensor:
    """The reconstruction error the backward pass minimises, for logging: ``mean((out - x)**2)``."""
    return (out.float() - x.detach().float()).pow(2).mean()
