"""Regexes for topic search and highlighting, matched with a time limit.

Regexes (:func:`compile_regex`) have Python's ``re`` syntax and are matched by the ``regex``
package, which can stop a match at a time limit and lets other threads run while it matches:
the app gives every visitor's regex a limit (see :class:`Regex`).
"""

from __future__ import annotations

import re
import time
from re import _constants, _parser  # re's own parser (sre_parse before Python 3.11)

import regex

MAX_UNROLLED = 10_000
_REPEATS = (_constants.MAX_REPEAT, _constants.MIN_REPEAT, _constants.POSSESSIVE_REPEAT)


class RegexTimeout(ValueError):
    """Matching a regex took longer than its time limit."""


class Regex:
    """A compiled regex (from :func:`compile_regex`) whose matching may have a time limit.

    With ``time_limit`` (seconds), the time of all matching done through this object is summed,
    and a call that runs past the limit raises :class:`RegexTimeout`: a search over many texts
    is bounded as a whole. Without it, matching is unbounded (fine for one's own regexes).
    Either way the GIL is released while matching, so a slow pattern does not stall the
    process's other threads. Not meant to be shared between threads (the time is summed).
    """

    def __init__(self, pattern: str, compiled: regex.Pattern, time_limit: float | None):
        self.pattern = pattern
        self.groups = compiled.groups
        self.groupindex = compiled.groupindex
        self.time_limit = time_limit
        self._compiled = compiled
        self._spent = 0.0

    def finditer(self, text: str) -> list[regex.Match]:
        """Every non-overlapping match in ``text`` (a list, found within the time limit)."""
        return self._timed(lambda timeout: list(
            self._compiled.finditer(text, concurrent=True, timeout=timeout)))

    def search(self, text: str) -> regex.Match | None:
        return self._timed(lambda timeout: self._compiled.search(text, concurrent=True,
                                                                 timeout=timeout))

    def _timed(self, match):
        if self.time_limit is None:
            return match(None)
        left = self.time_limit - self._spent
        if left <= 0:
            raise self._timeout()
        started = time.monotonic()
        try:
            result = match(left)
        except TimeoutError:
            # Spent, however the engine counted the time (it may stop a little early).
            self._spent = self.time_limit
            raise self._timeout() from None
        self._spent += time.monotonic() - started
        return result

    def _timeout(self) -> RegexTimeout:
        return RegexTimeout(
            f"the regex {self.pattern!r} took longer than {self.time_limit:g} s to match; "
            "simplify it (nested repeats such as (a+)+ or (.|..)* can take exponential time)")


def compile_regex(pattern: str, ignore_case: bool = True,
                  time_limit: float | None = None) -> Regex:
    """``pattern`` compiled (case-insensitive unless told) with matching bounded by
    ``time_limit`` seconds (see :class:`Regex`), or a ``ValueError`` naming the problem."""
    if not pattern:
        raise ValueError("empty regex: give a word or a regular expression")
    try:
        # re's parser checks the syntax and measures the repeats before the regex package
        # compiles (and unrolls) anything.
        unrolled = _unrolled_size(_parser.parse(pattern, re.IGNORECASE if ignore_case else 0))
        if unrolled > MAX_UNROLLED:
            raise ValueError(f"the regex {pattern!r} repeats too much: its counted repeats "
                             f"(x{{n}}) unroll into {unrolled:,} pieces; the limit is "
                             f"{MAX_UNROLLED:,}")
        flags = regex.VERSION0 | (regex.IGNORECASE if ignore_case else 0)  # VERSION0: re's rules
        compiled = regex.compile(pattern, flags)
    except (re.error, regex.error) as err:
        raise ValueError(f"invalid regex {pattern!r}: {err}") from None
    return Regex(pattern, compiled, time_limit)


def _unrolled_size(items) -> int:
    """How many items parsed ``items`` become once every counted repeat is unrolled."""
    size = 0
    for op, argument in items:
        if op in _REPEATS:
            low, _, body = argument
            size += max(low, 1) * _unrolled_size(body)
        elif op is _constants.IN:  # a character set, compiled member by member
            size += len(argument)
        else:
            size += 1 + sum(_unrolled_size(part) for part in _subpatterns(argument))
    return size


def _subpatterns(argument):
    """The parsed subpatterns inside one item's argument (a group's, a branch's, ...)."""
    if isinstance(argument, _parser.SubPattern):
        yield argument
    elif isinstance(argument, tuple | list):
        for part in argument:
            yield from _subpatterns(part)
