"""The app's tabs, one module each; every ``build`` function lays out its tab inside the current
``gr.Blocks`` and wires the tab's events. :class:`AppContext` is what they share."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from app.exporting import ExportCache
from app.models import LoadedModel, ModelRegistry
from app.settings import Settings


@dataclasses.dataclass
class AppContext:
    registry: ModelRegistry
    settings: Settings
    workdir: Path  # the app's own temporary directory: the only place files are served from
    exports: ExportCache
    model_state: gr.State  # this session's model name

    def model(self, name: str) -> LoadedModel:
        return self.registry.get(name)
