"""Steering for exported models, with numpy only: code lists and topic presets become the per-site
``bias`` and ``scale`` inputs of the exported decoder.

This is the torch-free twin of :meth:`codebook.steering.Steering.layer_steerings` (the runtime
may not import ``codebook``, which needs torch); the tests check that both produce the same
tensors. Codes are written ``LAYER:SITE:HEAD:CODE`` (also ``L3.attn_heads.H2.C117``),
comma-separated, or as a JSON list of ``{"layer", "site", "head", "code"}`` objects.

* ``mode="add"``: each forced code gets an infinite score bias, so it enters the top-k;
  ``mode="replace"``: every other code of a steered head is blocked, so the forced codes replace
  all ``k``.
* ``strength`` is the ``scale`` of the forced codes (their vectors are multiplied by it).
* ``block`` lists codes that may never be chosen (bias ``-inf``).
* ``positions``: steer ``"all"`` tokens, only the ``"prompt"`` or only ``"generated"`` ones. The
  runtime realises it by feeding the steering on the prompt step, the decode steps, or both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

MODES = ("add", "replace")
POSITIONS = ("all", "prompt", "generated")

_SPEC = re.compile(
    r"^\s*(?:L|layer)?(\d+)\s*[:./]\s*([a-z_]+)\s*[:./]\s*(?:H|head)?(\d+)\s*[:./]\s*(?:C|code)?(\d+)\s*$",
    re.IGNORECASE,
)
# Keys of a topic preset that describe how to steer; others (a description, labels) are ignored.
_TOPIC_KEYS = ("codes", "strength", "mode", "positions", "block")


@dataclasses.dataclass(frozen=True, order=True)
class Code:
    layer: int
    site: str
    head: int
    code: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.site}:{self.head}:{self.code}"


def parse_code(spec) -> Code:
    if isinstance(spec, Code):
        return spec
    if isinstance(spec, dict):
        try:
            return Code(int(spec["layer"]), str(spec["site"]), int(spec["head"]),
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
    return Code(int(layer), site.lower(), int(head), int(code))


def parse_codes(spec) -> list[Code]:
    """Codes from ``"3:attn_heads:2:117,4:mlp_out:0:9"``, a JSON list, or a list."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("["):
            try:
                return parse_codes(json.loads(text))
            except json.JSONDecodeError as err:
                raise ValueError(f"codes JSON is not valid: {err}") from None
        return [parse_code(part) for part in text.split(",") if part.strip()]
    return [parse_code(item) for item in spec]


@dataclasses.dataclass
class SteerSpec:
    """What to force on and block, and how (see the module docstring)."""

    codes: list = dataclasses.field(default_factory=list)
    strength: float = 1.0
    mode: str = "add"
    positions: str = "all"
    block: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.codes = parse_codes(self.codes)
        self.block = parse_codes(self.block)
        if self.mode not in MODES:
            raise ValueError(f"steering mode must be one of {MODES}, got {self.mode!r}")
        if self.positions not in POSITIONS:
            raise ValueError(
                f"steering positions must be one of {POSITIONS}, got {self.positions!r}"
            )
        try:
            self.strength = float(self.strength)
        except (TypeError, ValueError):
            raise ValueError(f"steering strength must be a number, got {self.strength!r}") from None
        if not math.isfinite(self.strength):
            raise ValueError(f"steering strength must be finite, got {self.strength}")
        overlap = set(self.codes) & set(self.block)
        if overlap:
            raise ValueError(f"codes both forced and blocked: {sorted(map(str, overlap))}")


def topic_spec(topics: dict, name: str, **overrides) -> SteerSpec:
    """The preset ``name`` of a ``topics.json`` mapping; ``overrides`` (e.g. ``strength``) win."""
    if name not in topics:
        known = ", ".join(sorted(topics)) or "none"
        raise ValueError(f"unknown topic {name!r}; this bundle's topics: {known}")
    preset = topics[name]
    if not isinstance(preset, dict) or "codes" not in preset:
        raise ValueError(f"topic {name!r} has no 'codes' list")
    fields = {key: preset[key] for key in _TOPIC_KEYS if key in preset}
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return SteerSpec(**fields)


def steering_arrays(sites: list[dict], spec: SteerSpec) -> dict[tuple[int, str], tuple]:
    """Per-site ``(bias, scale)`` float32 arrays ``[groups, num_codes]`` for the sites the spec
    touches. ``sites`` are the manifest's entries (``layer``, ``site``, ``groups``, ``num_codes``,
    ``k``). Unknown sites and out-of-range ids raise ``ValueError``."""
    by_key = {(s["layer"], s["site"]): s for s in sites}
    result: dict = {}

    def entry(ref: Code):
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

    for ref in spec.block:
        entry(ref)[0][ref.head, ref.code] = -np.inf
    forced: dict = {}
    for ref in spec.codes:
        entry(ref)[1][ref.head, ref.code] = spec.strength
        forced.setdefault((ref.layer, ref.site, ref.head), set()).add(ref.code)
    for (layer, site, head), codes in forced.items():
        k = by_key[(layer, site)]["k"]
        if len(codes) > k:
            raise ValueError(f"{len(codes)} codes forced at layer {layer} {site} head {head}, "
                             f"but only k={k} can be active at once")
        bias = result[(layer, site)][0][head]
        if spec.mode == "replace":
            bias[:] = -np.inf
        bias[sorted(codes)] = np.inf
    return result
