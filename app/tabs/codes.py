"""The Codes tab: browse a code by layer, head and number (its top activating contexts with the
hit highlighted, how often it fires, the tokens it promotes), search codes by regex (precision and
recall, sortable), and send a code to the Steer tab's steering set."""

from __future__ import annotations

import dataclasses
import html

import gradio as gr
import pandas as pd

from app import inputs
from app.analysis import code_details, code_labels, code_search, has_index, index_summary
from app.errors import endpoint, reported
from app.gpu import gpu
from app.models import LoadedModel
from app.tabs import AppContext
from codebook.steering import CodeRef

SEARCH_HEADERS = ["code", "promotes", "precision", "recall", "F1", "hits", "count",
                  "example contexts (hit in [brackets])"]


@dataclasses.dataclass
class CodesTab:
    site: gr.Dropdown
    head: gr.Number
    code: gr.Number
    index_note: gr.Markdown
    steer_with: gr.Button
    current: gr.State  # the code shown, as LAYER:SITE:HEAD:CODE


def site_choices(loaded: LoadedModel) -> list[tuple[str, str]]:
    return [(f"layer {layer} · {site}", f"{layer}:{site}")
            for layer, site in loaded.model.codebook_layers()]


def shape_note(loaded: LoadedModel) -> str:
    """What the visitor can browse, and whether contexts and search are available."""
    first = next(iter(loaded.model.codebook_layers().values()))
    shape = (f"Each codebook has **{first.num_codes} codes**; at every token **{first.k}** of them "
             f"are active in each of the **{first.groups} heads** of a site.")
    if has_index(loaded):
        return f"{shape} Contexts come from the model's index ({index_summary(loaded)})."
    return (f"{shape} **This model has no code index**, so only promoted tokens can be shown; "
            "contexts and regex search need one (`python -m codebook index`).")


def contexts_html(contexts: list[dict] | None) -> str:
    if contexts is None:
        return "<p class='hint'>No index: contexts are not available for this model.</p>"
    if not contexts:
        return "<p class='hint'>This code never fires in the indexed stories.</p>"

    def show(text: str) -> str:
        return html.escape(text).replace("\n", "↵ ")

    items = "".join(f"<li>{show(c['before'])}<mark>{show(c['token']) or '∅'}</mark>"
                    f"{show(c['after'])}</li>" for c in contexts)
    return (f"<p><b>Where it fires</b>: its top activating contexts in the indexed stories, the "
            f"token it fired on highlighted</p><ol class='contexts'>{items}</ol>")


def summary_markdown(details: dict, label: str = "") -> str:
    lines = [f"### Code `{details['code']}`" + (f" · {label}" if label else "")]
    if details["count"] is not None:
        lines.append(f"Fires on **{details['count']:,}** of {details['indexed_tokens']:,} indexed "
                     f"tokens ({100 * details['frequency']:.3f}%), in {details['documents']:,} of "
                     f"{details['indexed_documents']:,} stories.")
    promoted = details["promoted_tokens"]
    if promoted:
        shown_tokens = ", ".join(f"`{t['token']!r}` ({t['logit']:+.2f})" for t in promoted)
        lines.append(f"**Promotes** (direct effect on the next-token logits): {shown_tokens}")
    return "\n\n".join(lines)


def first_code(loaded: LoadedModel) -> tuple[str, int, int]:
    """What the browser shows first: the first code of the first topic preset (a code that means
    something), else code 0 of the first head."""
    for preset in loaded.topics.values():
        for code in preset.get("codes", []):
            return f"{code['layer']}:{code['site']}", int(code["head"]), int(code["code"])
    return site_choices(loaded)[0][1], 0, 0


def build(ctx: AppContext, start: LoadedModel) -> CodesTab:
    index_note = gr.Markdown(shape_note(start), elem_classes="hint")
    first_site, first_head, first_number = first_code(start)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Browse a code")
            site = gr.Dropdown(site_choices(start), value=first_site, label="Layer and site")
            with gr.Row():
                head = gr.Number(first_head, label="Head", precision=0, minimum=0)
                code = gr.Number(first_number, label="Code", precision=0, minimum=0)
            show = gr.Button("Show code", variant="primary")
        with gr.Column(scale=2):
            gr.Markdown("### Search codes by regex")
            with gr.Row(equal_height=False):
                regex = gr.Textbox(label="Regex over the indexed stories",
                                   placeholder=r"e.g. \bdragon or [.!?]$", scale=4)
                search = gr.Button("Search", scale=1, min_width=90)
            search_summary = gr.Markdown(elem_classes="hint")
            table = gr.Dataframe(headers=SEARCH_HEADERS, interactive=False, wrap=True,
                                 datatype=["str", "str"] + ["number"] * 5 + ["str"], max_height=360,
                                 label="Codes by F1 (click a header to sort, a row to open)",
                                 column_widths=["21%", "13%", "10%", "8%", "6%", "6%", "7%", "29%"])
    summary = gr.Markdown()
    steer_with = gr.Button("Steer with this code", variant="primary", visible=False)
    contexts = gr.HTML()
    current = gr.State(None)

    @gpu()  # promoted tokens multiply the model's weights
    def show_code(site_now: str, head_now, code_now, model_name: str):
        loaded = ctx.model(model_name)
        layer, _, site_name = inputs.text(site_now, "layer and site").partition(":")
        if not layer.isdigit() or not site_name:
            raise inputs.InputError(f"layer and site must be LAYER:SITE, e.g. "
                                    f"{site_choices(loaded)[0][1]}; got {site_now!r}")
        ref = CodeRef(int(layer), site_name, inputs.integer(head_now, "head", 0, 10**6),
                      inputs.integer(code_now, "code", 0, 10**9))
        details = code_details(loaded, ref)
        label = code_labels(loaded, [ref]).get(str(ref), "")
        return (summary_markdown(details, label), contexts_html(details["contexts"]),
                gr.update(visible=True), str(ref))

    code_outputs = [summary, contexts, steer_with, current]
    endpoint([show.click, code.submit], show_code, [site, head, code, ctx.model_state],
             code_outputs, status=summary, api_name="code", preprocess=False)

    def search_codes(pattern: str, model_name: str):
        loaded = ctx.model(model_name)
        rows, note = code_search(loaded, inputs.regex(pattern))
        labels = code_labels(loaded, [r["name"] for r in rows])
        frame = pd.DataFrame([[r["name"], labels.get(r["name"], ""), round(r["precision"], 3),
                               round(r["recall"], 3), round(r["score"], 3), r["hits"],
                               r["count"], r["example"]] for r in rows], columns=SEARCH_HEADERS)
        return frame, note + ". Click a row to open the code."

    endpoint([search.click, regex.submit], search_codes, [regex, ctx.model_state],
             [table, search_summary], status=search_summary, api_name="search_codes",
             preprocess=False)

    def open_row(evt: gr.SelectData):
        row = evt.row_value or []
        try:
            ref = CodeRef.parse(str(row[0]))
        except (IndexError, ValueError):
            return gr.skip(), gr.skip(), gr.skip()
        return f"{ref.layer}:{ref.site}", ref.head, ref.code

    table.select(open_row, None, [site, head, code], api_visibility="private").then(
        reported(show_code, len(code_outputs), 0), [site, head, code, ctx.model_state],
        code_outputs, api_visibility="private", preprocess=False)

    return CodesTab(site, head, code, index_note, steer_with, current)
