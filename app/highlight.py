"""Generated text as HTML: the prompt, then the continuation with the words of the steering topic
marked, so a visitor sees at a glance where the topic shows up. All text is escaped: a story (or
a prompt) is never markup.

The topic regex is the visitor's, so its matching is time-limited
(:data:`app.inputs.REGEX_TIME_LIMIT`, for all the stories of one generation together).
Highlighting is a help, never a reason to fail a generation: a regex that does not compile marks
nothing, and one that runs out of time stops marking and says why in
:attr:`Highlighter.problem`.
"""

from __future__ import annotations

import html

from app import inputs
from codebook.analysis.regex import Regex, RegexTimeout, compile_regex


class Highlighter:
    """Marks the matches of one topic regex in the stories of one generation."""

    def __init__(self, pattern: str | None, time_limit: float = inputs.REGEX_TIME_LIMIT):
        self.regex: Regex | None = None
        self.problem: str | None = None  # why matches stopped being marked
        if pattern and pattern.strip():
            try:
                self.regex = compile_regex(pattern.strip(), time_limit=time_limit)
            except ValueError:
                pass  # nothing to mark

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The non-empty matches in ``text`` (none once the time limit is spent)."""
        if self.regex is None:
            return []
        try:
            return [m.span() for m in self.regex.finditer(text) if m.end() > m.start()]
        except RegexTimeout as err:
            self.regex, self.problem = None, str(err)
            return []

    def story_html(self, prompt: str, continuation: str) -> str:
        parts, position = [], 0
        for start, end in self.spans(continuation):
            parts += [html.escape(continuation[position:start]),
                      f"<mark>{html.escape(continuation[start:end])}</mark>"]
            position = end
        parts.append(html.escape(continuation[position:]))
        return (f"<div class='story-text'><span class='prompt'>{html.escape(prompt)}</span>"
                f"{''.join(parts)}</div>")

    def count(self, text: str) -> int:
        return len(self.spans(text))
