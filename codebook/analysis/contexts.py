"""What one code does in an indexed corpus: how often it fires and its top activating contexts.

The index keeps each token's ``k`` codes best-ranked first, so a code's *rank* at a hit (0: it was
the most similar code) stands in for how strongly it activated. Top contexts are ordered by rank,
then by how early the hit comes among that document's hits, so the first contexts come from
different documents instead of repeating one story.
"""

from __future__ import annotations

import numpy as np

from codebook.analysis.index import CodeIndex
from codebook.steering import CodeRef
from codebook.text import spans


def code_hits(index: CodeIndex, ref: CodeRef) -> tuple[np.ndarray, np.ndarray]:
    """Token positions (into ``index.tokens``) where ``ref`` fired, and its rank at each."""
    index.layout.flat(ref)  # raises naming the problem for an unknown code
    chosen = index.codes[(ref.layer, ref.site)][:, ref.head, :]
    return np.nonzero(chosen == ref.code)


def context(index: CodeIndex, position: int, surfaces: list[str], window: int) -> dict:
    """The text around ``position`` (``window`` tokens each side, within its document)."""
    doc = int(np.searchsorted(index.doc_offsets, position, side="right") - 1)
    begin, end = index.doc_offsets[doc], index.doc_offsets[doc + 1]
    lo, hi = max(begin, position - window), min(end, position + window + 1)
    before = spans(index.tokens[lo:position], surfaces)[0]
    token = spans(index.tokens[position:position + 1], surfaces)[0]
    after = spans(index.tokens[position + 1:hi], surfaces)[0]
    return {
        "document": doc,
        "position": int(position - begin),
        "before": before,
        "token": token,
        "after": after,
        "text": f"{before}[[{token}]]{after}",
    }


def code_summary(
    index: CodeIndex, ref: CodeRef, surfaces: list[str], num_contexts: int = 10, window: int = 8
) -> dict:
    """Frequency and top activating contexts of ``ref`` (``text`` marks the hit as ``[[tok]]``)."""
    positions, ranks = code_hits(index, ref)
    doc_of_hit = np.searchsorted(index.doc_offsets, positions, side="right") - 1
    # How many earlier hits the same document has: 0 for each document's first hit.
    first_in_doc = np.r_[True, doc_of_hit[1:] != doc_of_hit[:-1]]
    run_start = np.maximum.accumulate(np.where(first_in_doc, np.arange(len(positions)), 0))
    nth_in_doc = np.arange(len(positions)) - run_start
    order = np.lexsort((positions, nth_in_doc, ranks))[:num_contexts]
    contexts = []
    for i in order:
        entry = context(index, int(positions[i]), surfaces, window)
        entry["rank"] = int(ranks[i])
        contexts.append(entry)
    return {
        "code": str(ref),
        "count": int(len(positions)),
        "frequency": len(positions) / max(index.num_tokens, 1),
        "documents": int(len(np.unique(doc_of_hit))),
        "indexed_documents": index.num_documents,
        "indexed_tokens": index.num_tokens,
        "contexts": contexts,
    }
