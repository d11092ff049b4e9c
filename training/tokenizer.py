"""A word-level story tokenizer: byte-level BPE learned on the training stories.

The paper's TinyStories models read GPT-2 tokens, where a topic word such as " dragon" is one
token, so forcing a topic's codes on can produce the whole word at once. A BPE of a few thousand
pieces learned on the stories themselves gets the same property at a fraction of GPT-2's 50k
vocabulary (which would dwarf a small model's other weights). Words named in ``required_words``
are made single tokens even if the learned merges do not reach them, by appending the merges
that spell them (lowest priority, so a word that holds none of their pieces side by side
encodes exactly as learned).

The only special token is ``<|endoftext|>`` (id 0), GPT-2's document separator, which
:mod:`training.data` puts before every document.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from codebook.text import ENDOFTEXT

# The paper's TinyStories topics (princess as its royalty words) and everyday story nouns:
# what people will try to steer toward first.
STORY_WORDS = (
    "dragon", "slide", "friend", "flower", "fire", "baby", "princess", "prince", "crown",
    "king", "castle", "rain", "fish", "cake", "snow", "boat", "ball", "dog", "cat", "tree",
    "park", "bird", "bear", "frog", "book", "car", "sun", "toy", "school", "garden",
)


def _single_token_merges(backend: Tokenizer, words: list[str]) -> tuple[dict, list]:
    """The vocabulary and merges of ``backend``'s BPE, extended so each of ``words`` (as it
    appears mid-sentence, after a space) encodes to one token."""
    state = json.loads(backend.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in state["model"]["merges"]]
    for word in words:
        current = Tokenizer.from_str(json.dumps(state))
        pieces = current.encode(" " + word, add_special_tokens=False).tokens
        # Merge left to right: each new merge fires only after every learned one.
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
            merges.append((left, right))
            pieces = [merged, *pieces[2:]]
        state["model"]["merges"] = [list(m) for m in merges]
    return vocab, merges


def train_tokenizer(documents: list[str], vocab_size: int,
                    required_words: tuple[str, ...] = STORY_WORDS) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` pieces (plus any needed to make ``required_words``
    single tokens) learned on ``documents``."""
    if vocab_size < 257 + 1:
        raise ValueError(f"--vocab-size must exceed the 256 byte pieces and <|endoftext|>, "
                         f"got {vocab_size}")
    if not documents:
        raise ValueError("no documents to learn the tokenizer on")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(documents, trainer=trainer)
    missing = [w for w in required_words
               if len(backend.encode(" " + w, add_special_tokens=False).ids) > 1]
    if missing:
        vocab, merges = _single_token_merges(backend, missing)
        rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        rebuilt.pre_tokenizer = backend.pre_tokenizer
        rebuilt.decoder = backend.decoder
        rebuilt.add_special_tokens([ENDOFTEXT])
        backend = rebuilt
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
        unk_token=None, clean_up_tokenization_spaces=False, model_max_length=1_000_000,
    )


def split_words(tokenizer, words: tuple[str, ...]) -> dict[str, int]:
    """How many tokens each of ``words`` takes mid-sentence (1 is what steering wants)."""
    return {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
