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

Memory: the ``[tokens, g, C]`` score matrix is never materialised whole; tokens are processed in
chunks so that the extra memory stays bounded whatever the number of tokens.

Gradients (straight-through estimator, as in the paper): the gradient of the output flows to ``x``
unchanged, and to each selected code (weighted as in the combination). In addition, the backward
pass adds the gradient of the paper's reconstruction term
``reconstruction_weight * mean((out - stopgrad(x))**2)`` with respect to the selected codes, which
pulls codes toward the activations they stand for. That term is not part of the forward value; the
training code reports it separately (see :func:`reconstruction_mse`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIMILARITIES = ("cosine", "inner_product", "euclidean")
COMBINES = ("mean", "sum")

# Score-matrix elements processed at once (``chunk_tokens * g * C``). 2**24 float32 scores are
# 64 MiB: enough tokens per chunk for the matrix multiply to run at full speed, and a small
# fraction of the full matrix at the sizes where it matters (2.6 GB at 4096 tokens x 16 x 10k).
DEFAULT_SCORE_BUDGET = 2**24

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
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def prepare_codebook(codebook: Tensor, similarity: str) -> tuple[Tensor, Tensor | None]:
    """Per-codebook terms of the score that do not depend on the input, done once per call rather
    than per chunk: the (normalised, for cosine) codebook transposed to ``[g, d, C]`` for the
    matrix multiply, and the squared code norms ``[g, C]`` for Euclidean distance."""
    sq_norm = codebook.pow(2).sum(-1) if similarity == "euclidean" else None
    if similarity == "cosine":
        codebook = codebook / codebook.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return codebook.transpose(1, 2).contiguous(), sq_norm


def similarity_scores(
    x: Tensor, scoring_codebook: Tensor, code_sq_norm: Tensor | None, similarity: str
) -> Tensor:
    """Scores ``[n, g, C]`` of ``x`` ``[n, g, d]`` against every code (higher = more similar);
    ``scoring_codebook`` and ``code_sq_norm`` come from :func:`prepare_codebook`."""
    xg = x.transpose(0, 1)  # [g, n, d]
    if similarity == "cosine":
        xg = xg / xg.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    scores = torch.bmm(xg, scoring_codebook)  # [g, n, C]
    if similarity == "euclidean":
        scores = 2 * scores - code_sq_norm[:, None, :] - xg.pow(2).sum(-1, keepdim=True)
    return scores.transpose(0, 1)


def combine_codes(
    codebook: Tensor,
    indices: Tensor,
    valid: Tensor,
    scale: Tensor | None,
    combine: str,
) -> Tensor:
    """Combination ``[n, g, d]`` of the selected codes ``indices`` ``[n, g, k]``."""
    weights = _code_weights(indices, valid, scale, combine)  # [n, g, k]
    groups = torch.arange(codebook.shape[0], device=indices.device)[None, :, None]
    vectors = codebook[groups, indices]  # [n, g, k, d]
    return (weights.unsqueeze(-1) * vectors).sum(-2)


def _code_weights(indices: Tensor, valid: Tensor, scale: Tensor | None, combine: str) -> Tensor:
    weights = valid.to(torch.float32)
    if combine == "mean":
        weights = weights / valid.sum(-1, keepdim=True).clamp_min(1)
    if scale is not None:
        groups = torch.arange(scale.shape[0], device=indices.device)[None, :, None]
        weights = weights * scale.float()[groups, indices]
    return weights


def _chunk_tokens(num_tokens: int, groups: int, num_codes: int, chunk_size: int) -> int:
    if chunk_size > 0:
        return chunk_size
    return max(1, min(num_tokens, DEFAULT_SCORE_BUDGET // (groups * num_codes)))


@torch.library.custom_op("codebook::topk_codebook", mutates_args=())
def topk_codebook(
    x: Tensor,
    codebook: Tensor,
    k: int,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    similarity: str = "cosine",
    combine: str = "mean",
    reconstruction_weight: float = 1.0,
    chunk_size: int = 0,
) -> tuple[Tensor, Tensor]:
    """Replace each group vector of ``x`` by the combination of its top-``k`` codes.

    Returns ``(out, indices)``: ``out`` has the shape and dtype of ``x``; ``indices`` (int64,
    ``[..., g, k]``) are the chosen codes, best first. ``chunk_size`` is the number of tokens
    scored at once (0: chosen so that the score chunk holds about 4M elements).
    ``reconstruction_weight`` only affects the backward pass (see the module docstring).
    """
    _check_args(x, codebook, k, bias, scale, similarity, combine)
    groups, num_codes, dim = codebook.shape
    lead = x.shape[:-2]
    flat = x.reshape(-1, groups, dim)
    num_tokens = flat.shape[0]
    cb = codebook.to(x.dtype)
    scoring_cb, code_sq_norm = prepare_codebook(cb, similarity)
    out = torch.empty_like(flat)
    indices = torch.empty(num_tokens, groups, k, dtype=torch.long, device=x.device)
    step = _chunk_tokens(num_tokens, groups, num_codes, chunk_size)
    for start in range(0, num_tokens, step):
        chunk = flat[start : start + step]
        scores = similarity_scores(chunk, scoring_cb, code_sq_norm, similarity)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        top_scores, top_idx = scores.topk(k, dim=-1)
        valid = top_scores > -math.inf
        indices[start : start + step] = top_idx
        out[start : start + step] = combine_codes(cb, top_idx, valid, scale, combine).to(x.dtype)
    return out.reshape(x.shape), indices.reshape(*lead, groups, k)


@topk_codebook.register_fake
def _(x, codebook, k, bias=None, scale=None, similarity="cosine", combine="mean",
      reconstruction_weight=1.0, chunk_size=0):
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
    # of materialising a [tokens, g, k, d] tensor.
    for slot in range(k):
        source = grad if weights is None else grad * weights[..., slot, None]
        rows = (flat_idx[..., slot] + offsets).reshape(-1)
        grad_cb.index_add_(0, rows, source.reshape(-1, dim))
    return grad_cb.reshape(groups, num_codes, dim).to(codebook.dtype)


def _selected_is_valid(indices: Tensor, bias: Tensor | None) -> Tensor:
    """Whether each selected code was a real choice (its bias is not -inf, i.e. not blocked)."""
    if bias is None:
        return torch.ones_like(indices, dtype=torch.bool)
    groups = torch.arange(bias.shape[0], device=indices.device)[None, :, None]
    return bias[groups, indices] > -math.inf


topk_codebook.register_autograd(_backward, setup_context=_setup_context)


def reconstruction_mse(x: Tensor, out: Tensor) -> Tensor:
    """The reconstruction error the backward pass minimises, for logging: ``mean((out - x)**2)``."""
    return (out.float() - x.detach().float()).pow(2).mean()
