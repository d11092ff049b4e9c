"""Everything that varies between the supported Hugging Face causal-LM families, one record each.

We never copy a model's forward pass: each site is reached with a hook on a real module, so a new
transformers release only breaks us if it renames a module, and then only this table changes. The
same record names the final norm that promoted tokens read through
(:mod:`codebook.analysis.promote`) and,
for the families the paper's original library supported, how that library names them
(:mod:`codebook.original`).
"""

from __future__ import annotations

import dataclasses

from torch import nn


@dataclasses.dataclass(frozen=True)
class OriginalNames:
    """How the paper's original library (``codebook-features`` 0.1.2) names a family."""

    model_class: str  # its model class: the first entry of ``architectures`` in its config.json
    # The modules it wraps, from each layer (its ``.module_layer`` segments dropped): the attention
    # module holds the ``attn`` / ``attn_preproj`` codebook_layer, the MLP the ``mlp`` one.
    attention: str
    mlp: str = "mlp"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One family: module paths (dotted, from the causal-LM model / from each layer) and names."""

    name: str
    layers: str  # the ModuleList of transformer blocks
    attn_out_proj: str  # the attention output projection; its input is the per-head outputs
    mlp: str
    num_heads_attr: str
    final_norm: str  # the norm before the unembedding, from the causal-LM model
    original: OriginalNames | None = None  # None: the original library did not support it


ARCHITECTURES = {
    "gpt2": Architecture(
        "GPT-2", "transformer.h", "attn.c_proj", "mlp", "n_head", "transformer.ln_f",
        OriginalNames("GPT2CodebookModel", "attn"),
    ),
    "gpt_neo": Architecture(
        "GPT-Neo", "transformer.h", "attn.attention.out_proj", "mlp", "num_heads",
        "transformer.ln_f", OriginalNames("GPTNeoCodebookModel", "attn.attention"),
    ),
    "gpt_neox": Architecture(
        "GPT-NeoX", "gpt_neox.layers", "attention.dense", "mlp", "num_attention_heads",
        "gpt_neox.final_layer_norm", OriginalNames("GPTNeoXCodebookModel", "attention"),
    ),
    "llama": Architecture(
        "Llama", "model.layers", "self_attn.o_proj", "mlp", "num_attention_heads", "model.norm"
    ),
    "mistral": Architecture(
        "Mistral", "model.layers", "self_attn.o_proj", "mlp", "num_attention_heads", "model.norm"
    ),
    "qwen2": Architecture(
        "Qwen2", "model.layers", "self_attn.o_proj", "mlp", "num_attention_heads", "model.norm"
    ),
}


def supported_model_types() -> str:
    return ", ".join(f"{a.name} ({t})" for t, a in ARCHITECTURES.items())


def architecture_for(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r}: codebooks can be attached to "
            f"{supported_model_types()}"
        ) from None


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def num_heads(config, arch: Architecture) -> int:
    return int(getattr(config, arch.num_heads_attr))


def in_features(module: nn.Module) -> int:
    """Input width of a projection: ``nn.Linear`` or GPT-2's transposed ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]  # transformers.pytorch_utils.Conv1D stores [in, out]


def out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[1]
