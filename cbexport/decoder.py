"""The decoder that both exporters capture: one step of a codebook model with an explicit KV cache
and steering as tensor inputs.

``forward(input_ids, attention_mask, position_ids, *past, *steering)
-> (logits, *present, *codes)``

* ``attention_mask`` ``[batch, past + seq]`` (1 = real token, 0 = padding) becomes a 4D additive
  causal mask here, with plain tensor ops, so that neither exporter meets transformers' mask
  builders (whose shape-dependent Python branches a trace would freeze).
* ``past`` is ``key, value`` per layer, ``[batch, kv_heads, past, head_dim]`` (``past`` may be 0);
  ``present`` is the same with ``past + seq`` positions.
* ``steering`` is ``bias, scale`` per codebook site, ``[groups, num_codes]``: they reach the
  codebook op exactly as :class:`codebook.steering.Steering` does in eager mode (zeros and ones
  when not steering).
* ``codes`` are the codes each site selected, ``[batch, seq, groups, k]``: which features were
  active at every token (the verification compares them too).

Attention runs with transformers' ``eager`` implementation while capturing: its maths is the same
as ``sdpa`` but it has no branch on the query length (``sdpa``'s GQA packing for one-token queries
would be frozen into a trace).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from cbexport import manifest
from codebook.layer import LayerSteering, SiteRun, running
from codebook.modeling import CodebookModel


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """What the exported signature depends on."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    sites: list[tuple[int, str, int, int]]  # (layer, site, groups, num_codes)

    @property
    def site_keys(self) -> list[tuple[int, str]]:
        return [(layer, site) for layer, site, _, _ in self.sites]

    def input_names(self) -> list[str]:
        return manifest.input_names(self.num_layers, self.site_keys)

    def output_names(self) -> list[str]:
        return manifest.output_names(self.num_layers, self.site_keys)


def check_exportable(model: CodebookModel) -> None:
    """Refuse what the decoder's single full-attention mask cannot express."""
    config = model.base.config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    if getattr(config, "attention_layers", None):  # GPT-Neo spells it differently
        layer_types = ["sliding_attention" if t == "local" else "full_attention"
                       for t in config.attention_layers]
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ValueError(f"cannot export {config.model_type}: it has {', '.join(other)} layers; "
                         "the exported decoder supports full causal attention only")


@torch.no_grad()
def decoder_shape(model: CodebookModel) -> DecoderShape:
    """Read the cache layout from one real forward step (every family names its heads
    differently; the cache tensors are the ground truth)."""
    base = model.base
    cache = DynamicCache()
    with capture_mode(model):  # so that the probe leaves no trace (usage counts, positions)
        base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=cache,
             use_cache=True)
    keys = [layer.keys for layer in cache.layers]
    sites = [(layer, site, cb.groups, cb.num_codes)
             for (layer, site), cb in model.codebook_layers().items()]
    return DecoderShape(len(keys), keys[0].shape[1], keys[0].shape[3],
                        base.config.get_text_config(decoder=True).vocab_size, sites)


def causal_mask(attention_mask: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """``[batch, 1, seq, total]`` additive mask: 0 where a query may attend, the dtype's minimum
    elsewhere (finite, so that fully masked padding rows stay NaN-free)."""
    total = attention_mask.shape[1]
    device = attention_mask.device
    query_pos = torch.arange(seq_len, device=device)[:, None] + (total - seq_len)
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None] & (attention_mask[:, None, None, :] != 0)
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


class Decoder(nn.Module):
    """Flat-tensor decoder step over a :class:`CodebookModel` (see the module docstring)."""

    def __init__(self, model: CodebookModel, shape: DecoderShape):
        super().__init__()
        self.model = model
        self.shape = shape

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *tensors: Tensor):
        n = self.shape.num_layers
        past = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)]
        steering = tensors[2 * n:]
        cache = DynamicCache(ddp_cache_data=past)
        dtype = self.model.base.get_input_embeddings().weight.dtype
        mask = causal_mask(attention_mask, input_ids.shape[1], dtype)
        layers = self.model.codebook_layers()
        runs = {layers[key]: SiteRun(steering=LayerSteering(bias=steering[2 * j],
                                                            scale=steering[2 * j + 1]),
                                     capture=[])
                for j, key in enumerate(self.shape.site_keys)}
        with running(runs):
            out = self.model.base(input_ids=input_ids, attention_mask=mask,
                                  position_ids=position_ids, cache=cache, use_cache=True)
        codes = [runs[layers[key]].capture[0] for key in self.shape.site_keys]
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present, *codes)


def example_inputs(model: CodebookModel, shape: DecoderShape, batch: int = 2, seq: int = 3,
                   past: int = 4, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs for capturing (sizes above 1, so that no dimension is specialised to 0 or 1)."""
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    dtype = model.base.get_input_embeddings().weight.dtype
    ids = torch.randint(0, shape.vocab_size, (batch, seq), generator=gen).to(device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device).expand(batch, seq)
    kv = [torch.randn(batch, shape.kv_heads, past, shape.head_dim, generator=gen).to(device, dtype)
          for _ in range(2 * shape.num_layers)]
    steer = []
    for _, _, groups, num_codes in shape.sites:
        steer += [torch.zeros(groups, num_codes, device=device),
                  torch.ones(groups, num_codes, device=device)]
    return (ids, mask, positions, *kv, *steer)


@contextlib.contextmanager
def eager_attention(model: CodebookModel) -> Iterator[None]:
    """Run the model with transformers' ``eager`` attention, the implementation the exporters
    capture. The verification's torch reference uses it too: ``sdpa`` rounds differently, and a
    top-k turns a rounding difference at a near-tie between two codes into a different code."""
    base = model.base
    attn = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(attn)


@contextlib.contextmanager
def capture_mode(model: CodebookModel) -> Iterator[None]:
    """The model as the exporters must see it: eval mode, codebooks on, no steering, capture or
    usage counting (not even a steering block around this one), eager attention. Everything is
    restored afterwards."""
    layers = model.codebook_layers().values()
    saved = [(layer.enabled, layer.track_usage) for layer in layers]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.enabled, layer.track_usage = True, False
    try:
        with eager_attention(model), running({layer: SiteRun() for layer in layers}):
            yield
    finally:
        model.train(was_training)
        for layer, state in zip(layers, saved, strict=True):
            layer.enabled, layer.track_usage = state
