"""Finding codes from text: by regex or token over an index, and by topic over documents.

**Code search** (the paper's): a regex marks target tokens in the indexed text (the tokens
overlapping its first capture group, or the whole match when it has none); every code is scored by

* precision: the share of the code's activations that fall on target tokens;
* recall: the share of target tokens on which the code fires;

and codes are ranked by F1, the harmonic mean of the two.

**Topic search**: a regex (a word, say ``dragon``) marks the documents about a topic, those whose
text matches. Three statistics rank codes:

* ``context`` (the default): context precision, the share of a code's activations that fall in a
  topic document *after* the topic's first mention, shrunk toward chance (the share of all tokens
  that are such context) by ``prior`` pseudo-activations, so that a code seen twice, both times in
  context, does not outrank one seen a thousand times, 60% of them in context. Recall is the share
  of context tokens on which the code fires. A story that has named a dragon goes on being about
  it, so codes that fire there carry "we are in a dragon story", and forcing them is what moves
  generation to the topic. In a screen on the default model (24 steering settings per topic,
  scored by the log-probability of the topic word after story prefixes) context precision gave
  the largest gain for 5 of the paper's 7 topics, against lead-in enrichment, the share of
  activations on the word's own tokens and the in-context rate minus the rate elsewhere.
* ``lead-in``: enrichment at the token just before each match, where the model predicts the
  first token of the topic word: the rate at which a code fires at lead-ins minus the rate at
  which it fires everywhere else. For a sum-combined codebook the mean output of a head at
  lead-ins minus its mean elsewhere is exactly the sum over codes of enrichment times code
  vector. Precision and recall are the share of the code's activations at lead-ins and the share
  of lead-ins where it fires.
* ``document``: document-level concentration. Precision is the share of the code's activations
  inside topic documents, shrunk toward chance like ``context``; recall is the share of topic
  documents in which the code fires; codes are ranked by F1. With a few hundred codes per head
  most codes fire somewhere in most stories, so this finds codes that mark topic stories but
  rarely ones that make the model write about the topic.

Both are computed in one pass over documents (:class:`TopicCounter`), from an index or straight
from a corpus, for several topics at once.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from codebook.analysis.index import CodeIndex, Layout
from codebook.analysis.regex import Regex, compile_regex
from codebook.steering import CodeRef
from codebook.text import spans

TARGET_TOKENS = ("all", "first", "last")


@dataclasses.dataclass
class CodeScore:
    """A code and how well it matches a pattern (see the module docstring)."""

    ref: CodeRef
    precision: float
    recall: float
    hits: int  # activations on targets (code search), at lead-ins or in topic documents (topics)
    count: int  # all activations of the code
    score: float  # what the codes are ranked by (F1, or enrichment)

    def to_dict(self) -> dict:
        return {**self.ref.to_dict(), "name": str(self.ref), "precision": self.precision,
                "recall": self.recall, "score": self.score, "hits": self.hits,
                "count": self.count}


def f1(precision, recall):
    """The harmonic mean of precision and recall (0 where both are 0); works on arrays."""
    total = np.asarray(precision + recall, dtype=np.float64)
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)


def _regex(pattern: str | Regex, ignore_case: bool) -> Regex:
    """``pattern`` compiled, unless it already is (then with its own case and time limit)."""
    return pattern if isinstance(pattern, Regex) else compile_regex(pattern, ignore_case)


def _group_of(regex: Regex, group: int | str | None) -> int | str:
    if group is None:
        return 1 if regex.groups else 0
    if isinstance(group, str) and group.isdigit():
        group = int(group)
    if isinstance(group, int) and not 0 <= group <= regex.groups:
        raise ValueError(f"regex {regex.pattern!r} has no group {group} "
                         f"(it has {regex.groups} capture group(s))")
    if isinstance(group, str) and group not in regex.groupindex:
        raise ValueError(f"regex {regex.pattern!r} has no group named {group!r}")
    return group


def regex_targets(
    index: CodeIndex, surfaces: list[str], pattern: str | Regex, group: int | str | None = None,
    tokens: str = "all", ignore_case: bool = True,
) -> np.ndarray:
    """``[N]`` bool: the indexed tokens that ``pattern`` (a string, or a :class:`Regex` with its
    own case and time limit) selects. ``tokens`` says which tokens of a multi-token match count:
    ``all`` of them, only the ``first`` or only the ``last``."""
    if tokens not in TARGET_TOKENS:
        raise ValueError(f"tokens must be one of {TARGET_TOKENS}, got {tokens!r}")
    regex = _regex(pattern, ignore_case)
    group = _group_of(regex, group)
    targets = np.zeros(index.num_tokens, dtype=bool)
    for d in range(index.num_documents):
        begin = int(index.doc_offsets[d])
        text, starts = spans(index.document(d), surfaces)
        for match in regex.finditer(text):
            lo, hi = match.span(group)
            if hi <= lo:
                continue  # an empty or non-participating group selects no token
            # Token i covers [starts[i], starts[i+1]); empty tokens (BOS) never overlap.
            first = bisect.bisect_right(starts, lo) - 1
            last = bisect.bisect_left(starts, hi) - 1
            selected = [i for i in range(first, last + 1) if starts[i + 1] > starts[i]]
            if tokens == "first":
                selected = selected[:1]
            elif tokens == "last":
                selected = selected[-1:]
            targets[[begin + i for i in selected]] = True
    return targets


def token_targets(index: CodeIndex, token_ids: list[int]) -> np.ndarray:
    """``[N]`` bool: the indexed tokens whose id is one of ``token_ids``."""
    return np.isin(index.tokens.astype(np.int64), np.asarray(token_ids, dtype=np.int64))


def code_search(index: CodeIndex, targets: np.ndarray, top: int = 20) -> list[CodeScore]:
    """Codes ranked by F1 of precision and recall on the ``targets`` tokens (``[N]`` bool)."""
    num_targets = int(targets.sum())
    if num_targets == 0:
        raise ValueError(f"the pattern selects no token of the index ({index.num_documents} "
                         f"documents, {index.num_tokens} tokens)")
    hits = np.zeros(index.layout.size, dtype=np.int64)
    counts = np.zeros(index.layout.size, dtype=np.int64)
    for key in index.codes:
        offset = index.layout.offsets[key]
        size = index.counts[key].size
        counts[offset:offset + size] = index.counts[key].reshape(-1)
        hits += np.bincount(index.flat_codes(key)[targets].reshape(-1), minlength=index.layout.size)
    active = np.nonzero(hits)[0]
    precision = hits[active] / counts[active]
    recall = hits[active] / num_targets
    scores = [
        CodeScore(index.layout.ref(int(flat)), float(p), float(r), int(hits[flat]),
                  int(counts[flat]), float(score))
        for flat, p, r, score in zip(active, precision, recall, f1(precision, recall),
                                     strict=True)
    ]
    scores.sort(key=lambda s: (-s.score, -s.precision, s.ref))
    return scores[:top]


STATISTICS = ("context", "lead-in", "document")


@dataclasses.dataclass
class TopicResult:
    """Topic search output: the ranked codes and what they were computed on."""

    pattern: str
    statistic: str
    codes: list[CodeScore]
    documents: int
    topic_documents: int
    lead_ins: int  # lead-in positions (tokens just before a match)
    context_tokens: int  # tokens of topic documents after the topic's first mention
    chance: float  # what a code unrelated to the topic scores as precision

    def to_dict(self) -> dict:
        return {"regex": self.pattern, "statistic": self.statistic, "documents": self.documents,
                "topic_documents": self.topic_documents, "lead_ins": self.lead_ins,
                "context_tokens": self.context_tokens, "chance_precision": self.chance,
                "codes": [c.to_dict() for c in self.codes]}


@dataclasses.dataclass
class _Topic:
    regex: Regex
    documents: int = 0
    tokens: int = 0
    lead_ins: int = 0
    context_tokens: int = 0
    in_documents: np.ndarray | None = None  # activations inside topic documents
    presence: np.ndarray | None = None  # topic documents the code fires in
    at_lead_ins: np.ndarray | None = None  # activations at lead-in positions
    in_context: np.ndarray | None = None  # activations after the topic's first mention


class TopicCounter:
    """Accumulates, one document at a time, what topic search needs for several topics."""

    def __init__(self, layout: Layout, surfaces: list[str], patterns: dict[str, str | Regex],
                 ignore_case: bool = True):
        if not patterns:
            raise ValueError("no topic to search for")
        self.layout, self.surfaces = layout, surfaces
        self.counts = np.zeros(layout.size, dtype=np.int64)
        self.documents = self.tokens = 0
        self.topics = {}
        for name, pattern in patterns.items():
            topic = _Topic(_regex(pattern, ignore_case))
            topic.in_documents = np.zeros(layout.size, dtype=np.int64)
            topic.presence = np.zeros(layout.size, dtype=np.int64)
            topic.at_lead_ins = np.zeros(layout.size, dtype=np.int64)
            topic.in_context = np.zeros(layout.size, dtype=np.int64)
            self.topics[name] = topic

    def add(self, tokens: np.ndarray, flat: np.ndarray) -> None:
        """One document: its token ids and flat codes ``[tokens, codes per token]``."""
        counts = np.bincount(flat.reshape(-1), minlength=self.layout.size)
        self.counts += counts
        self.documents += 1
        self.tokens += len(tokens)
        text, starts = spans(tokens, self.surfaces)
        for topic in self.topics.values():
            # The token holding a match's first character; the one before it is the lead-in.
            # bisect_right skips empty tokens (BOS) that start at the same offset.
            firsts = {bisect.bisect_right(starts, m.start()) - 1
                      for m in topic.regex.finditer(text) if m.end() > m.start()}
            if not firsts:
                continue
            lead_ins = sorted(i - 1 for i in firsts if i >= 1)
            topic.documents += 1
            topic.tokens += len(tokens)
            topic.lead_ins += len(lead_ins)
            topic.in_documents += counts
            topic.presence += counts > 0
            topic.at_lead_ins += np.bincount(flat[lead_ins].reshape(-1),
                                             minlength=self.layout.size)
            # Context: every token after the one holding the first mention.
            first = min(firsts)
            topic.context_tokens += len(tokens) - first - 1
            topic.in_context += np.bincount(flat[first + 1:].reshape(-1),
                                            minlength=self.layout.size)

    def result(self, name: str, statistic: str = "context", top: int = 20,
               prior: float = 10.0) -> TopicResult:
        """Codes ranked for topic ``name`` (see the module docstring for the statistics)."""
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        topic = self.topics[name]
        pattern = topic.regex.pattern
        if topic.documents == 0:
            raise ValueError(f"no document of the {self.documents} matches {pattern!r}: the "
                             "topic needs documents about it (pass a larger corpus with --data)")
        if statistic == "document":
            if topic.documents == self.documents:
                raise ValueError(f"every one of the {self.documents} documents matches "
                                 f"{pattern!r}, so no code can be specific to it")
            chance = topic.tokens / self.tokens
            precision = (topic.in_documents + prior * chance) / (self.counts + prior)
            recall = topic.presence / topic.documents
            score, hits = f1(precision, recall), topic.in_documents
        elif statistic == "context":
            if topic.context_tokens == 0:
                raise ValueError(f"every document matching {pattern!r} ends at its first "
                                 "match: there is no text after a mention to learn from")
            if topic.context_tokens == self.tokens:
                raise ValueError(f"every token of the corpus follows a match of {pattern!r}, "
                                 "so no code can be specific to it")
            chance = topic.context_tokens / self.tokens
            hits = topic.in_context
            precision = (hits + prior * chance) / (self.counts + prior)
            recall = hits / topic.context_tokens
            score = precision
        else:
            if topic.lead_ins == 0:
                raise ValueError(f"every match of {pattern!r} starts a document: there is no "
                                 "token before one to learn from")
            chance = topic.lead_ins / self.tokens
            hits = topic.at_lead_ins
            precision = hits / np.maximum(self.counts, 1)
            recall = hits / topic.lead_ins
            elsewhere = (self.counts - hits) / max(self.tokens - topic.lead_ins, 1)
            score = recall - elsewhere
        fired = np.nonzero(self.counts)[0]  # a code that never fired says nothing of the topic
        order = fired[np.lexsort((-precision[fired], -score[fired]))][:top]
        codes = [
            CodeScore(self.layout.ref(int(i)), float(precision[i]), float(recall[i]),
                      int(hits[i]), int(self.counts[i]), float(score[i]))
            for i in order
        ]
        return TopicResult(pattern, statistic, codes, self.documents, topic.documents,
                           topic.lead_ins, topic.context_tokens, chance)


def topic_search(
    documents, layout: Layout, surfaces: list[str], patterns: dict[str, str | Regex],
    statistic: str = "context", top: int = 20, ignore_case: bool = True,
) -> dict[str, TopicResult]:
    """Topic search for each of ``patterns`` (name → regex string or :class:`Regex`) over
    ``documents``, an iterable of ``(token ids, flat codes)`` (:meth:`CodeIndex.documents`,
    :func:`corpus_documents`)."""
    counter = TopicCounter(layout, surfaces, patterns, ignore_case)
    for tokens, flat in documents:
        counter.add(tokens, flat)
    if counter.documents == 0:
        raise ValueError("no documents to search: the corpus is empty")
    return {name: counter.result(name, statistic, top) for name in patterns}


def last_layers(layout: Layout, last: int | None) -> list[int]:
    """The model's last ``last`` codebook layers, in order (all of them for ``None``)."""
    layers = sorted({site.layer for site in layout.sites})
    if last is None:
        return layers
    if last < 1:
        raise ValueError(f"last_layers must be positive (or None for all), got {last}")
    return layers[-last:]


def select_codes(
    scores: list[CodeScore], layout: Layout, max_codes: int, per_head: int = 1
) -> list[CodeRef]:
    """The best codes to force together: in rank order, at most ``per_head`` per head (and never
    more than that head's ``k``) and ``max_codes`` in all."""
    if max_codes < 1:
        raise ValueError(f"max_codes must be at least 1, got {max_codes}")
    chosen: list[CodeRef] = []
    per: dict = {}
    for score in scores:
        ref = score.ref
        head = (ref.layer, ref.site, ref.head)
        limit = min(per_head, layout.site((ref.layer, ref.site)).k)
        if per.get(head, 0) >= limit:
            continue
        per[head] = per.get(head, 0) + 1
        chosen.append(ref)
        if len(chosen) == max_codes:
            break
    return chosen
