"""Topic presets: named steering settings found by topic search, kept in ``topics.json``.

``topics.json`` sits beside a model (the default model ships one), or in one's own data directory
for models whose folder is not one's own (a Hub model, the default model: see
:mod:`codebook.analysis.userdata`, which says where it is read and written). It maps a topic name
to::

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

from codebook.analysis.userdata import analysis_file, replace_file
from codebook.steering import Steering, preset_steering  # the spec's one reading of a preset

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


def topics_path(model_dir: str | Path) -> Path:
    """The ``topics.json`` to read for ``model_dir`` (one's own copy first), or ``model_dir``
    itself when it is a file."""
    path = Path(model_dir)
    return analysis_file(path, TOPICS_NAME) if path.is_dir() else path


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


def save_topics(target: str | Path, topics: dict) -> Path:
    """Write ``topics`` (validating every preset first) to ``target``, a ``topics.json`` or a
    directory to hold one, and return the path."""
    for name, preset in topics.items():
        preset_steering(preset)
        if not isinstance(preset.get("regex"), str):
            raise ValueError(f"topic {name!r} needs a 'regex' string")
    path = Path(target)
    if path.is_dir():
        path = path / TOPICS_NAME
    text = json.dumps(topics, indent=1) + "\n"
    return replace_file(path, lambda temporary: temporary.write_text(text))


def make_preset(regex: str, steering: Steering, stats: dict) -> dict:
    """A preset from a steering and the statistics that justify it."""
    data = steering.to_dict()
    preset = {"regex": regex, "codes": data["codes"], "strength": data["strength"],
              "mode": data["mode"], "positions": data["positions"]}
    if data["block"]:
        preset["block"] = data["block"]
    if "code_strengths" in data:  # only when some code has a strength of its own
        preset["code_strengths"] = data["code_strengths"]
    preset["stats"] = stats
    return preset



def plot_presets(topics: dict, path: str | Path) -> Path:
    """A PNG of how the presets steer, from their stats: per topic the unsteered and steered
    rates of the steering evaluation (with its fluency ratio above the bars) and, where a preset
    was calibrated, every calibration setting's rate against its fluency ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = {name: p["stats"]["steer_eval"] for name, p in topics.items()
                 if "steer_eval" in p.get("stats", {})}
    if not evaluated:
        raise ValueError("no preset has a steering evaluation (stats.steer_eval) to plot")
    calibrated = {name: p["stats"]["calibration"] for name, p in topics.items()
                  if "calibration" in p.get("stats", {})}
    fig, axes = plt.subplots(1, 2 if calibrated else 1, figsize=(13 if calibrated else 7, 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    names = list(evaluated)
    xs = range(len(names))
    base = [100 * evaluated[n]["baseline"]["rate"] for n in names]
    steered = [100 * evaluated[n]["steered"]["rate"] for n in names]
    ax.bar([x - 0.2 for x in xs], base, 0.4, label="unsteered", color="tab:gray")
    ax.bar([x + 0.2 for x in xs], steered, 0.4, label="steered", color="tab:blue")
    for x, n, height in zip(xs, names, steered, strict=True):
        ratio = evaluated[n].get("fluency_ratio")
        if ratio is not None:
            ax.text(x + 0.2, height + 1, f"{ratio:.2f}x", ha="center", fontsize=7)
    first = evaluated[names[0]]
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="stories mentioning the topic (%)", ylim=(0, 105),
           title=f"steering evaluation (seed {first.get('seed')}, "
                 f"{first.get('samples_per_prompt')} samples x {len(first.get('prompts', []))} "
                 "prompts; fluency ratio above)")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if calibrated:
        ax = axes[0, 1]
        markers = {"add": "o", "replace": "^"}  # records from before the mode grid: add
        for name, record in calibrated.items():
            color = None
            for mode, marker in markers.items():
                trials = [t for t in record["trials"] if t["fluency_ratio"] is not None
                          and t.get("mode", "add") == mode]
                if trials:
                    line, = ax.plot([t["fluency_ratio"] for t in trials],
                                    [100 * t["rate"] for t in trials], marker, ms=4, alpha=0.6,
                                    color=color, label=name if color is None else None)
                    color = line.get_color()
            chosen = record["trials"][record["chosen"]]
            if chosen["fluency_ratio"] is not None:
                ax.plot(chosen["fluency_ratio"], 100 * chosen["rate"], "*", ms=12,
                        color=color, markeredgecolor="black")
        limit = next(iter(calibrated.values())).get("max_fluency")
        if limit is not None:
            ax.axvline(limit, color="black", ls="--", lw=1, label=f"limit {limit:g}x")
        ax.set(xlabel="fluency ratio (steered / unsteered loss)", ylabel="steered (%)",
               title="calibration settings (seed "
                     f"{next(iter(calibrated.values())).get('seed')}; o add, ^ replace; "
                     "star: chosen)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
