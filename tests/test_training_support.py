"""Helpers for the training tests: generated stories and tiny random base models.

Imported by the other ``test_training_*`` modules (pytest puts ``tests/`` on ``sys.path``); it
also checks that the generated material is what those tests assume.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Lily", "Ben", "Tom", "Mia", "Sam", "Anna"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck"]
COLORS = ["red", "blue", "green", "big", "small", "happy"]
PLACES = ["park", "garden", "house", "forest", "lake", "school"]


def generated_stories(count: int, seed: int = 0) -> list[str]:
    """Short template stories: varied enough to learn from, cheap to make."""
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        name, animal, color, place = (rng.choice(x) for x in (NAMES, ANIMALS, COLORS, PLACES))
        friend = rng.choice([n for n in NAMES if n != name])
        stories.append(
            f"Once upon a time, {name} had a {color} {animal}. The {animal} liked the {place}. "
            f"One day {name} and {friend} went to the {place} with the {animal}.\n"
            f"They played all day. {name} said, \"I love my {animal}!\" The end."
        )
    return stories


def write_stories(path: Path, count: int, seed: int = 0) -> Path:
    """A TinyStories-style file: stories separated by ``<|endoftext|>`` lines."""
    path.write_text("\n<|endoftext|>\n".join(generated_stories(count, seed)) + "\n")
    return path


def make_tokenizer(texts: list[str]):
    """A small byte-level BPE trained on ``texts``, with ``<s>`` (BOS) and ``</s>`` (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def make_tiny_base(directory: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random causal LM (``llama`` or ``gpt2``, 2 layers, width 32, 4 heads) with a
    tokenizer trained on the generated stories; returns ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(generated_stories(200))
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
    else:  # GPT-2 keeps dropout on: resuming must reproduce the dropout masks too
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def make_material(root: Path) -> dict[str, Path]:
    """A tiny Llama, a tiny GPT-2 (both with tokenizers) and a file of 240 stories."""
    return {
        "llama": make_tiny_base(root / "llama"),
        "gpt2": make_tiny_base(root / "gpt2", family="gpt2"),
        "stories": write_stories(root / "stories.txt", 240),
    }


def test_generated_stories_are_deterministic_and_varied():
    first, again = generated_stories(50, seed=3), generated_stories(50, seed=3)
    assert first == again
    assert len(set(first)) > 40
    assert generated_stories(50, seed=4) != first
