"""Steering: force codes on (or block them) while a model runs.

A :class:`Steering` names codes by :class:`CodeRef` (layer, site, head, code) and says how to
apply them. It becomes, per site, a score bias and an output scale that the codebook op reads:

* ``mode="add"``: each forced code gets an infinite score bias, so it enters the top-k and
  displaces the weakest code; the other ``k - 1`` codes are chosen as usual.
* ``mode="replace"``: in each steered group every other code is blocked, so the forced codes
  replace all ``k`` (with one forced code and ``combine="mean"``, the output is that code).
* ``strength`` multiplies the forced codes' vectors in the combination.
* ``block`` lists codes that may never be chosen.
* ``positions``: ``"all"`` tokens, only the ``"prompt"``, or only ``"generated"`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import torch

from codebook.layer import POSITIONS, LayerSteering

MODES = ("add", "replace")

_SPEC = re.compile(
    r"^\s*(?:L|layer)?(\d+)\s*[:./]\s*([a-z_]+)\s*[:./]\s*(?:H|head)?(\d+)\s*[:./]\s*(?:C|code)?(\d+)\s*$",
    re.IGNORECASE,
)


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
            return parse_codes(json.loads(text))
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

    def to_dict(self) -> dict:
        return {
            "codes": [c.to_dict() for c in self.codes],
            "strength": self.strength,
            "mode": self.mode,
            "positions": self.positions,
            "block": [c.to_dict() for c in self.block],
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

    def layer_steerings(self, layers: dict, prompt_length: int | None = None) -> dict:
        """Per-site :class:`LayerSteering`, keyed like ``layers`` (``(layer, site)`` →
        :class:`~codebook.layer.CodebookLayer`). Unknown sites and out-of-range ids raise."""
        result: dict = {}

        def entry(ref: CodeRef) -> LayerSteering:
            key = (ref.layer, ref.site)
            if key not in layers:
                available = ", ".join(f"{i}:{s}" for i, s in sorted(layers))
                raise ValueError(f"code {ref}: there is no codebook at layer {ref.layer} site "
                                 f"{ref.site!r}; codebooks are at {available}")
            layer = layers[key]
            if not 0 <= ref.head < layer.groups:
                raise ValueError(f"code {ref}: head must be in [0, {layer.groups}), got {ref.head}")
            if not 0 <= ref.code < layer.num_codes:
                raise ValueError(
                    f"code {ref}: code id must be in [0, {layer.num_codes}), got {ref.code}"
                )
            if key not in result:
                device = layer.codebook.device
                result[key] = LayerSteering(
                    bias=torch.zeros(layer.groups, layer.num_codes, device=device),
                    positions=self.positions,
                    prompt_length=prompt_length,
                )
            return result[key]

        for ref in self.block:
            entry(ref).bias[ref.head, ref.code] = -math.inf
        forced: dict = {}
        for ref in self.codes:
            steering = entry(ref)
            forced.setdefault((ref.layer, ref.site, ref.head), set()).add(ref.code)
            if self.strength != 1.0:
                if steering.scale is None:
                    steering.scale = torch.ones_like(steering.bias)
                steering.scale[ref.head, ref.code] = self.strength
        for (layer_idx, site, head), codes in forced.items():
            k = layers[(layer_idx, site)].k
            if len(codes) > k:
                raise ValueError(f"{len(codes)} codes forced at layer {layer_idx} {site} head "
                                 f"{head}, but only k={k} can be active at once")
            bias = result[(layer_idx, site)].bias[head]
            if self.mode == "replace":
                bias.fill_(-math.inf)
            bias[torch.tensor(sorted(codes), device=bias.device)] = math.inf
        return result
