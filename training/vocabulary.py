"""Widening a base model's vocabulary: more BPE merges, learned on the training text.

tok512, the vocabulary of the default base, spells most words in letters (" dragon" is five
pieces), and topics whose word is one piece steer far better than the others (see the default
model's card). This continues the base tokenizer's BPE on the training documents until the
vocabulary holds ``vocab_size`` pieces, merging only inside words (a run of letters with its
leading space, which is where the base's own merges act), and gives each new piece the mean
embedding (and output row) of the pieces it stands for, so that the model starts from what it
knew. ``python -m training widen-vocab`` writes the result as a Hugging Face model directory for
``python -m training finetune --base DIR``.

Only tokenizers like llama2.c's qualify: a ``tokenizers`` BPE model without a pre-tokenizer,
whose pieces spell spaces as " " (byte-level BPEs such as GPT-2's already hold whole words).
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

WORD = re.compile(r" ?[A-Za-z]+")


def _backend_spec(tokenizer) -> dict:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("pre_tokenizer") is not None:
        raise ValueError(
            "widening the vocabulary needs a BPE tokenizer without a pre-tokenizer (like "
            f"llama2.c's); this one is {spec['model']['type']} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}"
        )
    return spec


def learn_merges(tokenizer, documents: list[str], new_pieces: int) -> list[tuple[str, str]]:
    """The next merges of ``tokenizer``'s BPE, most frequent pair first, counted over the words
    of ``documents``, until they make ``new_pieces`` pieces it lacks (fewer when no pair is left
    that occurs twice)."""
    spec = _backend_spec(tokenizer)
    model = tokenizer.backend_tokenizer.model
    normalizer = tokenizer.backend_tokenizer.normalizer  # e.g. llama2.c's leading space
    if normalizer is not None:
        documents = [normalizer.normalize_str(doc) for doc in documents]
    counts = collections.Counter(w for doc in documents for w in WORD.findall(doc))
    words = {w: [t.value for t in model.tokenize(w)] for w in counts}
    pairs: collections.Counter = collections.Counter()
    holders: dict = collections.defaultdict(set)  # pair -> words holding it
    for word, pieces in words.items():
        for pair in itertools.pairwise(pieces):
            pairs[pair] += counts[word]
            holders[pair].add(word)
    known = set(spec["model"]["vocab"])
    merges: list[tuple[str, str]] = []
    made = 0
    while made < new_pieces and pairs:
        (left, right), count = pairs.most_common(1)[0]
        if count < 2:
            break
        merges.append((left, right))
        if left + right not in known:
            known.add(left + right)
            made += 1
        for word in holders.pop((left, right)):
            old, n = words[word], counts[word]
            for pair in itertools.pairwise(old):
                pairs[pair] -= n
                holders[pair].discard(word)
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == (left, right):
                    new.append(left + right)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            words[word] = new
            for pair in itertools.pairwise(new):
                pairs[pair] += n
                holders[pair].add(word)
        del pairs[(left, right)]
    return merges


def widen_vocabulary(model, tokenizer, documents: list[str], vocab_size: int):
    """``(model, tokenizer)`` with BPE merges learned on ``documents`` added until the vocabulary
    holds ``vocab_size`` pieces. Texts of the old pieces encode as before wherever no new merge
    applies; a new piece's input embedding and output row are the means of its old pieces'."""
    spec = _backend_spec(tokenizer)
    vocab = spec["model"]["vocab"]
    if len(tokenizer) != model.config.vocab_size or len(vocab) != len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model "
                         f"{model.config.vocab_size}: widen only a matching pair")
    if vocab_size <= len(vocab):
        raise ValueError(f"--vocab-size must exceed the base's {len(vocab)} pieces, got "
                         f"{vocab_size}")
    if not any(WORD.search(doc) for doc in documents):
        raise ValueError("the documents hold no words to learn merges from")
    merges = learn_merges(tokenizer, documents, vocab_size - len(vocab))
    old_model = tokenizer.backend_tokenizer.model
    parts = {}
    for left, right in merges:
        piece = left + right
        if piece not in vocab:
            vocab[piece] = len(vocab)
            parts[piece] = [old_model.token_to_id(t.value) for t in old_model.tokenize(piece)]
    spec["model"]["merges"] = [list(m) for m in spec["model"]["merges"]] + [list(m) for m in merges]

    old_size = model.config.vocab_size
    model.resize_token_embeddings(len(vocab), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    with torch.no_grad():
        for table in tables:
            for new_id, piece in enumerate(parts, start=old_size):
                table[new_id] = table[parts[piece]].mean(0)

    with tempfile.TemporaryDirectory() as tmp:  # keeps the tokenizer's settings and specials
        tokenizer.save_pretrained(tmp)
        Tokenizer.from_str(json.dumps(spec)).save(str(Path(tmp) / "tokenizer.json"))
        widened = type(tokenizer).from_pretrained(tmp)
    return model, widened
