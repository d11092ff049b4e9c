"""The tokens a code promotes: its vector pushed along the direct path to the vocabulary.

A code's vector is what its site writes when the code fires. Taken into the residual stream (for
an attention-head code, through that head's slice of the attention output projection; the other
sites already write residual-stream vectors) and read out by the unembedding after the final
norm's gain, it gives a logit contribution per vocabulary token: the direct effect of the code on
the next-token prediction (a logit-lens reading; later layers can add indirect effects, which this
leaves out). The final norm's data-dependent scale is dropped since it only rescales all logits.
"""

from __future__ import annotations

import torch
from torch import nn

from codebook.architectures import get_module
from codebook.steering import CodeRef


def _head_projection(proj: nn.Module, head: int, head_dim: int) -> torch.Tensor:
    """``[hidden, head_dim]``: how one head's output enters the residual stream."""
    cols = slice(head * head_dim, (head + 1) * head_dim)
    if isinstance(proj, nn.Linear):
        return proj.weight[:, cols]
    return proj.weight[cols, :].T  # GPT-2's Conv1D stores [in, out]


@torch.no_grad()
def residual_vector(model, ref: CodeRef) -> torch.Tensor:
    """``[hidden]``: what code ``ref`` adds to the residual stream when it fires."""
    layers = model.codebook_layers()
    key = (ref.layer, ref.site)
    if key not in layers:
        available = ", ".join(f"{i}:{s}" for i, s in sorted(layers))
        raise ValueError(f"code {ref}: there is no codebook at layer {ref.layer} site "
                         f"{ref.site!r}; codebooks are at {available}")
    layer = layers[key]
    if not (0 <= ref.head < layer.groups and 0 <= ref.code < layer.num_codes):
        raise ValueError(f"code {ref} does not exist: that site has {layer.groups} head(s) of "
                         f"{layer.num_codes} codes")
    vector = layer.codebook[ref.head, ref.code].float()
    if ref.site != "attn_heads":
        return vector
    block = get_module(model.base, model.architecture.layers)[ref.layer]
    proj = get_module(block, model.architecture.attn_out_proj)
    return _head_projection(proj, ref.head, layer.dim).float() @ vector


@torch.no_grad()
def promoted_tokens(
    model, ref: CodeRef, top: int = 10, surfaces: list[str] | None = None
) -> list[dict]:
    """The ``top`` tokens whose logits code ``ref`` raises most, with the logit contribution;
    tokens are shown by their ``surfaces`` (see :func:`codebook.text.token_surfaces`) if given."""
    residual = residual_vector(model, ref)
    norm = get_module(model.base, model.architecture.final_norm)
    if getattr(norm, "weight", None) is not None:
        residual = residual * norm.weight.float()
    unembedding = model.base.get_output_embeddings().weight.float()  # [vocab, hidden]
    logits = unembedding @ residual
    values, ids = logits.topk(min(top, logits.numel()))
    tokenizer = model.tokenizer

    def shown(i: int):
        if surfaces is not None and i < len(surfaces):
            return surfaces[i]
        return tokenizer.convert_ids_to_tokens(i) if tokenizer is not None else None

    return [
        {"id": int(i), "token": shown(int(i)), "logit": float(v)}
        for v, i in zip(values, ids, strict=True)
    ]
