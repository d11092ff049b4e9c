"""Pretraining a base from scratch (``python -m training pretrain``).

A pretraining run is a finetuning run without codebooks whose base is a freshly initialised model
of a standard Hugging Face family, so it shares everything with ``finetune`` (bf16 autocast,
exact resume, DDP, progress, metrics, plots, the model card). What it adds is the starting point:
the tokenizer (given, or learned on the run's *training* documents so validation stays unseen)
and the initial weights, written once to ``CHECKPOINTS/initial`` and reused on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from training.config import FinetuneConfig

FAMILIES = ("llama", "gpt_neox", "gpt2")
INITIAL = "initial"


@dataclasses.dataclass
class Architecture:
    """The shape of a base trained from scratch (heads of ``hidden_size / num_heads``)."""

    family: str = "llama"
    num_layers: int = 1
    hidden_size: int = 256
    num_heads: int = 8
    intermediate_size: int | None = None  # default: 3x (Llama's gated MLP) or 4x hidden
    vocab_size: int = 4096  # when the tokenizer is learned here

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"--family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("num_layers", "hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not a multiple of "
                             f"--num-heads {self.num_heads}")

    def hf_config(self, tokenizer, max_positions: int):
        """The family's ``transformers`` config, with tied input and output embeddings."""
        from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

        self.validate()
        separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        common = {"vocab_size": len(tokenizer), "tie_word_embeddings": True,
                  "bos_token_id": separator, "eos_token_id": tokenizer.eos_token_id}
        if self.family == "llama":
            return LlamaConfig(
                hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
                intermediate_size=self.intermediate_size or 3 * self.hidden_size,
                max_position_embeddings=max_positions, **common)
        if self.family == "gpt_neox":
            return GPTNeoXConfig(
                hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                intermediate_size=self.intermediate_size or 4 * self.hidden_size,
                max_position_embeddings=max_positions, **common)
        return GPT2Config(n_embd=self.hidden_size, n_layer=self.num_layers,
                          n_head=self.num_heads, n_inner=self.intermediate_size,
                          n_positions=max_positions, **common)


def initial_path(config: FinetuneConfig) -> Path:
    return config.checkpoint_path / INITIAL


def write_initial_base(config: FinetuneConfig, architecture: Architecture,
                       tokenizer_source: str | None = None) -> Path:
    """The initial model directory of ``config``'s run (made once; kept for ``--resume``)."""
    from transformers import AutoModelForCausalLM

    from codebook import hub
    from training.tokenizer import train_tokenizer
    from training.trainer import read_split

    directory = initial_path(config)
    if (directory / "config.json").is_file():
        return directory
    architecture.validate()
    if tokenizer_source:
        tokenizer = hub.load_tokenizer(hub.resolve_model_dir(tokenizer_source))
        if tokenizer is None:
            raise ValueError(f"--tokenizer {tokenizer_source} holds no tokenizer files")
    else:
        train_docs, _ = read_split(config)
        tokenizer = train_tokenizer(train_docs, architecture.vocab_size)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(
        architecture.hf_config(tokenizer, max_positions=max(512, 2 * config.block_size)))
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted start
    model.to(torch.float32).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return directory
