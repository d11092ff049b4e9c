"""Text helpers shared by training and the analysis tools: documents, prompts, token surfaces.

* Documents are read from text files the way the training data is (stories separated by
  ``<|endoftext|>`` lines, else by blank lines, else one per line; exact duplicates dropped), so an
  index built from a model's training files sees the same documents its training did.
* Every document and prompt starts with the tokenizer's document separator (BOS, or EOS for
  GPT-2-style tokenizers that have no BOS), as in training; the empty prompt is that token alone.
* A token's *surface* is the text it adds when appended to a decoded sequence (leading space
  included). Joining the surfaces of a document's tokens gives its text with every token's
  character span known, which is what regex search and context display need.

Regexes over those texts are :mod:`codebook.analysis.regex`'s.
"""

from __future__ import annotations

import re
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
FORMATS = ("auto", "endoftext", "blank-lines", "lines")

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def split_text(text: str, fmt: str = "auto") -> list[str]:
    """Split one file's text into stripped, non-empty documents (``fmt``: one of ``FORMATS``;
    ``auto`` picks the first separator the text uses)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose from {FORMATS}")
    if fmt == "auto":
        if ENDOFTEXT in text:
            fmt = "endoftext"
        elif _BLANK_LINE.search(text.strip()):
            fmt = "blank-lines"
        else:
            fmt = "lines"
    if fmt == "endoftext":
        parts = text.split(ENDOFTEXT)
    elif fmt == "blank-lines":
        parts = _BLANK_LINE.split(text)
    else:
        parts = text.splitlines()
    return [part.strip() for part in parts if part.strip()]


def read_documents(paths: list[str | Path], fmt: str = "auto") -> list[str]:
    """Documents of text files and folders of ``.txt`` files, exact duplicates (after whitespace
    normalisation) removed, first occurrence kept. Raises naming the file that is missing,
    unreadable or empty of text."""
    if not paths:
        raise ValueError("no data given: pass one or more text files (--data FILE)")
    documents = [doc for source in paths for doc in source_documents(source, fmt)]
    unique = deduplicate(documents)
    if not unique:
        raise ValueError(f"the data {[str(p) for p in paths]} holds no text")
    return unique


def source_documents(source: str | Path, fmt: str = "auto") -> list[str]:
    """Documents of one text file or folder of ``.txt`` files, in order."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {source}")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"data directory {source} holds no .txt files")
    documents: list[str] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {file} is not UTF-8 text: {err}") from None
        documents += split_text(text, fmt)
    return documents


def normalized(text: str) -> str:
    """``text`` with every run of whitespace a single space: what duplicates are compared by."""
    return " ".join(text.split())


def deduplicate(documents: list[str]) -> list[str]:
    """``documents`` without exact duplicates (after whitespace normalisation), first kept."""
    seen: set[str] = set()
    unique = []
    for doc in documents:
        key = normalized(doc)
        if key not in seen:
            seen.add(key)
            unique.append(doc)
    return unique


def separator_id(tokenizer) -> int:
    """The token that starts every document: BOS, or EOS for tokenizers without a BOS."""
    token_id = tokenizer.bos_token_id
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    return int(token_id)


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end a story in generation: EOS and the document separator (models trained on
    separator-joined streams, like llama2.c's, end a story by starting the next one)."""
    ids = {separator_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def encode_document(tokenizer, text: str) -> list[int]:
    """``[separator] + ids`` of ``text`` (the tokenizer adds no special tokens of its own)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return [separator_id(tokenizer), *ids]


def token_surfaces(tokenizer) -> list[str]:
    """The surface of every token id (special tokens: ``""``).

    Decoding a token alone loses what decoders strip at the start of a text (SentencePiece's
    leading space), so each surface is ``decode([anchor, id])`` minus ``decode([anchor])``.
    """
    vocab_size = len(tokenizer)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode(
        [[anchor, i] for i in range(vocab_size)], clean_up_tokenization_spaces=False
    )
    special = set(tokenizer.all_special_ids)
    surfaces = []
    for i, text in enumerate(pairs):
        if i in special:
            surfaces.append("")
        elif text.startswith(prefix):
            surfaces.append(text[len(prefix):])
        else:  # a decoder that rewrites across tokens: fall back to the token alone
            surfaces.append(tokenizer.decode([i], clean_up_tokenization_spaces=False))
    return surfaces


def spans(token_ids, surfaces: list[str]) -> tuple[str, list[int]]:
    """The text of ``token_ids`` and the start offset of each token in it (plus the end)."""
    starts = [0]
    parts = []
    for token in token_ids:
        piece = surfaces[int(token)] if 0 <= int(token) < len(surfaces) else ""
        parts.append(piece)
        starts.append(starts[-1] + len(piece))
    return "".join(parts), starts


# Pieces of a regex once the regex package has unrolled its counted repeats ("x{n}" becomes n
# copies of x) when it compiles, at a few hundred bytes each: "(?:(?:(?:a{100}){100}){100}){100}"
# would take tens of gigabytes. Ten thousand is far more than a search of stories needs.
