"""Loading the models training starts from and evaluation reads.

A *base* is a Hugging Face causal LM with its tokenizer: a Hub repo id, a local directory, or a
llama2.c checkpoint (``llama2c:PATH/model.bin[:PATH/tok.bin]``). An *evaluated* model is the same,
or a codebook model (``default``, a directory or a Hub id holding ``codebook_config.json``).
"""

from __future__ import annotations

import torch
from torch import nn

from codebook import CodebookModel, hub
from codebook.architectures import architecture_for
from codebook.configuration import CONFIG_NAME
from training.llama2c import SPEC_PREFIX, load_llama2c


def load_base(spec: str, token: str | None = None):
    """``(model, tokenizer)``: a float32 causal LM in eval mode and its tokenizer.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the problem when the model cannot be
    found, has no tokenizer, or is of a family codebooks cannot be attached to.
    """
    if spec.startswith(SPEC_PREFIX):
        model, tokenizer = load_llama2c(spec)
    else:
        from transformers import AutoModelForCausalLM

        directory = hub.resolve_model_dir(spec, token=token)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{spec} is not a Hugging Face model: it has no config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the base model {spec}: {err}") from None
        tokenizer = hub.load_tokenizer(directory)
        if tokenizer is None:
            raise ValueError(f"the base model {spec} has no tokenizer files beside it")
    architecture_for(model.config)  # fails early, listing the supported families
    return model.eval(), tokenizer


def reinitialized(model: nn.Module) -> nn.Module:
    """A freshly initialised model of the same architecture (to pretrain a base from scratch)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model.config).to(torch.float32).eval()


def load_model(spec: str, token: str | None = None):
    """``(model, tokenizer)`` for evaluation: a :class:`CodebookModel` when ``spec`` is a codebook
    model, otherwise the plain base."""
    if not spec.startswith(SPEC_PREFIX):
        directory = hub.resolve_model_dir(spec, token=token)
        if (directory / CONFIG_NAME).is_file():
            model = CodebookModel.from_pretrained(directory)
            if model.tokenizer is None:
                raise ValueError(f"the codebook model {spec} has no tokenizer files")
            return model, model.tokenizer
        spec = str(directory)
    return load_base(spec, token=token)
