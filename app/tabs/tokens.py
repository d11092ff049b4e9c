"""The Token view tab: a text split into tokens; click one to see the codes chosen there in every
head (and which of them the steering forced). A story generated on the Steer tab opens here with
its exact tokens and steering."""

from __future__ import annotations

import dataclasses

import gradio as gr
import pandas as pd

from app import inputs
from app.analysis import code_labels
from app.errors import endpoint, reported
from app.generation import continuation_text
from app.gpu import gpu
from app.tabs import AppContext
from app.tabs.steer import SteerTab, strengths_text
from app.token_view import TokenCodes, token_codes
from codebook.steering import CodeRef, Steering
from codebook.text import encode_document

TAB_ID = "tokens"
COLORS = {"even": "#e0f2fe", "odd": "#fef3c7"}
STEERING_CHOICES = [("off", "off"), ("the Steer tab's steering set", "on")]
HEADERS = ["layer", "site", "head", "codes (best first)", "forced by steering"]
MAX_TOKENS = 1024


@dataclasses.dataclass
class TokensTab:
    text: gr.Textbox


def _shown_token(text: str) -> str:
    return "«start»" if text == "" else text.replace("\n", "↵")


def token_segments(view: TokenCodes) -> list[tuple[str, str]]:
    return [(_shown_token(t), "even" if i % 2 == 0 else "odd") for i, t in enumerate(view.tokens)]


def build(ctx: AppContext, steer: SteerTab, tabs: gr.Tabs) -> TokensTab:
    gr.Markdown("Every token passes through every codebook: click a token to see the codes "
                "chosen for it in each head. Codes forced by steering are listed separately.",
                elem_classes="hint")
    text = gr.Textbox(label="Text", lines=3, max_lines=8,
                      placeholder="Generate a story on the Steer tab and press 'Codes of this "
                                  "story', or type any text")
    with gr.Row(equal_height=False):
        steering_choice = gr.Radio(STEERING_CHOICES, value="off", label="Steering", scale=3)
        show = gr.Button("Show tokens", variant="primary", scale=1, min_width=140)
    tokens = gr.HighlightedText(label="Tokens (click one)", color_map=COLORS, show_legend=False,
                                show_inline_category=False, interactive=False)
    selected = gr.Markdown(elem_classes="hint")
    table = gr.Dataframe(headers=HEADERS, interactive=False, max_height=420, wrap=True)
    # The exact token ids of a story opened from the Steer tab (re-encoding its text could split
    # it into other tokens), used while the text box still holds that story.
    source = gr.State(None)
    view = gr.State(None)

    @gpu()
    def show_tokens(text_now: str, choice: str, model_name: str, codes, strength, mode,
                    positions, prompt: str, source_now: dict | None, blocked=None,
                    code_strengths=None):
        loaded = ctx.model(model_name)
        if not inputs.text(text_now, "the text").strip():
            raise inputs.InputError("the text is empty: generate a story or type some text")
        inputs.choice(choice, "steering", [value for _, value in STEERING_CHOICES])
        prompt = inputs.text(prompt, "the prompt")
        if len(text_now) > ctx.settings.max_prompt_chars * 4:
            raise inputs.InputError(f"the text has {len(text_now):,} characters; the limit is "
                                    f"{ctx.settings.max_prompt_chars * 4:,}")
        if source_now and source_now["text"] == text_now:
            ids, prompt_length = source_now["ids"], source_now["prompt_length"]
        else:
            ids = encode_document(loaded.tokenizer, text_now)
            same_prompt = bool(prompt) and text_now.startswith(prompt)
            prompt_length = len(encode_document(loaded.tokenizer, prompt)) if same_prompt \
                else len(ids)
        limit = min(MAX_TOKENS, loaded.max_positions or MAX_TOKENS)
        if len(ids) > limit:
            raise inputs.InputError(f"the text has {len(ids)} tokens; this view shows at most "
                                    f"{limit}")
        steering = inputs.steering(loaded, codes, strength, mode, positions, blocked,
                                   code_strengths)
        if choice == "off":
            steering = None
        elif steering is None:
            raise inputs.InputError("the steering set is empty: choose codes on the Steer "
                                    "tab, or set Steering to off")
        result = token_codes(loaded, ids, prompt_length, steering)
        note = f"{len(ids)} tokens. Click one to see its codes."
        return token_segments(result), note, pd.DataFrame(columns=HEADERS), result

    token_inputs = [text, steering_choice, ctx.model_state, steer.codes, steer.strength,
                    steer.mode, steer.positions, steer.prompt, source, steer.blocked,
                    steer.code_strengths]
    token_outputs = [tokens, selected, table, view]
    endpoint([show.click, text.submit], show_tokens, token_inputs, token_outputs,
             status=selected, api_name="tokens", preprocess=False)

    def pick(view_now: TokenCodes | None, model_name: str, evt: gr.SelectData):
        if view_now is None or not isinstance(evt.index, int):
            return gr.skip(), gr.skip()
        position = evt.index
        rows = view_now.rows(position)
        try:
            labels = code_labels(ctx.model(model_name), [
                CodeRef(r["layer"], r["site"], r["head"], c) for r in rows for c in r["codes"]])
        except ValueError:  # the session's model changed since: codes without labels
            labels = {}

        def shown_codes(row: dict, codes: list[int]) -> str:
            """Each code number with its label: ``117 (dragon, fire)``."""
            return ", ".join(
                f"{c} ({label})" if (label := labels.get(
                    str(CodeRef(row["layer"], row["site"], row["head"], c)))) else str(c)
                for c in codes)

        frame = pd.DataFrame([[r["layer"], r["site"], r["head"], shown_codes(r, r["codes"]),
                               shown_codes(r, r["forced"])] for r in rows], columns=HEADERS)
        token = _shown_token(view_now.tokens[position])
        return f"Token {position}: **{token!r}** (id {view_now.token_ids[position]})", frame

    tokens.select(pick, [view, ctx.model_state], [selected, table], api_visibility="private")

    def open_story(side: int):
        def opener(last: dict | None, model_name: str):
            if not last:  # told in the Steer tab's status line, which the visitor sees
                return ([gr.skip()] * (len(opened_outputs) - 1)
                        + ["**Nothing to open yet**: press **Generate** first."])
            loaded = ctx.model(model_name)
            story = last["prompt"] + continuation_text(loaded, last["prompt_ids"],
                                                       last["tokens"][side])
            steered = side == 1 and last["steering"] is not None
            opened = {"text": story, "ids": last["prompt_ids"] + last["tokens"][side],
                      "prompt_length": len(last["prompt_ids"])}
            steering = Steering.from_json(last["steering"]) if steered else None
            codes = [str(c) for c in steering.codes] if steering else gr.skip()
            set_parts = ([steering.strength, steering.mode, steering.positions,
                          [str(c) for c in steering.block], strengths_text(steering)]
                         if steering else [gr.skip()] * 5)
            return (story, "on" if steered else "off", opened, gr.Tabs(selected=TAB_ID), codes,
                    *set_parts, gr.skip())

        return opener

    # The story's own steering is put back in the steering set, so the view shows what was
    # active while it was written even if the set was edited since.
    opened_outputs = [text, steering_choice, source, tabs, steer.codes, steer.strength,
                      steer.mode, steer.positions, steer.blocked, steer.code_strengths,
                      steer.status]
    shown_tokens = reported(show_tokens, len(token_outputs), token_outputs.index(selected))

    def show_opened(last: dict | None, *args):
        if not last:  # nothing was opened
            return [gr.skip()] * len(token_outputs)
        return shown_tokens(*args)

    for side, button in ((0, steer.inspect_unsteered), (1, steer.inspect_steered)):
        button.click(reported(open_story(side), len(opened_outputs), len(opened_outputs) - 1),
                     [steer.last, ctx.model_state], opened_outputs,
                     api_visibility="private").then(
            show_opened, [steer.last, *token_inputs], token_outputs, api_visibility="private",
            preprocess=False)

    return TokensTab(text)

