"""The code activation index: which codes fired on every token of a corpus.

Running a codebook model over documents records, at every site, the ``k`` chosen code ids of each
group (attention head) for every token. :class:`CodeIndex` keeps them with the tokens, each
document's token offsets and each code's count, in one safetensors file (``code_index.safetensors``
beside a model, or in one's data directory: :mod:`codebook.analysis.userdata`; never pickle). Code
ids are
stored in the smallest unsigned type that holds them (``uint8`` for up to 256 codes), best-ranked
first, as the op returns them.

Layout of the file (tensors, then the JSON ``__metadata__["codebook_index"]``):

* ``tokens`` ``[N]`` (uint16, or int32 for large vocabularies): every document's token ids, each
  document starting with the separator token it was run with (BOS);
* ``doc_offsets`` ``[D + 1]`` int64: document ``d`` is ``tokens[doc_offsets[d]:doc_offsets[d+1]]``;
* ``codes/{layer}/{site}`` ``[N, groups, k]``: the chosen codes at that site;
* ``counts/{layer}/{site}`` ``[groups, num_codes]`` int64: on how many tokens each code fired;
* metadata: ``format``, ``version``, ``sites`` (layer, site, groups, num_codes, k), ``max_length``,
  ``truncated_documents`` and free-form provenance (``model``, ``sources``).

Codes are numbered *flat* across sites (``Layout`` maps a flat id to layer, site, head and code).
Searches read documents one at a time as ``(token ids, flat codes [tokens, codes per token])``,
from an index (:meth:`CodeIndex.documents`) or straight from a corpus (:func:`corpus_documents`,
which runs the model and keeps nothing per token, for corpora too large to index).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from codebook.analysis.userdata import replace_file
from codebook.steering import CodeRef
from codebook.text import encode_document

INDEX_NAME = "code_index.safetensors"
FORMAT = "codebook-code-index"
VERSION = 1
_META_KEY = "codebook_index"
# Positions beyond this many tokens are cut when the model does not say how far it can see.
_FALLBACK_MAX_LENGTH = 1024


@dataclasses.dataclass(frozen=True)
class Site:
    """One codebook site of a model: where it is and its shape."""

    layer: int
    site: str
    groups: int
    num_codes: int
    k: int

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.site)


class Layout:
    """Flat numbering of every code of every site: site after site, head after head."""

    def __init__(self, sites: list[Site]):
        self.sites = list(sites)
        self.offsets = {}
        total = 0
        for site in self.sites:
            self.offsets[site.key] = total
            total += site.groups * site.num_codes
        self.size = total

    @classmethod
    def of_model(cls, model) -> Layout:
        return cls([
            Site(layer, site, cb.groups, cb.num_codes, cb.k)
            for (layer, site), cb in model.codebook_layers().items()
        ])

    def site(self, key: tuple[int, str]) -> Site:
        for site in self.sites:
            if site.key == key:
                return site
        available = ", ".join(f"{s.layer}:{s.site}" for s in self.sites)
        raise ValueError(f"there is no codebook at layer {key[0]} site {key[1]!r}; codebooks are "
                         f"at {available}")

    def flat(self, ref: CodeRef) -> int:
        """The flat id of ``ref``; raises naming the problem when the code does not exist."""
        site = self.site((ref.layer, ref.site))
        if not 0 <= ref.head < site.groups:
            raise ValueError(f"code {ref}: head must be in [0, {site.groups}), got {ref.head}")
        if not 0 <= ref.code < site.num_codes:
            raise ValueError(
                f"code {ref}: code id must be in [0, {site.num_codes}), got {ref.code}"
            )
        return self.offsets[site.key] + ref.head * site.num_codes + ref.code

    def ref(self, flat: int) -> CodeRef:
        for site in self.sites:
            offset = self.offsets[site.key]
            if offset <= flat < offset + site.groups * site.num_codes:
                head, code = divmod(flat - offset, site.num_codes)
                return CodeRef(site.layer, site.site, head, code)
        raise ValueError(f"flat code id {flat} is out of range [0, {self.size})")

    def to_list(self) -> list[dict]:
        return [dataclasses.asdict(site) for site in self.sites]

    def check_model(self, model, what: str = "the index") -> None:
        """Raise if ``model``'s codebooks are not the ones ``what`` was made with."""
        mine = [dataclasses.asdict(s) for s in Layout.of_model(model).sites]
        if mine != self.to_list():
            raise ValueError(f"{what} was made with other codebooks than this model's: "
                             f"{self.to_list()} vs {mine}")


def _code_dtype(num_codes: int):
    if num_codes <= 2**8:
        return np.uint8
    if num_codes <= 2**16:
        return np.uint16
    return np.int32


@dataclasses.dataclass
class CodeIndex:
    """Chosen codes for every token of a set of documents (see the module docstring)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    codes: dict[tuple[int, str], np.ndarray]
    counts: dict[tuple[int, str], np.ndarray]
    layout: Layout
    meta: dict

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[d]:self.doc_offsets[d + 1]]

    def flat_codes(self, key: tuple[int, str]) -> np.ndarray:
        """``[N, groups, k]`` int64 flat ids of the codes chosen at ``key``."""
        site = self.layout.site(key)
        heads = np.arange(site.groups, dtype=np.int64)[None, :, None] * site.num_codes
        return self.codes[key].astype(np.int64) + heads + self.layout.offsets[key]

    def documents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each document's ``(token ids, flat codes [tokens, codes per token])``."""
        flat = np.concatenate(
            [self.flat_codes(key).reshape(self.num_tokens, -1) for key in self.codes], axis=1
        )
        for d in range(self.num_documents):
            begin, end = self.doc_offsets[d], self.doc_offsets[d + 1]
            yield self.tokens[begin:end].astype(np.int64), flat[begin:end]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"tokens": self.tokens, "doc_offsets": self.doc_offsets}
        for (layer, site), codes in self.codes.items():
            tensors[f"codes/{layer}/{site}"] = np.ascontiguousarray(codes)
            tensors[f"counts/{layer}/{site}"] = self.counts[(layer, site)]
        meta = {**self.meta, "format": FORMAT, "version": VERSION, "sites": self.layout.to_list()}
        return replace_file(path, lambda temporary: save_file(
            tensors, str(temporary), metadata={_META_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> CodeIndex:
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no code index at {path}: build one with "
                "`python -m codebook index --model MODEL --data FILES`"
            )
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="np") as handle:
                raw = (handle.metadata() or {}).get(_META_KEY)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors code index: {err}") from None
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but not a code index (no metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path} is not a version-{VERSION} code index "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        layout = Layout([Site(**s) for s in meta.pop("sites")])
        codes = {s.key: tensors[f"codes/{s.layer}/{s.site}"] for s in layout.sites}
        counts = {s.key: tensors[f"counts/{s.layer}/{s.site}"] for s in layout.sites}
        return cls(tensors["tokens"], tensors["doc_offsets"], codes, counts, layout, meta)


def default_max_length(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return _FALLBACK_MAX_LENGTH


def encode_documents(
    model, documents: list[str], max_length: int | None = None, max_tokens: int | None = None
) -> tuple[list[list[int]], int]:
    """Token ids of each document (separator first), cut to ``max_length``, and how many were
    cut. With ``max_tokens``, documents are taken in order while they fit in that many tokens."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: analysis needs one to read text")
    if not documents:
        raise ValueError("no documents to run the model on: the corpus is empty")
    max_length = max_length or default_max_length(model)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded, truncated, total = [], 0, 0
    for text in documents:
        ids = encode_document(model.tokenizer, text)
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        if max_tokens is not None and total + len(ids) > max_tokens:
            break
        encoded.append(ids)
        total += len(ids)
    if not encoded:
        raise ValueError(f"max_tokens={max_tokens} is smaller than the first document "
                         f"({len(encode_document(model.tokenizer, documents[0]))} tokens)")
    return encoded, truncated


def topic_stories_first(documents: list[str], patterns: dict[str, str],
                        per_topic: int) -> tuple[list[str], dict[str, int]]:
    """``documents`` reordered so that up to ``per_topic`` documents matching each regex of
    ``patterns`` (name → regex) come first, taken in corpus order one topic after another, then
    all the others in corpus order; and how many were put first for each topic. An index cut to
    a small ``max_tokens`` then still holds stories about those topics, so searches for them
    find something."""
    from codebook.analysis.regex import compile_regex

    if per_topic < 0:
        raise ValueError(f"per_topic must be at least 0, got {per_topic}")
    regexes = {name: compile_regex(pattern) for name, pattern in patterns.items()}
    chosen: list[int] = []
    taken = dict.fromkeys(regexes, 0)
    for name, regex in regexes.items():
        for d, text in enumerate(documents):
            if taken[name] == per_topic:
                break
            if d not in chosen and regex.search(text):
                chosen.append(d)
                taken[name] += 1
    first = set(chosen)
    return [documents[d] for d in chosen] + [t for d, t in enumerate(documents)
                                             if d not in first], taken


@torch.no_grad()
def run_codes(
    model, encoded: list[list[int]], batch_size: int = 16, progress: bool = True,
    desc: str = "running codes",
) -> Iterator[tuple[list[int], dict[tuple[int, str], np.ndarray]]]:
    """Yield ``(document numbers, {site: codes [batch, seq, groups, k]})`` batch by batch.

    Documents are batched by length (right-padded, masked), so little compute goes to padding;
    a document's codes are its first ``len(encoded[d])`` positions. Causal attention keeps padding
    from changing the codes of real tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(encoded)), key=lambda d: len(encoded[d]))
    device = model.device
    bar = tqdm(total=sum(map(len, encoded)), unit="tok", desc=desc, disable=not progress)
    for start in range(0, len(order), batch_size):
        docs = order[start:start + batch_size]
        width = max(len(encoded[d]) for d in docs)
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        mask = torch.zeros(len(docs), width, dtype=torch.long)
        for row, d in enumerate(docs):
            ids[row, :len(encoded[d])] = torch.tensor(encoded[d])
            mask[row, :len(encoded[d])] = 1
        with model.capture_codes() as captured:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        yield docs, {key: calls[0].cpu().numpy() for key, calls in captured.items()}
        bar.update(int(mask.sum()))
    bar.close()


def build_index(
    model, documents: list[str], batch_size: int = 16, max_length: int | None = None,
    max_tokens: int | None = None, progress: bool = True, meta: dict | None = None,
) -> CodeIndex:
    """Run ``model`` over ``documents`` and record every token's codes (see :class:`CodeIndex`).
    ``max_tokens`` bounds the index's size by keeping only the first documents that fit."""
    layout = Layout.of_model(model)
    encoded, truncated = encode_documents(model, documents, max_length, max_tokens)
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vocab = model.config.vocab_size
    tokens = np.concatenate([np.asarray(ids) for ids in encoded]).astype(
        np.uint16 if vocab <= 2**16 else np.int32
    )
    codes = {
        s.key: np.zeros((len(tokens), s.groups, s.k), dtype=_code_dtype(s.num_codes))
        for s in layout.sites
    }
    for docs, batch in run_codes(model, encoded, batch_size, progress, desc="indexing"):
        for row, d in enumerate(docs):
            begin, end = doc_offsets[d], doc_offsets[d + 1]
            for key, ids in batch.items():
                codes[key][begin:end] = ids[row, :end - begin]
    counts = {}
    for site in layout.sites:
        flat = codes[site.key].astype(np.int64) + (
            np.arange(site.groups)[None, :, None] * site.num_codes
        )
        counts[site.key] = np.bincount(
            flat.reshape(-1), minlength=site.groups * site.num_codes
        ).reshape(site.groups, site.num_codes).astype(np.int64)
    info = {
        **(meta or {}),
        "num_documents": len(encoded),
        "num_tokens": int(len(tokens)),
        "max_length": max_length or default_max_length(model),
        "truncated_documents": truncated,
    }
    return CodeIndex(tokens, doc_offsets, codes, counts, layout, info)


def corpus_documents(
    model, documents: list[str], batch_size: int = 16, max_length: int | None = None,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each document's ``(token ids, flat codes [tokens, codes per token])``, computed by running
    ``model`` batch by batch (documents come in batch order, not corpus order)."""
    layout = Layout.of_model(model)
    encoded, _ = encode_documents(model, documents, max_length)
    heads = {
        s.key: np.arange(s.groups, dtype=np.int64)[None, :, None] * s.num_codes
        + layout.offsets[s.key]
        for s in layout.sites
    }
    for docs, batch in run_codes(model, encoded, batch_size, progress, desc="reading codes"):
        for row, d in enumerate(docs):
            length = len(encoded[d])
            parts = [(ids[row, :length] + heads[key]).reshape(length, -1)
                     for key, ids in batch.items()]
            flat = np.concatenate(parts, axis=1)
            yield np.asarray(encoded[d], dtype=np.int64), flat
