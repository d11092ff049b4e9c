"""Tiny random Hugging Face causal LMs of every supported family, for fast tests (no downloads)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128,
        bos_token_id=0, eos_token_id=1,
    ),
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
        attention_types=[[["global", "local"], 1]], window_size=16, bos_token_id=0,
        eos_token_id=1,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
    ),
    "llama": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
        eos_token_id=1,
    ),
    "mistral": lambda: transformers.MistralConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
        eos_token_id=1,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
        eos_token_id=1,
    ),
}

FAMILIES = tuple(CONFIGS)


def tiny_base(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
