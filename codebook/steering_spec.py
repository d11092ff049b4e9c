"""What a steering is, with numpy only: codes, validation, and the per-site score bias and output
scale that the codebook op reads.

A :class:`Steering` names codes by :class:`CodeRef` (layer, site, head, code) and says how to
apply them. :func:`steering_arrays` turns it into, per codebook site, a score ``bias`` and an
output ``scale`` (``[groups, num_codes]``):

* ``mode="add"``: each forced code gets an infinite score bias, so it enters the top-k and
  displaces the weakest code; the other ``k - 1`` codes are chosen as usual.
* ``mode="replace"``: in each steered group every other code is blocked, so the forced codes
  replace all ``k`` (with one forced code and ``combine="mean"``, the output is that code).
* ``strength`` multiplies the forced codes' vectors in the combination (their ``scale``);
  ``code_strengths`` gives some forced codes a strength of their own.
* ``block`` lists codes that may never be chosen (bias ``-inf``).
* ``positions``: ``"all"`` tokens, only the ``"prompt"``, or only ``"generated"`` tokens.

This module imports neither torch nor the rest of :mod:`codebook` (whose ``__init__`` resolves
its torch-side names on first use), so the exported models' torch-free runtime
(:mod:`cbexport.runtime`) shares it with :mod:`codebook.steering`, which builds torch tensors
from the same arrays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping

import numpy as np

MODES = ("add", "replace")
POSITIONS = ("all", "prompt", "generated")

# The keys of a topic preset that say how to steer (the fields of Steering); a preset's other keys
# (its regex, statistics, a description) are not steering.
PRESET_KEYS = ("codes", "strength", "mode", "positions", "block", "code_strengths")

_SPEC = re.compile(
    r"^\s*(?:L|layer)?(\d+)\s*[:./]\s*([a-z_]+)\s*[:./]\s*(?:H|head)?(\d+)\s*[:./]\s*(?:C|code)?(\d+)\s*$",
    re.IGNORECASE,
)


def steers(positions: str, in_prompt: bool) -> bool:
    """Whether a steering with ``positions`` (one of :data:`POSITIONS`) applies to a token of
    the prompt (``in_prompt``) or to a generated one."""
    return positions == "all" or (positions == "prompt") == in_prompt


@dataclasses.dataclass(frozen=True, order=True)
class CodeRef:
    """One code: ``layer``, ``site`` name, ``head`` (group; 0 at one-group sites), ``code`` id."""

    layer: int
    site: str
    head: int
    code: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.site}:{self.head}:{self.code}"

    @classmethod
    def parse(cls, spec: str | dict | CodeRef) -> CodeRef:
        """Parse ``"LAYER:SITE:HEAD:CODE"`` (also ``L3.attn_heads.H2.C117``) or a dict."""
        if isinstance(spec, CodeRef):
            return spec
        if isinstance(spec, dict):
            try:
                return cls(int(spec["layer"]), str(spec["site"]), int(spec["head"]),
                           int(spec["code"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"a code must have integer layer, head, code and a site name, got {spec!r}"
                ) from None
        match = _SPEC.match(str(spec))
        if not match:
            raise ValueError(
                f"cannot parse code {spec!r}: write LAYER:SITE:HEAD:CODE, e.g. 3:attn_heads:2:117"
            )
        layer, site, head, code = match.groups()
        return cls(int(layer), site.lower(), int(head), int(code))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_codes(spec: str | list) -> list[CodeRef]:
    """A list of codes from ``"3:attn_heads:2:117,4:mlp_out:0:9"``, a JSON list, or a list."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("["):
            try:
                return parse_codes(json.loads(text))
            except json.JSONDecodeError as err:
                raise ValueError(f"codes JSON is not valid: {err}") from None
        return [CodeRef.parse(part) for part in text.split(",") if part.strip()]
    return [CodeRef.parse(item) for item in spec]


@dataclasses.dataclass
class Steering:
    """What to force on and block, and how (see the module docstring)."""

    codes: list[CodeRef] = dataclasses.field(default_factory=list)
    strength: float = 1.0
    mode: str = "add"
    positions: str = "all"
    block: list[CodeRef] = dataclasses.field(default_factory=list)
    # A strength of their own for some forced codes (keys: codes as CodeRef, str or dict).
    code_strengths: dict[CodeRef, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.codes = parse_codes(self.codes)
        self.block = parse_codes(self.block)
        if self.mode not in MODES:
            raise ValueError(f"steering mode must be one of {MODES}, got {self.mode!r}")
        if self.positions not in POSITIONS:
            raise ValueError(
                f"steering positions must be one of {POSITIONS}, got {self.positions!r}"
            )
        self.strength = _strength("steering strength", self.strength)
        if not isinstance(self.code_strengths, Mapping):
            raise ValueError("code_strengths must map codes to strengths, got "
                             f"{type(self.code_strengths).__name__}")
        strengths = {}
        for code, value in self.code_strengths.items():
            ref = CodeRef.parse(code)
            if ref not in self.codes:
                raise ValueError(f"code_strengths names {ref}, which is not a forced code")
            strengths[ref] = _strength(f"the strength of {ref}", value)
        self.code_strengths = strengths
        overlap = set(self.codes) & set(self.block)
        if overlap:
            raise ValueError(f"codes both forced and blocked: {sorted(map(str, overlap))}")

    def to_dict(self) -> dict:
        return {
            "codes": [c.to_dict() for c in self.codes],
            "strength": self.strength,
            "mode": self.mode,
            "positions": self.positions,
            "block": [c.to_dict() for c in self.block],
            # Only when there are some: steering sets saved before they existed stay as they were.
            **({"code_strengths": {str(c): v for c, v in self.code_strengths.items()}}
               if self.code_strengths else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Steering:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown steering keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Steering:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"steering JSON is not valid: {err}") from None
        if not isinstance(data, dict):
            raise ValueError("steering JSON must be an object with a 'codes' list")
        return cls.from_dict(data)


def _strength(what: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def preset_steering(preset: dict, **overrides) -> Steering:
    """The :class:`Steering` a topic preset describes (its :data:`PRESET_KEYS`; other keys are
    ignored); ``overrides`` that are not ``None`` win."""
    if not isinstance(preset, dict) or not isinstance(preset.get("codes"), list):
        raise ValueError("a topic preset must be an object with a 'codes' list")
    fields = {key: preset[key] for key in PRESET_KEYS if key in preset}
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return Steering(**fields)


def steering_arrays(sites: Iterable[Mapping], steering: Steering) -> dict[tuple[int, str], tuple]:
    """Per-site ``(bias, scale)`` float32 arrays ``[groups, num_codes]`` for the sites
    ``steering`` touches (``scale`` is all ones unless a forced code has ``strength`` != 1).
    ``sites`` describe the codebooks: ``layer``, ``site``, ``groups``, ``num_codes`` and ``k``
    (an exported bundle's manifest lists them so). Unknown sites and out-of-range ids raise
    ``ValueError``."""
    by_key = {(s["layer"], s["site"]): s for s in sites}
    result: dict = {}

    def entry(ref: CodeRef) -> tuple[np.ndarray, np.ndarray]:
        key = (ref.layer, ref.site)
        if key not in by_key:
            available = ", ".join(f"{i}:{s}" for i, s in sorted(by_key))
            raise ValueError(f"code {ref}: there is no codebook at layer {ref.layer} site "
                             f"{ref.site!r}; codebooks are at {available}")
        site = by_key[key]
        if not 0 <= ref.head < site["groups"]:
            raise ValueError(f"code {ref}: head must be in [0, {site['groups']}), got {ref.head}")
        if not 0 <= ref.code < site["num_codes"]:
            raise ValueError(
                f"code {ref}: code id must be in [0, {site['num_codes']}), got {ref.code}"
            )
        if key not in result:
            shape = (site["groups"], site["num_codes"])
            result[key] = (np.zeros(shape, np.float32), np.ones(shape, np.float32))
        return result[key]

    for ref in steering.block:
        entry(ref)[0][ref.head, ref.code] = -np.inf
    forced: dict = {}
    for ref in steering.codes:
        entry(ref)[1][ref.head, ref.code] = steering.code_strengths.get(ref, steering.strength)
        forced.setdefault((ref.layer, ref.site, ref.head), set()).add(ref.code)
    for (layer, site, head), codes in forced.items():
        k = by_key[(layer, site)]["k"]
        if len(codes) > k:
            raise ValueError(f"{len(codes)} codes forced at layer {layer} {site} head {head}, "
                             f"but only k={k} can be active at once")
        bias = result[(layer, site)][0][head]
        if steering.mode == "replace":
            bias[:] = -np.inf
        bias[sorted(codes)] = np.inf
    return result
