"""The Model tab's content: the model card, its shape and metrics, and the plots training left
beside it (``loss.png``, ``code_usage.png``: see ``training/report.py``)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from app.analysis import has_index
from app.models import LoadedModel

PLOTS = {"loss.png": "Training curves", "code_usage.png": "Code usage"}
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


def card(loaded: LoadedModel) -> str:
    """The model card (README.md) without its YAML front matter."""
    path = loaded.directory / "README.md"
    if not path.is_file():
        return f"*{loaded.label} has no model card (README.md).*"
    return _FRONT_MATTER.sub("", path.read_text(encoding="utf-8", errors="replace")).strip()


def facts(loaded: LoadedModel) -> str:
    """A Markdown list: architecture, codebooks, topics, index and evaluation metrics."""
    model, cfg = loaded.model, loaded.model.codebook_config
    layers = model.codebook_layers()
    first = next(iter(layers.values()))
    params = sum(p.numel() for p in model.base.parameters())
    rows = [
        ("model", f"`{loaded.label}`"),
        ("architecture", f"{type(model.base).__name__}, {model.config.num_hidden_layers} layers, "
                         f"{params:,} parameters"),
        ("codebooks", f"{len(layers)} sites ({', '.join(cfg.sites)}), {first.groups} per site "
                      f"(one per head), {cfg.num_codes} codes each"),
        ("active codes", f"k = {cfg.k} per codebook, {cfg.combine} of the {cfg.similarity} "
                         "top-k"),
        ("topic presets", ", ".join(loaded.topics) or "none"),
        ("code index", "yes" if has_index(loaded) else "none (Codes tab limited)"),
    ]
    evaluation = loaded.directory / "eval.json"
    if evaluation.is_file():
        metrics = json.loads(evaluation.read_text())
        rows += _metric_rows(metrics)
    return "\n".join(f"- **{key}**: {value}" for key, value in rows)


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for label, entry in (("with codebooks", metrics),
                         ("codebooks off", metrics.get("without_codebooks"))):
        if isinstance(entry, dict) and "loss" in entry:
            rows.append((f"validation, {label}",
                         f"loss {entry['loss']:.3f} nats/token, next-token accuracy "
                         f"{entry.get('accuracy', float('nan')):.1%}"))
    return rows


def plots(loaded: LoadedModel, served_dir: Path) -> dict[str, str | None]:
    """Each of :data:`PLOTS` → its path, copied under ``served_dir`` (the app serves files only
    from its own temporary directory, never from a model's folder), or ``None`` if the model has
    no such plot."""
    key = hashlib.sha256(str(loaded.directory).encode()).hexdigest()[:16]
    result: dict[str, str | None] = {}
    for name in PLOTS:
        source = loaded.directory / name
        result[name] = None
        if source.is_file():
            target = served_dir / key / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            result[name] = str(target)
    return result
