"""Checking what visitors send, through the UI or the API. Each check returns the clean value or
raises :class:`InputError` with a message that names the field and what is wrong with it."""

from __future__ import annotations

import math
import secrets

from app.models import LoadedModel
from codebook.layer import POSITIONS
from codebook.steering import MODES, Steering
from codebook.text import compile_regex

MAX_SEED = 2**32 - 1
MAX_TEMPERATURE = 5.0
MAX_STRENGTH = 100.0
MAX_REGEX_CHARS = 200
# Seconds one request may spend matching a visitor's regex (summed over every text it searches):
# a pattern such as (.|..)*# backtracks exponentially, and the limit turns that into a message.
REGEX_TIME_LIMIT = 2.0
MAX_CODES = 64


class InputError(ValueError):
    """A bad input; the message is meant for the visitor."""


def number(value, field: str, low: float, high: float) -> float:
    """``value`` as a finite float in ``[low, high]``."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise InputError(f"{field} must be a finite number, got {result}")
    if not low <= result <= high:
        raise InputError(f"{field} must be between {low:g} and {high:g}, got {result:g}")
    return result


def integer(value, field: str, low: int, high: int) -> int:
    result = number(value, field, low, high)
    if result != int(result):
        raise InputError(f"{field} must be a whole number, got {result:g}")
    return int(result)


def prompt_ids(loaded: LoadedModel, prompt, max_chars: int, max_new_tokens: int) -> list[int]:
    """Token ids of the prompt, the document separator first (as in training), after checking
    that prompt and continuation fit in the model's context."""
    from codebook.text import encode_document

    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty: write the beginning of a story, e.g. "
                         "'Once upon a time,'")
    if len(prompt) > max_chars:
        raise InputError(f"the prompt has {len(prompt):,} characters; the limit is {max_chars:,}")
    ids = encode_document(loaded.tokenizer, prompt)
    limit = loaded.max_positions
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise InputError(f"the prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens exceed "
                         f"the model's context of {limit} tokens: shorten one of them")
    return ids


def seed(value, random_seed: bool) -> int:
    """The seed to sample with: a fresh one when asked for, else ``value``."""
    if random_seed:
        return secrets.randbelow(MAX_SEED)
    return integer(value, "seed", 0, MAX_SEED)


def temperature(value) -> float:
    return number(value, "temperature", 0.0, MAX_TEMPERATURE)


def max_new_tokens(value, cap: int) -> int:
    return integer(value, "max new tokens", 1, cap)


def regex(pattern, field: str = "regex") -> str:
    """A regular expression that compiles, of reasonable length."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise InputError(f"the {field} is empty: type a word or a regular expression")
    pattern = pattern.strip()
    if len(pattern) > MAX_REGEX_CHARS:
        raise InputError(f"the {field} has {len(pattern)} characters; the limit is "
                         f"{MAX_REGEX_CHARS}")
    try:
        compile_regex(pattern)
    except ValueError as err:
        raise InputError(str(err)) from None
    return pattern


def steering(loaded: LoadedModel, codes, strength, mode, positions) -> Steering | None:
    """The steering set as a :class:`Steering` checked against the model (every code exists, at
    most ``k`` per head), or ``None`` when no code is chosen."""
    codes = [c for c in (codes or []) if str(c).strip()]
    if not codes:
        return None
    if len(codes) > MAX_CODES:
        raise InputError(f"{len(codes)} codes in the steering set; the limit is {MAX_CODES}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    strength = number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
    try:
        result = Steering(codes=[str(c) for c in codes], strength=strength, mode=mode,
                          positions=positions)
        result.layer_steerings(loaded.model.codebook_layers())  # raises naming a bad code
    except ValueError as err:
        raise InputError(str(err)) from None
    return result


def steering_json(loaded: LoadedModel, text) -> Steering:
    """A shared steering set (``Steering.to_json``), checked like :func:`steering`."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("paste a steering set as JSON, e.g. "
                         '{"codes": ["3:attn_heads:2:117"], "strength": 1, "mode": "add"}')
    if len(text) > 20_000:
        raise InputError("the steering JSON is too long (limit 20,000 characters)")
    try:
        parsed = Steering.from_json(text)
    except (ValueError, TypeError) as err:
        raise InputError(f"cannot read the steering JSON: {err}") from None
    if parsed.block:
        raise InputError("blocked codes are not supported in the app; remove 'block'")
    result = steering(loaded, [str(c) for c in parsed.codes], parsed.strength, parsed.mode,
                      parsed.positions)
    if result is None:
        raise InputError("the steering JSON has no codes")
    return result
