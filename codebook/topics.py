"""Topic presets: named steering settings found by topic search, kept in ``topics.json``.

``topics.json`` sits beside a model (the default model ships one). It maps a topic name to::

    {
      "regex": "dragon",                 # what marks the topic's documents / a steered success
      "codes": [{"layer": 3, "site": "attn_heads", "head": 5, "code": 117}, ...],
      "strength": 1.0,                   # Steering.strength: scale of the forced codes
      "mode": "add",                     # Steering.mode: "add" or "replace"
      "positions": "all",                # Steering.positions (optional, default "all")
      "stats": {...}                     # how the codes were found and how they steer
    }

``codes``, ``strength``, ``mode``, ``positions`` (and an optional ``block`` list) are exactly the
fields of :class:`codebook.steering.Steering`, so a preset is a steering; the exporter's runtime and
the app read the same keys. ``stats`` is free-form: the topic search (documents, topic documents,
each code's precision and recall) and the steering evaluation (baseline and steered rates,
fluency) that justified the preset. Other keys are kept but ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from codebook.steering import Steering

TOPICS_NAME = "topics.json"

# The paper's TinyStories topics and their success regexes. "princess" stands for royalty; a word
# boundary before each stem keeps "king" from matching inside "looking" or "making".
PAPER_TOPICS = {
    "dragon": "dragon",
    "slide": "slide",
    "friend": "friend",
    "flower": "flower",
    "fire": "fire",
    "baby": "baby",
    "princess": r"\b(?:prince|crown|king|castle)",
}

_STEERING_KEYS = ("codes", "strength", "mode", "positions", "block")


def topics_path(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    return path / TOPICS_NAME if path.is_dir() else path


def load_topics(model_dir: str | Path) -> dict:
    """The presets of ``topics.json`` in ``model_dir`` (or that file), validated; ``{}`` when the
    model has none."""
    path = topics_path(model_dir)
    if not path.is_file():
        return {}
    try:
        topics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(topics, dict):
        raise ValueError(f"{path} must hold an object mapping topic names to presets")
    for name, preset in topics.items():
        try:
            preset_steering(preset)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: topic {name!r} is not a valid preset: {err}") from None
    return topics


def save_topics(model_dir: str | Path, topics: dict) -> Path:
    """Write ``topics`` (validating every preset first) and return the path."""
    for name, preset in topics.items():
        preset_steering(preset)
        if not isinstance(preset.get("regex"), str):
            raise ValueError(f"topic {name!r} needs a 'regex' string")
    path = topics_path(model_dir)
    path.write_text(json.dumps(topics, indent=1) + "\n")
    return path


def preset_steering(preset: dict, **overrides) -> Steering:
    """The :class:`Steering` a preset describes; ``overrides`` that are not ``None`` win."""
    if not isinstance(preset, dict) or not isinstance(preset.get("codes"), list):
        raise ValueError("a topic preset must be an object with a 'codes' list")
    fields = {key: preset[key] for key in _STEERING_KEYS if key in preset}
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return Steering(**fields)


def make_preset(regex: str, steering: Steering, stats: dict) -> dict:
    """A preset from a steering and the statistics that justify it."""
    data = steering.to_dict()
    preset = {"regex": regex, "codes": data["codes"], "strength": data["strength"],
              "mode": data["mode"], "positions": data["positions"]}
    if data["block"]:
        preset["block"] = data["block"]
    preset["stats"] = stats
    return preset

