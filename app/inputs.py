"""Checking what visitors send, through the UI or the API. Each check returns the clean value or
raises :class:`InputError` with a message that names the field and what is wrong with it."""

from __future__ import annotations

import dataclasses
import math
import re
import secrets

from app.models import LoadedModel
from codebook.analysis.regex import compile_regex
from codebook.steering import MODES, POSITIONS, CodeRef, Steering, layer_steerings

MAX_SEED = 2**32 - 1
MAX_TEMPERATURE = 2.0
# The steering strength every part of the app accepts: the Steer tab's box, a pasted steering
# set, the API. The library takes any finite number (it multiplies the forced codes' vectors);
# a negative one subtracts them, steering away. Beyond about 10 the text is garbled anyway.
STRENGTH_RANGE = (-10.0, 10.0)
MAX_REGEX_CHARS = 200
# Seconds one request may spend matching a visitor's regex (summed over every text it searches):
# a pattern such as (.|..)*# backtracks exponentially, and the limit turns that into a message.
REGEX_TIME_LIMIT = 2.0
MAX_CODES = 64


class InputError(ValueError):
    """A bad input; the message is meant for the visitor."""


def shown_number(value: float) -> str:
    """``value`` as a visitor would type it: ``4``, ``-2.5``, ``1000000000`` (never ``1e+09``)."""
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return f"{value:g}"


def number(value, field: str, low: float, high: float) -> float:
    """``value`` (a number, or text that is one) as a finite float in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InputError(f"{field} must be a number, got {value!r}")
    try:
        result = float(value)
    except ValueError:
        raise InputError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise InputError(f"{field} must be a finite number, got {result}")
    if not low <= result <= high:
        raise InputError(f"{field} must be between {shown_number(low)} and {shown_number(high)}, "
                         f"got {shown_number(result)}")
    return result


def integer(value, field: str, low: int, high: int) -> int:
    result = number(value, field, low, high)
    if result != int(result):
        raise InputError(f"{field} must be a whole number, got {shown_number(result)}")
    return int(result)


def flag(value, field: str) -> bool:
    """A checkbox's value: ``True`` or ``False``, nothing else."""
    if not isinstance(value, bool):
        raise InputError(f"{field} must be true or false, got {value!r}")
    return value


def text(value, field: str) -> str:
    """A text box's value (``None``, which an API client may send for an empty box, is "")."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{field} must be text, got {value!r}")
    return value


def choice(value, field: str, options) -> str:
    """One of ``options`` (a radio button's values)."""
    if value not in options:
        raise InputError(f"{field} must be one of {', '.join(options)}, got {value!r}")
    return value


def prompt_ids(loaded: LoadedModel, prompt, max_chars: int, max_new_tokens: int) -> list[int]:
    """Token ids of the prompt, the document separator first (as in training), after checking
    that prompt and continuation fit in the model's context."""
    from codebook.text import encode_document

    if not text(prompt, "the prompt").strip():
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
    if flag(random_seed, "random seed"):
        return secrets.randbelow(MAX_SEED)
    return integer(value, "seed", 0, MAX_SEED)


def temperature(value) -> float:
    return number(value, "temperature", 0.0, MAX_TEMPERATURE)


def max_new_tokens(value, cap: int) -> int:
    return integer(value, "max new tokens", 1, cap)


def strength(value) -> float:
    return number(value, "strength", *STRENGTH_RANGE)


def code_list(value) -> list[str]:
    """The steering set's codes as sent: a list (the code box's chips) or, from an API client,
    one comma-separated string; empty entries dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple):
        raise InputError(f"codes must be a list of codes such as 3:attn_heads:2:117, got "
                         f"{value!r}")
    for code in value:
        if not isinstance(code, str):
            raise InputError(f"cannot parse code {code!r}: write LAYER:SITE:HEAD:CODE, e.g. "
                             "3:attn_heads:2:117")
    return [code for code in value if code.strip()]


STRENGTHS_FIELD = "per-code strengths"
STRENGTHS_EXAMPLE = "3:attn_heads:2:117=2.5"


def code_strengths(value) -> dict[str, float]:
    """Per-code strengths as typed in their box: ``CODE=STRENGTH`` entries separated by commas
    (or new lines), e.g. ``3:attn_heads:2:117=2.5, 3:attn_heads:2:40=-1``; from an API client
    also an object ``{code: strength}``. Each code is written ``LAYER:SITE:HEAD:CODE`` once,
    each strength is in :data:`STRENGTH_RANGE` (the set's strength's range). Whether the codes
    are in the steering set is :func:`steering`'s check."""
    field = STRENGTHS_FIELD
    if value is None:
        return {}
    if isinstance(value, dict):
        entries = list(value.items())
    elif isinstance(value, str):
        entries = []
        for entry in re.split(r"[,;\n]", value):
            if not entry.strip():
                continue
            code, equals, given = entry.partition("=")
            if not equals or not code.strip() or not given.strip():
                raise InputError(f"{field}: write CODE=STRENGTH, e.g. {STRENGTHS_EXAMPLE}, got "
                                 f"{entry.strip()!r}")
            entries.append((code, given.strip()))
    else:
        raise InputError(f"{field} must be text such as {STRENGTHS_EXAMPLE}, got {value!r}")
    result: dict[str, float] = {}
    for code, given in entries:
        try:
            name = str(CodeRef.parse(str(code)))
        except ValueError as err:
            raise InputError(f"{field}: {err}") from None
        if name in result:
            raise InputError(f"{field}: {name} is given twice")
        try:
            result[name] = number(given, f"the strength of {name}", *STRENGTH_RANGE)
        except InputError as err:
            raise InputError(f"{field}: {err}") from None
    if len(result) > MAX_CODES:
        raise InputError(f"{len(result)} {field}; the limit is {MAX_CODES}")
    return result


def code_strengths_text(strengths) -> str:
    """Per-code strengths as their box shows them: ``3:attn_heads:2:117=2.5, ...``."""
    return ", ".join(f"{code}={shown_number(value)}" for code, value in strengths.items())


def regex(pattern, field: str = "regex") -> str:
    """A regular expression that compiles, of reasonable length."""
    if not text(pattern, f"the {field}").strip():
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


def steering(loaded: LoadedModel, codes, strength_value, mode, positions,
             block=None, strengths=None) -> Steering | None:
    """The steering set as a :class:`Steering` checked against the model (every code exists, at
    most ``k`` per head, none both forced and blocked), or ``None`` when no code is forced or
    blocked; strength, mode and positions are checked either way. ``block``: codes that may
    never be chosen (a list, or one comma-separated string). ``strengths``: a strength of their
    own for some forced codes (:func:`code_strengths`; the others have ``strength_value``)."""
    codes = code_list(codes)
    block = code_list(block)
    mode = choice(mode, "mode", MODES)
    positions = choice(positions, "positions", POSITIONS)
    strength_value = strength(strength_value)
    strengths = code_strengths(strengths)
    if not codes and not block and not strengths:
        return None
    if len(codes) > MAX_CODES:
        raise InputError(f"{len(codes)} codes in the steering set; the limit is {MAX_CODES}")
    if len(block) > MAX_CODES:
        raise InputError(f"{len(block)} blocked codes; the limit is {MAX_CODES}")
    try:
        result = Steering(codes=codes, strength=strength_value, mode=mode, positions=positions,
                          block=block)
        layer_steerings(result, loaded.model.codebook_layers())  # raises naming a bad code
    except ValueError as err:
        raise InputError(str(err)) from None
    forced = {str(code) for code in result.codes}
    for code in strengths:
        if code not in forced:
            try:  # a code the model does not have is named as such
                layer_steerings(Steering(codes=[code]), loaded.model.codebook_layers())
            except ValueError as err:
                raise InputError(f"{STRENGTHS_FIELD}: {err}") from None
            raise InputError(f"{STRENGTHS_FIELD}: {code} is not among the codes switched on: "
                             "switch it on, or remove its strength")
    return dataclasses.replace(result, code_strengths=strengths) if strengths else result


def steering_json(loaded: LoadedModel, shared) -> Steering:
    """A shared steering set (``Steering.to_json``), checked like :func:`steering`."""
    if not isinstance(shared, str) or not shared.strip():
        raise InputError("paste a steering set as JSON, e.g. "
                         '{"codes": ["3:attn_heads:2:117"], "strength": 1, "mode": "add"}')
    if len(shared) > 20_000:
        raise InputError("the steering JSON is too long (limit 20,000 characters)")
    try:
        parsed = Steering.from_json(shared)
    except (ValueError, TypeError) as err:
        raise InputError(f"cannot read the steering JSON: {err}") from None
    result = steering(loaded, [str(c) for c in parsed.codes], parsed.strength, parsed.mode,
                      parsed.positions, [str(c) for c in parsed.block],
                      {str(c): value for c, value in parsed.code_strengths.items()})
    if result is None:
        raise InputError("the steering JSON has no codes, forced or blocked")
    return result
