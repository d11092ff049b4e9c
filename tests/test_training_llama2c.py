"""Finetuning from a llama2.c checkpoint: the imported stories260K must be the real model."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from training.models import load_base

KNOWN_SAMPLE = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
                "in the park. One day, she saw a big, red ball.")


def test_stories260k_reproduces_its_known_greedy_sample(shared_dir):
    model, tokenizer = load_base(f"llama2c:{shared_dir}/models/stories260K/stories260K.bin")
    bos = torch.tensor([[tokenizer.bos_token_id]])
    with torch.no_grad():
        ids = model.generate(bos, max_new_tokens=48, do_sample=False)[0, 1:]
    assert tokenizer.decode(ids).startswith(KNOWN_SAMPLE)


def test_the_saved_tokenizer_encodes_like_llama2c(shared_dir, tmp_path):
    # The default model ships this tokenizer as tokenizer.json: reloading it through
    # AutoTokenizer must give the ids the model was trained on.
    _, tokenizer = load_base(f"llama2c:{shared_dir}/models/stories260K/stories260K.bin")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ("Lily said, \u201cLook, a caf\u00e9!\u201d\nThe dog ran  fast. \U0001F600 <s> end")
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.bos_token_id == 1 and reloaded.decode(reloaded.encode(text)) == text
