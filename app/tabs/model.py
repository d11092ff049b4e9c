"""The Model tab: load another model (Hub repo id, optionally @revision), and read the session's
model: its shape and metrics, its training plots and its model card. The load event itself is
wired in :mod:`app.ui`, since a new model changes every tab."""

from __future__ import annotations

import dataclasses

import gradio as gr

from app import model_info
from app.models import LoadedModel, download_note
from app.tabs import AppContext
from codebook.original import KNOWN_ORIGINALS


@dataclasses.dataclass
class ModelTab:
    name: gr.Textbox
    load: gr.Button
    status: gr.Markdown
    facts: gr.Markdown
    plots: list[gr.Image]  # one per model_info.PLOTS
    card: gr.Markdown
    size: gr.Markdown | None = None  # what the name in the box would download, before loading
    paper: gr.Dropdown | None = None  # the paper's released models, to fill the box


def texts(loaded: LoadedModel) -> list[str]:
    """The tab's ``facts`` and ``card`` for a newly loaded model."""
    return [model_info.facts(loaded), model_info.card(loaded)]


def plot_updates(ctx: AppContext, loaded: LoadedModel) -> list:
    """Each plot of a newly loaded model, shown only if the model has it."""
    plots = model_info.plots(loaded, ctx.workdir / "plots")
    return [gr.update(value=path, visible=path is not None) for path in plots.values()]


def build(ctx: AppContext, start: LoadedModel) -> ModelTab:
    with gr.Row(equal_height=False):
        name = gr.Textbox(start.label, label="Model",
                          info="'default', or a Hub repo id: owner/name or owner/name@revision",
                          scale=4, elem_id="model-name")
        load = gr.Button("Load", variant="primary", scale=1, min_width=90)
    paper = gr.Dropdown(list(KNOWN_ORIGINALS), value=None, label="The paper's released models",
                        info="fills the box; their base models come from a table in the code")
    size = gr.Markdown(elem_classes="hint", elem_id="model-size")
    paper.input(lambda repo: repo or gr.skip(), [paper], [name], api_visibility="private",
                show_progress="hidden")
    # Before loading: the size of what the name in the box would fetch (a public endpoint, so
    # API clients can ask too). Typing fires it often: only the last value is sized.
    name.change(lambda text: download_note(text, ctx.settings), [name], [size],
                api_name="model_size", trigger_mode="always_last", show_progress="hidden",
                concurrency_limit=4, concurrency_id="model_size")
    status = gr.Markdown(elem_classes="hint")
    facts = gr.Markdown(model_info.facts(start))
    paths = model_info.plots(start, ctx.workdir / "plots")
    plots = [gr.Image(paths[name], label=caption, type="filepath", interactive=False,
                      visible=paths[name] is not None, buttons=["fullscreen", "download"])
             for name, caption in model_info.PLOTS.items()]
    # Closed: a model card runs to thousands of pixels (the default model's made the tab 7,500 px
    # tall), and the facts and plots above say what most visitors want to know.
    with gr.Accordion("Model card", open=False, elem_id="model-card"):
        card = gr.Markdown(model_info.card(start))
    return ModelTab(name, load, status, facts, plots, card, size, paper)
