"""Generated text as HTML: the prompt, then the continuation with the words of the steering topic
marked, so a visitor sees at a glance where the topic shows up. All text is escaped: a story (or
a prompt) is never markup."""

from __future__ import annotations

import html
import re


def topic_pattern(pattern: str | None) -> re.Pattern | None:
    """The compiled topic regex (case-insensitive), or ``None`` when there is none or it does not
    compile (highlighting is a help, never a reason to fail a generation)."""
    if not pattern or not pattern.strip():
        return None
    try:
        return re.compile(pattern.strip(), re.IGNORECASE)
    except re.error:
        return None


def _marked(text: str, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return html.escape(text)
    parts, position = [], 0
    for match in pattern.finditer(text):
        start, end = match.span()
        if end == start:
            continue  # an empty match marks nothing
        parts += [html.escape(text[position:start]), f"<mark>{html.escape(text[start:end])}</mark>"]
        position = end
    parts.append(html.escape(text[position:]))
    return "".join(parts)


def story_html(prompt: str, continuation: str, pattern: re.Pattern | None) -> str:
    return (f"<div class='story-text'><span class='prompt'>{html.escape(prompt)}</span>"
            f"{_marked(continuation, pattern)}</div>")


def count_matches(text: str, pattern: re.Pattern | None) -> int:
    if pattern is None:
        return 0
    return sum(1 for m in pattern.finditer(text) if m.end() > m.start())
