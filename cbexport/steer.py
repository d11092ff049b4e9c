"""Steering for exported models, with numpy only: code lists and topic presets become the per-site
``bias`` and ``scale`` inputs of the exported decoder.

What a steering is, and its per-site arrays, is :mod:`codebook.steering_spec` (torch-free: eager
models build their torch tensors from the same arrays); this module adds only what bundles need
on top: a steering from a bundle's topic presets. Codes are
written ``LAYER:SITE:HEAD:CODE`` (also ``L3.attn_heads.H2.C117``), comma-separated, or as a JSON
list of ``{"layer", "site", "head", "code"}`` objects.

The runtime realises ``positions`` by feeding the steering on the prompt step (``"prompt"``), the
decode steps (``"generated"``), or both (``"all"``).
"""

from __future__ import annotations

from codebook.steering_spec import Steering, preset_steering


def topic_spec(topics: dict, name: str, **overrides) -> Steering:
    """The preset ``name`` of a ``topics.json`` mapping; ``overrides`` (e.g. ``strength``) that
    are not ``None`` win."""
    if name not in topics:
        known = ", ".join(sorted(topics)) or "none"
        raise ValueError(f"unknown topic {name!r}; this bundle's topics: {known}")
    try:
        return preset_steering(topics[name], **overrides)
    except ValueError as err:
        raise ValueError(f"topic {name!r}: {err}") from None
