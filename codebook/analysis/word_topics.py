"""Topic search without a corpus: per-word context statistics shipped with a model.

Topic search by context precision (:mod:`codebook.analysis.search`) needs, for a topic word, how
often
each code fires in a story *after* the word's first mention. Computing that means running the
model over a corpus, and an index of a corpus large enough to hold 20 stories about any everyday
word is tens of megabytes. This file keeps only what the statistic needs, for every word of at
least ``min_documents`` stories of the model's training text:

* per code, how often it fired anywhere (``counts``, one vector for all words);
* per word, the stories that mention it, the tokens after its first mentions, and its ``top``
  codes by context precision with their in-context activations (``hits``).

From these, :meth:`WordTopics.result` ranks codes for a word exactly as
``TopicCounter.result(..., "context")`` would over the same corpus (up to the stored ``top``
codes), in milliseconds. For a regex matching several words (``\\b(?:prince|king)``, or
``friend`` in "friend", "friends", "friendly") each code counts with the word it is most precise
for, and the result's document and context counts are the words' sums (a story naming two of
them counts twice).

Stored as ``word_topics.safetensors`` (tensors plus JSON metadata; no pickle) beside a model, or
for a Hub or the packaged model in the user's data directory (:mod:`codebook.analysis.userdata`).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from codebook.analysis.index import Layout, corpus_documents
from codebook.analysis.regex import compile_regex
from codebook.analysis.search import CodeScore, TopicResult
from codebook.text import spans, token_surfaces

WORD_TOPICS_NAME = "word_topics.safetensors"
FORMAT = "codebook-word-topics"
VERSION = 1
_META_KEY = "codebook_word_topics"
_WORD = re.compile(r"[a-z]+")


def document_words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def first_mentions(text: str, starts: list[int], vocabulary: dict[str, int]) -> dict[int, int]:
    """Word id → the token holding the word's first mention in ``text`` (whose token offsets are
    ``starts``), for the words of ``vocabulary``."""
    first: dict[int, int] = {}
    for match in _WORD.finditer(text.lower()):
        word = vocabulary.get(match.group(0))
        if word is not None and word not in first:
            first[word] = bisect.bisect_right(starts, match.start()) - 1
    return first


class WordTopics:
    """Context statistics of every frequent word (see the module docstring)."""

    def __init__(self, words: list[str], counts: np.ndarray, documents: np.ndarray,
                 context_tokens: np.ndarray, codes: np.ndarray, hits: np.ndarray,
                 layout: Layout, info: dict):
        self.words = list(words)
        self.word_ids = {w: i for i, w in enumerate(self.words)}
        self.counts = counts  # [codes] int64
        self.documents = documents  # [words] int64
        self.context_tokens = context_tokens  # [words] int64
        self.codes = codes  # [words, top] int32 flat ids, best first
        self.hits = hits  # [words, top] int64
        self.layout = layout
        self.info = info

    @property
    def num_documents(self) -> int:
        return int(self.info["num_documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.info["num_tokens"])

    @classmethod
    def build(cls, model, documents: list[str], min_documents: int = 20, top: int = 128,
              prior: float = 10.0, batch_size: int = 16, max_length: int | None = None,
              progress: bool = True, meta: dict | None = None) -> WordTopics:
        """Run ``model`` over ``documents`` and keep the statistics of every word found in at
        least ``min_documents`` of them."""
        if min_documents < 1 or top < 1:
            raise ValueError("min_documents and top must be at least 1")
        frequency = Counter(w for text in documents for w in document_words(text))
        words = sorted(w for w, n in frequency.items() if n >= min_documents)
        if not words:
            raise ValueError(f"no word appears in {min_documents} of the {len(documents)} "
                             "documents")
        vocabulary = {w: i for i, w in enumerate(words)}
        layout = Layout.of_model(model)
        surfaces = token_surfaces(model.tokenizer)
        hits = np.zeros((len(words), layout.size), dtype=np.int64)
        counts = np.zeros(layout.size, dtype=np.int64)
        context = np.zeros(len(words), dtype=np.int64)
        present = np.zeros(len(words), dtype=np.int64)
        num_documents = num_tokens = 0
        for tokens, flat in corpus_documents(model, documents, batch_size, max_length, progress):
            counts += np.bincount(flat.reshape(-1), minlength=layout.size)
            num_documents += 1
            num_tokens += len(tokens)
            text, starts = spans(tokens, surfaces)
            first = first_mentions(text, starts, vocabulary)
            if not first:
                continue
            ids = np.fromiter(first, dtype=np.int64)
            positions = np.fromiter(first.values(), dtype=np.int64)
            order = np.argsort(positions, kind="stable")
            ids, positions = ids[order], positions[order]
            # Token t follows the first mentions of the words sorted before segment[t]; each
            # segment's code counts, summed from the last segment back, give every word its
            # in-context counts. Only the codes this document used are counted.
            used, local = np.unique(flat, return_inverse=True)
            segment = np.searchsorted(positions, np.arange(len(tokens)), side="left")
            cells = np.repeat(segment, flat.shape[1]) * len(used) + local.reshape(-1)
            per_segment = np.bincount(cells, minlength=(len(ids) + 1) * len(used)).reshape(
                len(ids) + 1, len(used))
            after = per_segment[::-1].cumsum(0)[::-1][1:]
            hits[np.ix_(ids, used)] += after  # ids and used hold no repeats
            context[ids] += len(tokens) - positions - 1
            present[ids] += 1
        # Keep the words found in enough documents as the model read them (cut to its context
        # length), which can be fewer than in the raw text.
        kept = np.nonzero(present >= min_documents)[0]
        words = [words[i] for i in kept]
        hits, context, present = hits[kept], context[kept], present[kept]
        chance = context / max(num_tokens, 1)
        precision = (hits + prior * chance[:, None]) / (counts[None, :] + prior)
        precision[:, counts == 0] = -1.0  # a code that never fired says nothing
        keep = min(top, layout.size)
        best = np.argpartition(-precision, keep - 1, axis=1)[:, :keep]
        best = np.take_along_axis(best, np.argsort(
            -np.take_along_axis(precision, best, axis=1), axis=1, kind="stable"), axis=1)
        info = {**(meta or {}), "num_documents": num_documents, "num_tokens": num_tokens,
                "min_documents": min_documents, "prior": prior}
        return cls(words, counts, present, context, best.astype(np.int32),
                   np.take_along_axis(hits, best, axis=1), layout, info)

    # -- queries ----------------------------------------------------------------------------

    def matching_words(self, pattern: str, ignore_case: bool = True) -> list[str]:
        regex = compile_regex(pattern, ignore_case)
        return [w for w in self.words if regex.search(w)]

    def result(self, pattern: str, top: int = 20, ignore_case: bool = True) -> TopicResult:
        """Codes ranked by context precision for the words ``pattern`` matches (for several
        words, each code by its best word's precision)."""
        words = self.matching_words(pattern, ignore_case)
        if not words:
            raise ValueError(
                f"no word of at least {self.info['min_documents']} of the model's "
                f"{self.num_documents:,} training stories matches {pattern!r}; search a corpus "
                "with --data instead")
        ids = [self.word_ids[w] for w in words]
        best: dict[int, CodeScore] = {}
        for i in ids:
            for score in self._word_scores(i):
                flat = self.layout.flat(score.ref)
                if flat not in best or score.score > best[flat].score:
                    best[flat] = score
        scored = sorted(best.values(), key=lambda s: (-s.score, s.ref))
        context_tokens = int(self.context_tokens[ids].sum())
        return TopicResult(pattern, "context", scored[:top], self.num_documents,
                           int(self.documents[ids].sum()), 0, context_tokens,
                           context_tokens / self.num_tokens)

    def _word_scores(self, word: int) -> list[CodeScore]:
        """The stored codes of one word, scored as ``TopicCounter.result(..., "context")``."""
        prior = float(self.info["prior"])
        context_tokens = int(self.context_tokens[word])
        chance = context_tokens / self.num_tokens
        scores = []
        for code, hits in zip(self.codes[word].tolist(), self.hits[word].tolist(), strict=True):
            count = int(self.counts[code])
            if count == 0:  # never fired: says nothing of the topic
                continue
            precision = (hits + prior * chance) / (count + prior)
            scores.append(CodeScore(self.layout.ref(code), precision,
                                    hits / max(context_tokens, 1), hits, count, precision))
        return scores

    # -- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` (renamed into place: a link there is replaced)."""
        from codebook.analysis.userdata import replace_file

        meta = {"format": FORMAT, "version": VERSION, "words": self.words,
                "sites": self.layout.to_list(), **self.info}
        tensors = {"counts": self.counts.astype(np.int64), "documents": self.documents,
                   "context_tokens": self.context_tokens, "codes": self.codes,
                   "hits": self.hits.astype(np.int32)}
        return replace_file(path, lambda tmp: save_file(
            tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> WordTopics:
        from codebook.analysis.index import Site

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no word topic statistics at {path}")
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a word topics file ({FORMAT})")
            if meta.get("version") != VERSION:
                raise ValueError(f"{path} has version {meta.get('version')}; this code reads "
                                 f"version {VERSION}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        layout = Layout([Site(**s) for s in meta.pop("sites")])
        words = meta.pop("words")
        for key in ("format", "version"):
            meta.pop(key)
        return cls(words, tensors["counts"], tensors["documents"], tensors["context_tokens"],
                   tensors["codes"], tensors["hits"].astype(np.int64), layout, meta)
