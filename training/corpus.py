"""The real TinyStories text in ``../shared`` as one clean list of stories.

Two files keep the dataset's case and layout; the third (``..._4MB_lowercased.txt``) is a
lower-cased copy of the start of V1 with cp1252 mojibake (``â€œ`` for ``"``), paragraphs split by
blank lines and stories by single newlines. Its first half repeats the 2 MiB file; its second
half (about 2,300 stories) is text found nowhere else here. :func:`repair_lowercased` turns it
back into stories the other files could hold: mojibake undone, stories already present dropped,
and case restored — every word takes the form it most often has mid-sentence in the cased
stories ("lily" → "Lily", "i" → "I"), and sentences and quotations start with a capital.
"""

from __future__ import annotations

import re
from collections import Counter

from codebook.text import deduplicate, normalized, split_text

_MOJIBAKE = re.compile(r"â€[\x80-\xbf\u0152-\u2122\x9d\x9c\x93\x94]|â€|Ã[\x80-\xbf]")
_STORY_BREAK = re.compile(r"(?<!\n)\n(?!\n)")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
# A letter that starts a sentence or a quotation: after . ! ? (and closing quotes), or after an
# opening quote that follows a comma or colon.
_SENTENCE_START = re.compile(r"""(^|[.!?]["'”’)]?\s+["'“‘(]?|[,:]\s+["'“‘])([a-z])""")


def _cp1252_byte(char: str) -> bytes:
    try:
        return char.encode("cp1252")
    except UnicodeEncodeError:  # the five bytes cp1252 leaves undefined pass through as latin-1
        return char.encode("latin-1")


def fix_mojibake(text: str) -> str:
    """UTF-8 text that was decoded as cp1252 and re-encoded, decoded back span by span."""
    def repair(match: re.Match) -> str:
        if match.group(0) == "â€":  # the closing quote ” whose last byte (0x9d) was dropped
            return "\u201d"
        try:
            return b"".join(map(_cp1252_byte, match.group(0))).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return match.group(0)

    return _MOJIBAKE.sub(repair, text)


def word_cases(documents: list[str]) -> dict[str, str]:
    """Each word's most frequent spelling mid-sentence in ``documents`` (keyed lower-case)."""
    counts: dict[str, Counter] = {}
    for doc in documents:
        for match in _WORD.finditer(doc):
            start = match.start()
            before = doc[max(0, start - 3):start].rstrip(" \"'(“”‘’")
            if not before or before[-1] in ".!?\n":  # a sentence start says nothing of case
                continue
            word = match.group(0)
            counts.setdefault(word.lower(), Counter())[word] += 1
    return {lower: c.most_common(1)[0][0] for lower, c in counts.items()}


def recase(text: str, cases: dict[str, str]) -> str:
    """``text`` (lower case) with each word in its usual case and sentences capitalised."""
    text = _WORD.sub(lambda m: cases.get(m.group(0), m.group(0)), text)
    lines = [_SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), line)
             for line in text.split("\n")]
    return "\n".join(lines)


def repair_lowercased(text: str, cased_documents: list[str]) -> list[str]:
    """The stories of the lower-cased file that ``cased_documents`` do not hold, repaired."""
    known = {normalized(doc.lower()) for doc in cased_documents}
    cases = word_cases(cased_documents)
    stories = []
    for story in _STORY_BREAK.split(fix_mojibake(text)):
        story = re.sub(r"\n[ \t]*\n", "\n", story).strip()
        if story and normalized(story) not in known:
            stories.append(recase(story, cases))
    return stories


def read_stories(cased_files: list[str], lowercased_files: list[str] = ()) -> list[str]:
    """Every unique story of the cased files, then the repaired new ones of the lower-cased."""
    cased = []
    for path in cased_files:
        with open(path, encoding="utf-8") as f:
            cased += split_text(f.read())
    cased = deduplicate(cased)
    extra = []
    for path in lowercased_files:
        with open(path, encoding="utf-8") as f:
            extra += repair_lowercased(f.read(), cased)
    return deduplicate(cased + extra)
