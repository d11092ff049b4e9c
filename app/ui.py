"""The whole interface: a short introduction, the five tabs, and the events that cross tabs
(loading a model changes every tab; "steer with this code" fills the Steer tab)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import inputs
from app.analysis import code_labels
from app.errors import endpoint, reported
from app.exporting import ExportCache
from app.models import LoadedModel, ModelRegistry
from app.settings import Settings
from app.tabs import AppContext, codes, export, model, steer, tokens

PAPER = "https://arxiv.org/abs/2310.17230"
INTRO = f"""# Codebook Features Studio
A tiny language model that writes children's stories, built so that what happens inside it can be
read and steered. At each word it writes, every attention head (one of the small parts that decide
what to carry forward) must express its output as a handful of **codes**: entries picked from a
learned list, the head's *codebook*. Many codes stand for one thing (a topic, a character, the end
of a sentence), so **switching on a topic's codes turns the story toward that topic**.

**Try it**: pick a topic, press **Generate** and compare the two stories: same beginning, same
random choices, only the codes differ ([the paper]({PAPER}))."""


def model_line(loaded: LoadedModel) -> str:
    topics = f", {len(loaded.topics)} topic presets" if loaded.topics else ", no topic presets"
    return f"Model: `{loaded.label}`{topics} (change it on the Model tab)."


def build_demo(registry: ModelRegistry, settings: Settings, workdir: Path) -> gr.Blocks:
    start = registry.start_model()
    with gr.Blocks(title="Codebook Features Studio", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        header = gr.Markdown(model_line(start), elem_classes="hint")
        model_state = gr.State(start.name)
        ctx = AppContext(registry, settings, workdir, ExportCache(workdir / "exports"),
                         model_state)
        with gr.Tabs() as tabs:
            with gr.Tab("Steer", id="steer"):
                steer_tab = steer.build(ctx, start)
            with gr.Tab("Codes", id="codes"):
                codes_tab = codes.build(ctx, start)
            with gr.Tab("Token view", id=tokens.TAB_ID):
                tokens.build(ctx, steer_tab, tabs)
            with gr.Tab("Export", id="export"):
                export.build(ctx, steer_tab)
            with gr.Tab("Model", id="model"):
                model_tab = model.build(ctx, start)

        def steer_with(code: str | None, codes_now: list[str] | None, model_now: str):
            if not code:
                return gr.skip(), gr.skip(), gr.skip()
            label = code_labels(ctx.model(model_now), [code]).get(code, "")
            label = f" ({label})" if label else ""
            return (steer.chips(steer.with_code(codes_now, code)), gr.Tabs(selected="steer"),
                    f"Added code `{code}`{label} to the steering set. Press **Generate**.")

        codes_tab.steer_with.click(steer_with,
                                   [codes_tab.current, steer_tab.codes, model_state],
                                   [steer_tab.codes, tabs, steer_tab.status],
                                   api_visibility="private")

        # The endpoint returns plain texts (what API clients get); the browser also updates
        # what depends on the model's shape: plots, topic buttons, the code browser's choices.
        # A failed load changes nothing but the Model tab's status line (and a notice).
        def load_model(name: str):
            loaded = registry.load_for_visitor(name)
            return [loaded.name, f"Loaded `{loaded.label}`.", model_line(loaded),
                    *model.texts(loaded), steer.topic_hint(loaded), steer.chips([]),
                    steer.search_note(loaded), codes.shape_note(loaded)]

        def show_model(name: str):
            loaded = ctx.model(name)
            site, head, code = codes.first_code(loaded)
            return [*model.plot_updates(ctx, loaded), *steer.topic_buttons(loaded), [],
                    gr.update(choices=codes.site_choices(loaded), value=site), head, code]

        def load_and_show(name: str):
            texts = load_model(name)
            return [*texts, *show_model(texts[0])]

        texts_out = [model_state, model_tab.status, header, model_tab.facts, model_tab.card,
                     steer_tab.hint, steer_tab.codes, steer_tab.search_summary,
                     codes_tab.index_note]
        model_outputs = [*texts_out, *model_tab.plots, *steer_tab.topic_buttons,
                         steer_tab.selected, codes_tab.site, codes_tab.head, codes_tab.code]
        endpoint([model_tab.load.click, model_tab.name.submit], load_model, [model_tab.name],
                 texts_out, status=model_tab.status, api_name="load_model",
                 concurrency_limit=1, concurrency_id="load", preprocess=False,
                 browser=load_and_show, browser_outputs=model_outputs,
                 show_progress_on=[model_tab.status])

        # A share link (steer.LINK_KEYS in the URL): its model loaded if it is another, its
        # prompt, seed and steering set filled in, then Generate pressed, which writes the pair
        # the link was made from. A bad link changes nothing and says why.
        # Not a State: a State's value stays on the server, and the click is the page's.
        opened = gr.Checkbox(False, visible=False)
        link_outputs = [*model_outputs, model_tab.name, steer_tab.prompt, steer_tab.strength,
                        steer_tab.mode, steer_tab.positions, steer_tab.seed, steer_tab.random_seed,
                        steer_tab.temperature, steer_tab.max_tokens, steer_tab.highlight,
                        steer_tab.status, steer_tab.blocked, steer_tab.code_strengths, opened]

        def open_link(request: gr.Request):
            link = steer.read_link(dict(request.query_params), settings.max_new_tokens)
            if link is None:
                return [gr.skip()] * len(link_outputs)
            shown = [gr.skip()] * len(model_outputs)
            name = start.name
            if link.model is not None and link.model not in (start.name, start.label):
                shown = load_and_show(link.model)
                name = shown[0]
            loaded = ctx.model(name)
            try:
                steering = inputs.steering(loaded, link.codes, link.strength, link.mode,
                                           link.positions, link.block, link.code_strengths)
            except inputs.InputError as err:
                raise inputs.InputError(f"the share link's steering set: {err}") from None
            shown[model_outputs.index(steer_tab.codes)] = steer.chips(link.codes)
            note = (f"Opened a share link: seed {link.seed}, {len(link.codes)} codes, model "
                    f"`{loaded.label}`. Writing its pair of stories…")
            return [*shown, loaded.label, link.prompt, link.strength, link.mode, link.positions,
                    link.seed, False, link.temperature, link.max_tokens, link.highlight, note,
                    steer.chips(link.block), steer.strengths_text(steering), True]

        demo.load(reported(open_link, len(link_outputs), link_outputs.index(steer_tab.status)),
                  None, link_outputs, api_visibility="private", show_progress="hidden").then(
            None, [opened], None, api_visibility="private",
            js="(opened) => { if (opened) document.getElementById('generate').click(); }")
    return demo
