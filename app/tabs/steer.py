"""The Steer tab, the first thing a visitor sees: a prompt, topic presets, a steering set of codes
(removable chips, blocked codes, strength, per-code strengths, mode, positions, shareable as
JSON), a topic search that finds codes for any word, and the unsteered and steered continuations
streamed side by side (a Stop button ends a generation and keeps what it wrote). Topic chips
toggle: each selected chip adds its preset's codes to the set, and the last one clicked sets
strength, mode and positions.

What a visitor types is checked where it is typed: a code chip the model does not have is taken
off again, and a number outside its box's range (the range the server runs) or a per-code
strength that would not run is put back to the last good value, each with a notice saying why.
Every event an API client can call takes its arguments unprocessed (``preprocess=False``) so that
the app's own checks, which name the argument, answer a bad one, and returns plain values of the
types ``view_api`` declares."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import threading
import time
import urllib.parse

import gradio as gr
import pandas as pd

from app import highlight, inputs
from app.analysis import code_labels, has_index, index_summary, labelled, topic_search
from app.errors import endpoint, reported, shown, warn
from app.generation import continuation_text, side_by_side
from app.gpu import gpu
from app.inputs import InputError
from app.models import LoadedModel
from app.tabs import AppContext
from codebook.analysis.topics import preset_steering
from codebook.steering import MODES, POSITIONS, CodeRef, Steering

MAX_TOPIC_BUTTONS = 12
# Streamed updates are sent at most this often: a small model writes faster than a browser
# needs to repaint, and every update is a message to every watching client.
STREAM_INTERVAL = 0.1
# The radio buttons' (label, value) pairs: a label for each mode and position of the spec.
_MODE_LABELS = {"add": "add: displace the weakest of the k active codes",
                "replace": "replace: replace all k active codes"}
_POSITION_LABELS = {"all": "all tokens", "prompt": "prompt only", "generated": "generated only"}
MODE_CHOICES = [(_MODE_LABELS[mode], mode) for mode in MODES]
POSITION_CHOICES = [(_POSITION_LABELS[where], where) for where in POSITIONS]
SEARCH_HEADERS = ["code", "promotes", "precision", "recall",
                  "example contexts (hit in [brackets])"]
DEFAULT_PROMPT = "Once upon a time,"
EMPTY_STORY = "<div class='story-text empty'>Press Generate to write a story.</div>"
CHIP = "topic-chip"  # every topic button's class; a selected one has "selected" too

# Stop: each page (Gradio session) that is generating has an event here, which its Stop button
# sets and its generation checks after every step. Stopping from inside, rather than cancelling
# the event, lets the generation end as usual with its partial stories (Gradio's cancel raced
# the stream and could end the event as failed, with "Error" badges over the stories).
_stops: dict[str, threading.Event] = {}
_stops_lock = threading.Lock()


def postprocessed(fn, outputs: list):
    """The generator handler ``fn``, for an event with ``postprocess=False``: each update's values
    are postprocessed by their output components here, in the handler's own thread, as Gradio
    would postprocess them (updates such as ``gr.skip()`` and State outputs pass as they are, as
    Gradio passes them). Gradio would hand every output of every streamed update to a worker
    thread and back from its event loop, one round trip per output: with 16 visitors writing,
    about a fifth of the event loop's time, taken from the batch's steps (one interpreter)."""
    from gradio.data_classes import GradioModel, GradioRootModel
    from gradio.utils import is_prop_update

    def converted(values):
        done = []
        for block, value in zip(outputs, values, strict=True):
            if not block.stateful and not is_prop_update(value):
                value = block.postprocess(value)
                if isinstance(value, GradioModel | GradioRootModel):
                    value = value.model_dump()
            done.append(value)
        return done

    @functools.wraps(fn)
    def generator(*args, **kwargs):
        for values in fn(*args, **kwargs):
            yield converted(values)

    return generator


def stop_flag(session: str | None, fresh: bool = False) -> threading.Event | None:
    """The Stop flag of the page ``session``: a new one when ``fresh`` (a generation starts),
    else the current one (``None`` when the page is not generating)."""
    if not session:
        return None
    with _stops_lock:
        if fresh:
            _stops[session] = threading.Event()
        return _stops.get(session)


def _drop_stop_flag(session: str | None, flag: threading.Event | None) -> None:
    with _stops_lock:
        if session and flag is not None and _stops.get(session) is flag:
            del _stops[session]


@dataclasses.dataclass
class SteerTab:
    prompt: gr.Textbox
    hint: gr.Markdown
    topic_buttons: list[gr.Button]
    selected: gr.State  # the selected topic chips' names, in the order they were clicked
    codes: gr.Dropdown
    blocked: gr.Dropdown  # codes that may never be chosen
    strength: gr.Number
    code_strengths: gr.Textbox  # a strength of their own for some codes: CODE=STRENGTH, ...
    mode: gr.Radio
    positions: gr.Radio
    highlight: gr.Textbox
    seed: gr.Number
    random_seed: gr.Checkbox
    temperature: gr.Slider
    max_tokens: gr.Number
    unsteered: gr.HTML
    steered: gr.HTML
    status: gr.Markdown
    search_summary: gr.Markdown
    inspect_unsteered: gr.Button
    inspect_steered: gr.Button
    last: gr.State  # the last generation's token ids, for the Token view
    generate: gr.Button
    share_link: gr.Textbox


# A share link: the page's URL with what reproduces a pair of stories as query parameters.
LINK_KEYS = ("model", "prompt", "seed", "codes", "strength", "mode", "positions", "temperature",
             "max_tokens", "highlight", "block", "code_strengths")
# Put in the address bar and the share box once a generation has written its pair.
LINK_JS = """(query) => {
  if (!query) return "";
  history.replaceState(null, "", location.pathname + "?" + query);
  return location.href;
}"""


# Some updates of a text box are not answers to the visitor acting on that box: the steering
# JSON's sync of the set, a topic chip's or a removed code's per-code strengths. On a busy
# server they can arrive after the visitor has started typing there, and would write over the
# typing. They go through a hidden twin (``typing_guard``) whose value is ``[n, text]`` (``n``
# new each time, so an update equal to the last still arrives). In the page, while the box has
# the focus and its text changed since it took the focus (or since the last update written
# while it had it), the visitor's text stays; one only reading or copying the box gets the
# update. FOCUS_SCRIPT (in the page's head, so it is there before any focus) notes the text a
# box had when it took the focus.
FOCUS_SCRIPT = """<script>
document.addEventListener("focusin", (event) => {
  if (event.target instanceof HTMLTextAreaElement) event.target.dataset.untouched =
    event.target.value;
}, true);
</script>"""
TYPING_GUARD_JS = """(update) => {
  const box = document.querySelector("#%s textarea");
  const text = JSON.parse(update)[1];
  if (!box || document.activeElement !== box) return text;
  if (box.value !== box.dataset.untouched) return box.value;
  box.dataset.untouched = text;
  return text;
}"""
_guarded_updates = itertools.count()


def typing_guard(box: gr.Textbox) -> gr.Textbox:
    """A hidden twin of ``box``: write :func:`guarded` text to it and the text reaches ``box``
    unless the visitor is typing there (:data:`TYPING_GUARD_JS`)."""
    twin = gr.Textbox(visible=False)
    twin.change(None, twin, box, js=TYPING_GUARD_JS % box.elem_id, api_visibility="private",
                show_progress="hidden")
    return twin


def guarded(text):
    """``text`` for a :func:`typing_guard` twin (``gr.skip()`` passes through)."""
    return text if not isinstance(text, str) else json.dumps([next(_guarded_updates), text])


@dataclasses.dataclass
class Link:
    """What a share link asks for, each value checked as the Steer tab checks it."""
    model: str | None
    prompt: str
    seed: int
    codes: list[str]
    strength: float
    mode: str
    positions: str
    temperature: float
    max_tokens: int
    highlight: str
    block: list[str] = dataclasses.field(default_factory=list)
    code_strengths: dict[str, float] = dataclasses.field(default_factory=dict)


def link_query(model: str, prompt, codes, strength, mode, positions, seed, temperature,
               max_tokens, highlight, block=(), code_strengths=None) -> str:
    """The query string of a share link (:data:`LINK_KEYS`)."""
    values = {"model": model, "prompt": prompt, "seed": inputs.shown_number(seed),
              "codes": ",".join(inputs.code_list(codes)),
              "strength": inputs.shown_number(strength), "mode": mode, "positions": positions,
              "temperature": inputs.shown_number(temperature),
              "max_tokens": inputs.shown_number(max_tokens), "highlight": highlight or "",
              "block": ",".join(inputs.code_list(list(block))),
              "code_strengths": inputs.code_strengths_text(
                  inputs.code_strengths(code_strengths))}
    return urllib.parse.urlencode({key: value for key, value in values.items() if value != ""})


def read_link(query: dict, max_new_tokens: int) -> Link | None:
    """The share link in a page's query parameters, or ``None`` when it has none of
    :data:`LINK_KEYS` (other parameters are Gradio's or a host's, and ignored); a bad value
    raises :class:`InputError` naming the parameter."""
    if not any(key in query for key in LINK_KEYS):
        return None

    def get(key: str, default: str) -> str:
        value = query.get(key, default)
        return value[-1] if isinstance(value, list) else value

    try:
        return Link(
            model=get("model", "").strip() or None,
            prompt=inputs.text(get("prompt", DEFAULT_PROMPT), "the prompt"),
            seed=inputs.integer(get("seed", "0"), "seed", 0, inputs.MAX_SEED),
            codes=[str(CodeRef.parse(code.strip()))
                   for code in inputs.code_list(get("codes", ""))],
            strength=inputs.strength(get("strength", "1")),
            mode=inputs.choice(get("mode", "add"), "mode", MODES),
            positions=inputs.choice(get("positions", "all"), "positions", POSITIONS),
            temperature=inputs.temperature(get("temperature", "0.8")),
            max_tokens=inputs.max_new_tokens(get("max_tokens", str(min(150, max_new_tokens))),
                                             max_new_tokens),
            highlight=inputs.text(get("highlight", ""), "highlight"),
            block=[str(CodeRef.parse(code.strip()))
                   for code in inputs.code_list(get("block", ""))],
            code_strengths=inputs.code_strengths(get("code_strengths", "")))
    except ValueError as err:
        raise InputError(f"the share link is not valid: {err}") from None


def chips(codes: list[str]) -> list[str]:
    """``codes`` as the steering set's chips: a plain list (the code box takes values that are
    not among its choices, ``allow_custom_value``), which is what API clients get too."""
    return list(codes)


def checked_chips(loaded: LoadedModel, codes) -> tuple[list[str], str | None]:
    """The chips that may stay in the steering set, each written ``LAYER:SITE:HEAD:CODE`` once,
    and why the others were taken off (the message generation would give), or ``None``."""
    kept: list[str] = []
    problems: list[str] = []
    for code in inputs.code_list(codes):
        try:
            inputs.steering(loaded, kept + [code], 1.0, "add", "all")
        except InputError as err:
            problems.append(str(err))
            continue
        canonical = str(CodeRef.parse(code))
        if canonical not in kept:
            kept.append(canonical)
    return kept, "; ".join(problems) or None


def refusing(check):
    """An event handler for a number box (value, last good value) → (box, last good value,
    status): a value ``check`` accepts becomes the last good one; any other is refused with a
    notice and the box shows the last good value again, so the box always holds what will run."""

    def handler(value, before):
        try:
            check(value)
        except InputError as err:
            try:
                check(before)
            except InputError:
                before = None
            kept = "" if before is None else f"; kept {inputs.shown_number(before)}"
            note = warn(f"{err}{kept}")
            return (gr.skip() if before is None else before), gr.skip(), f"**Not changed**: {note}."
        return gr.skip(), value, gr.skip()

    return handler


def guard(box: gr.Number, check, status: gr.Markdown) -> None:
    """Refuse values outside ``box``'s range where they are typed (see :func:`refusing`): the
    value when the box gains focus is the one to go back to."""
    before = gr.State(box.value)
    box.focus(lambda value: value, box, before, preprocess=False, api_visibility="private",
              show_progress="hidden")
    gr.on([box.blur, box.submit], refusing(check), [box, before], [box, before, status],
          preprocess=False, api_visibility="private", show_progress="hidden")


def code_box_api_info() -> dict:
    """What ``view_api`` says the code box takes and gives: a list of codes as text (its choices
    are empty, so Gradio would declare a list of none of them)."""
    return {"type": "array", "items": {"type": "string"},
            "description": "codes written LAYER:SITE:HEAD:CODE, e.g. 3:attn_heads:2:117"}


def with_code(codes: list[str] | None, code: str) -> list[str]:
    codes = list(codes or [])
    return codes if code in codes else codes + [code]


def chip_look(selected: bool) -> dict:
    """A topic chip's look: a selected one is a primary button with the class ``selected``."""
    return {"variant": "primary" if selected else "secondary",
            "elem_classes": [CHIP, "selected"] if selected else [CHIP]}


def topic_buttons(loaded: LoadedModel, selected=()) -> list[dict]:
    """The topic chips of ``loaded``, those named in ``selected`` shown selected."""
    names = list(loaded.topics)[:MAX_TOPIC_BUTTONS]
    return ([gr.update(value=name, visible=True, **chip_look(name in selected))
             for name in names]
            + [gr.update(visible=False, **chip_look(False))] * (MAX_TOPIC_BUTTONS - len(names)))


@dataclasses.dataclass
class Toggled:
    """The steering set after a topic chip was clicked."""
    selected: list[str]  # the selected chips, in the order they were clicked
    codes: list[str]
    steering: Steering | None  # the settings of the last selected chip; None when none is
    regex: str  # what to highlight: the selected presets' regexes, any of them
    note: str
    strengths: str = ""  # the per-code strengths box: the presets' own, and those typed


def preset_codes(loaded: LoadedModel, topic: str) -> list[str]:
    return [str(c) for c in preset_steering(loaded.topics[topic]).codes]


def toggled(loaded: LoadedModel, topic, selected, codes_now, strengths_now=None) -> Toggled:
    """Click the chip of ``topic``: an unselected chip adds its preset's codes to the steering
    set (codes already there stay) and its strength, mode and positions become the set's (the
    last chip clicked decides); a selected one takes its codes off again, except those another
    selected chip holds, and the set takes the settings of the last selected chip left. The
    per-code strengths (``strengths_now``, the box) keep those of codes still in the set, and
    every selected preset's own ``code_strengths`` (a later chip's win)."""
    topic = inputs.text(topic, "topic")
    if topic not in loaded.topics:
        known = ", ".join(loaded.topics) or "none"
        raise InputError(f"no topic preset {topic!r}; this model's presets: {known}")
    selected = [name for name in (selected or []) if name in loaded.topics]
    codes_now = [str(CodeRef.parse(code)) for code in inputs.code_list(codes_now)]
    if topic in selected:
        selected = [name for name in selected if name != topic]
        kept = {code for name in selected for code in preset_codes(loaded, name)}
        dropped = set(preset_codes(loaded, topic)) - kept
        codes = [code for code in codes_now if code not in dropped]
    else:
        selected = [*selected, topic]
        codes = codes_now + [code for code in preset_codes(loaded, topic)
                             if code not in codes_now]
    steering = preset_steering(loaded.topics[selected[-1]]) if selected else None
    try:
        typed = inputs.code_strengths(strengths_now)
    except InputError:  # being typed: the presets' own only
        typed = {}
    strengths = {code: value for code, value in typed.items() if code in codes}
    for name in selected:
        own = preset_steering(loaded.topics[name]).code_strengths
        strengths.update({str(code): value for code, value in own.items()})
    if steering is not None:
        # A preset is held to the ranges a visitor is (its strength within STRENGTH_RANGE),
        # and presets together to the model's k codes per head.
        try:
            inputs.steering(loaded, codes, steering.strength, steering.mode, steering.positions,
                            None, strengths)
        except InputError as err:
            what = "applied" if len(selected) == 1 else "combined with the selected topics"
            raise InputError(f"the preset {topic!r} cannot be {what}: {err}") from None
    regexes = [loaded.topics[name].get("regex", name) for name in selected]
    regex = regexes[0] if len(regexes) == 1 else "|".join(f"(?:{r})" for r in regexes)
    if len(regex) > inputs.MAX_REGEX_CHARS:
        regex = regexes[-1]
    names = " + ".join(f"**{name}**" for name in selected)
    settings = ("" if steering is None or len(selected) == 1 else
                f" (strength {steering.strength:g}, mode {steering.mode}, positions "
                f"{steering.positions}: those of **{selected[-1]}**, the last topic picked)")
    switched = f"{len(codes)} codes switched on{settings}"
    if topic in selected:
        note = (f"Steering toward {names}: {switched}. "
                f"{measured(loaded.topics[topic]) if len(selected) == 1 else ''}"
                "Press **Generate**.")
    elif selected:
        note = f"Removed **{topic}**: steering toward {names}, {switched}."
    else:
        note = (f"Removed **{topic}**: " + (f"{switched}." if codes else
                                             "no codes are switched on."))
    return Toggled(selected, codes, steering, regex, note,
                   inputs.code_strengths_text(strengths))


def applied_topic(loaded: LoadedModel, topic) -> tuple:
    """The /topic endpoint: the steering set of one preset alone (codes, strength, mode,
    positions, what to highlight, the status line, its per-code strengths)."""
    if inputs.text(topic, "topic") not in loaded.topics:
        known = ", ".join(loaded.topics) or "none"
        raise InputError(f"no topic preset {topic!r}; this model's presets: {known}")
    preset = loaded.topics[topic]
    steering = preset_steering(preset)
    codes_now = [str(c) for c in steering.codes]
    # A preset is held to the ranges a visitor is (its strength within STRENGTH_RANGE).
    try:
        inputs.steering(loaded, codes_now, steering.strength, steering.mode, steering.positions,
                        None, {str(c): v for c, v in steering.code_strengths.items()})
    except InputError as err:
        raise InputError(f"the preset {topic!r} cannot be applied: {err}") from None
    note = (f"Steering toward **{topic}**: {len(codes_now)} codes switched on. "
            f"{measured(preset)}Press **Generate**.")
    return (chips(codes_now), steering.strength, steering.mode, steering.positions,
            preset.get("regex", topic), note, strengths_text(steering))


def cleared() -> list:
    """Clear steering: no codes, no chip selected (the codes, the status, the selection, and
    each topic button's look)."""
    return [chips([]), "Steering cleared: both sides will write the same story.", [],
            *[gr.update(**chip_look(False))] * MAX_TOPIC_BUTTONS]


def stopped_note(result) -> str:
    """The status line after Stop, from the hidden result of the stopped generation (its
    partial texts, or the previous generation's when none was sent yet)."""
    if isinstance(result, dict) and result.get("done") is False:
        tokens = result.get("tokens") or [0, 0]
        return (f"**Stopped**: {tokens[0]} and {tokens[-1]} new tokens written (Seed "
                f"{result.get('seed')}). Press **Generate** to write again.")
    return "**Stopped**. Press **Generate** to write again."


def measured(preset: dict) -> str:
    """How well a preset steered in its recorded steering evaluation, as a sentence ("" when it
    has none): a visitor should know a preset that moves one story in ten from one that moves
    nine."""
    result = preset.get("stats", {}).get("steer_eval")
    try:
        steered, baseline = result["steered"]["rate"], result["baseline"]["rate"]
        samples = result["samples_per_prompt"] * len(result["prompts"])
    except (KeyError, TypeError):
        return ""
    fluency = result.get("fluency_ratio")
    fluency = f", text loss {fluency:.2f}x unsteered" if isinstance(fluency, float) else ""
    return (f"Measured: {steered:.0%} of {samples} sampled stories mention it, against "
            f"{baseline:.0%} unsteered{fluency}. ")


def topic_hint(loaded: LoadedModel) -> str:
    if loaded.topics:
        return ("**Steer toward a topic**: a click switches on codes that fire in stories about "
                "it.")
    return ("**This model has no topic presets**: find codes for a topic with the search "
            "below, or add codes from the Codes tab.")


def search_note(loaded: LoadedModel) -> str:
    if has_index(loaded):
        # Which stories are searched: a small index knows few words, and the visitor should
        # see why a word finds nothing.
        return (f"Searches the stories of the model's code index ({index_summary(loaded)}) "
                "for codes that fire in stories after the word's first mention.")
    return ("This model has no code index, so codes cannot be searched; steering with codes "
            "you know still works.")


def steering_json(codes, strength, mode, positions, block=(), code_strengths=None) -> str:
    """The steering set as JSON (``Steering.to_json``'s keys), to copy and share."""
    shared = {"codes": list(codes or []), "strength": strength, "mode": mode,
              "positions": positions}
    if block:
        shared["block"] = list(block)
    if code_strengths:
        shared["code_strengths"] = dict(code_strengths)
    return json.dumps(shared)


def synced_json(codes, strength, mode, positions, block=None, code_strengths=None):
    """:func:`steering_json` of the set as it is now, or no change while a part of it is not
    valid (a number being typed, a strength for a code not switched on): the shared JSON only
    ever holds a set that would run."""
    try:
        codes = inputs.code_list(codes)
        block = inputs.code_list(block)
        strength = inputs.strength(strength)
        inputs.choice(mode, "mode", MODES)
        inputs.choice(positions, "positions", POSITIONS)
        strengths = inputs.code_strengths(code_strengths)
        if not set(strengths) <= {str(CodeRef.parse(code)) for code in codes}:
            return gr.skip()
    except (InputError, ValueError):
        return gr.skip()
    return steering_json(codes, strength, mode, positions, block, strengths)


def strengths_text(steering: Steering | None) -> str:
    """The per-code strengths box's text for ``steering`` ("" for none)."""
    if steering is None:
        return ""
    return inputs.code_strengths_text({str(c): v for c, v in steering.code_strengths.items()})


def strengths_kept(strengths_now, codes) -> str | None:
    """The per-code strengths box without the codes no longer switched on (``codes``), or
    ``None`` when nothing is to be taken off (or the box does not hold valid strengths)."""
    try:
        strengths = inputs.code_strengths(strengths_now)
        kept = {code: value for code, value in strengths.items() if code in codes}
    except InputError:
        return None
    return None if kept == strengths else inputs.code_strengths_text(kept)


def strengths_api_info() -> dict:
    """What ``view_api`` says the per-code strengths box takes."""
    return {"type": "string",
            "description": "optional: a strength of their own for some of the codes switched "
                           f"on, CODE=STRENGTH separated by commas, e.g. "
                           f"{inputs.STRENGTHS_EXAMPLE}, 3:attn_heads:2:40=-1; each from "
                           f"{inputs.STRENGTH_RANGE[0]:g} to {inputs.STRENGTH_RANGE[1]:g}; the "
                           "other codes have the set's strength"}


def build(ctx: AppContext, start: LoadedModel) -> SteerTab:
    settings = ctx.settings
    prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt: the beginning of a story", lines=2,
                        max_lines=6)
    hint = gr.Markdown(topic_hint(start), elem_classes="hint")
    with gr.Row(elem_classes="presets"):
        names = list(start.topics)[:MAX_TOPIC_BUTTONS]
        buttons = [gr.Button(names[i] if i < len(names) else "", size="md",
                             visible=i < len(names), min_width=0, **chip_look(False))
                   for i in range(MAX_TOPIC_BUTTONS)]
    selected = gr.State([])
    with gr.Row(elem_classes="actions"):
        generate = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
        # Shown in place of nothing while a generation streams (Generate is disabled then).
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, visible=False)
        clear = gr.Button("Clear steering", scale=1, min_width=140)
    # Just under the buttons, so that what a click did is in view (on a phone the stories below
    # fill the screen).
    status = gr.Markdown("Pick a topic, then press **Generate**.", elem_classes="hint")
    share_query = gr.Textbox(visible=False)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            gr.Markdown("#### Without steering")
            unsteered = gr.HTML(EMPTY_STORY, elem_classes="story")
            inspect_unsteered = gr.Button("Codes of this story →", size="sm")
        with gr.Column(min_width=300):
            gr.Markdown("#### With steering <span class='hint'>(same seed; "
                        "<mark>topic words</mark> marked)</span>")
            steered = gr.HTML(EMPTY_STORY, elem_classes="story")
            inspect_steered = gr.Button("Codes of this story →", size="sm")
    result = gr.JSON(visible=False)  # plain texts and settings, for API clients
    share_link = gr.Textbox(label="Share link: opens this pair of stories (same prompt, seed, "
                                  "steering and model)", interactive=False, buttons=["copy"],
                            elem_id="share-link", placeholder="written after a generation")

    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Steering set")
            codes = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                label="Codes switched on", elem_id="steering-codes",
                                info="3:attn_heads:2:117 is code 117 of head 2's codebook in "
                                     "layer 3. Add codes from a topic or the search, click × "
                                     "to remove one, or type one and press Enter.")
            codes.api_info = code_box_api_info  # for view_api; Gradio reads it per instance
            blocked = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                  label="Codes blocked", elem_id="blocked-codes",
                                  info="Never chosen, on the steered side: type a code and "
                                       "press Enter (the strength does not apply to them)")
            blocked.api_info = code_box_api_info
            low, high = inputs.STRENGTH_RANGE
            # A number box, not a slider: a Gradio slider clamps a typed value to its ends
            # when the box loses focus, silently; this box refuses it with a notice instead.
            strength = gr.Number(1.0, label="Strength", minimum=low, maximum=high, step=0.1,
                                 info=f"Multiplies the switched-on codes' vectors, from "
                                      f"{low:g} to {high:g}: higher steers harder, too high "
                                      "garbles the text; negative steers away")
            code_strengths = gr.Textbox(
                label="Per-code strengths (optional)", elem_id="code-strengths", lines=1,
                max_lines=4, placeholder=f"e.g. {inputs.STRENGTHS_EXAMPLE}, 3:attn_heads:2:40=-1",
                info=f"A strength of its own for some switched-on codes: CODE=STRENGTH, comma "
                     f"separated, each from {low:g} to {high:g}; the other codes have the "
                     "strength above. Press Enter to set it")
            code_strengths.api_info = strengths_api_info
            strengths_update = typing_guard(code_strengths)  # for chips and removed codes
            mode = gr.Radio(MODE_CHOICES, value="add", label="Mode")
            positions = gr.Radio(POSITION_CHOICES, value="all", label="Steer at")
            with gr.Accordion("Share: the steering set as JSON", open=False):
                json_box = gr.Textbox(steering_json([], 1.0, "add", "all"), show_label=False,
                                      lines=3, buttons=["copy"], elem_id="steering-json",
                                      info="Copy it, or paste one and press Apply")
                json_sync = typing_guard(json_box)
                apply_json = gr.Button("Apply pasted JSON", size="sm")
        with gr.Column(scale=1):
            gr.Markdown("### Find codes for any topic")
            with gr.Row(equal_height=False):
                search_box = gr.Textbox(label="A word or regex", placeholder="e.g. friend, "
                                        r"\b(?:cat|dog)s?\b", scale=4)
                search = gr.Button("Search", scale=1, min_width=90)
            search_summary = gr.Markdown(search_note(start), elem_classes="hint")
            search_table = gr.Dataframe(headers=SEARCH_HEADERS, interactive=False, wrap=True,
                                        datatype=["str", "str", "number", "number", "str"],
                                        max_height=360, label="Click a row to add its code",
                                        column_widths=["27%", "15%", "13%", "10%", "35%"])
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=inputs.MAX_SEED)
            random_seed = gr.Checkbox(True, label="New random seed each time",
                                      info="The seed used is written back, to reproduce a pair")
            temperature = gr.Slider(0, inputs.MAX_TEMPERATURE, value=0.8, step=0.05,
                                    label="Temperature", info="0 is greedy")
            max_tokens = gr.Number(min(150, settings.max_new_tokens), label="Max new tokens",
                                   precision=0, minimum=1, maximum=settings.max_new_tokens,
                                   step=1, info=f"1 to {settings.max_new_tokens}")
        highlight_box = gr.Textbox(label="Highlight words matching (regex)",
                                   placeholder="set by a topic or a search")
    last = gr.State(None)

    @shown
    def apply_topic(topic: str, model_name: str):
        return applied_topic(ctx.model(model_name), topic)

    preset_outputs = [codes, strength, mode, positions, highlight_box, status, code_strengths]

    def click_topic(topic: str, selected_now, codes_now, model_name: str, strengths_now):
        loaded = ctx.model(model_name)
        done = toggled(loaded, topic, selected_now, codes_now, strengths_now)
        settings = ([done.steering.strength, done.steering.mode, done.steering.positions]
                    if done.steering is not None else [gr.skip()] * 3)
        return [chips(done.codes), *settings, done.regex, done.note, guarded(done.strengths),
                done.selected, *topic_buttons(loaded, done.selected)]

    # A chip's strengths come late on a busy server: they do not write over typing.
    topic_outputs = [strengths_update if output is code_strengths else output
                     for output in preset_outputs] + [selected, *buttons]
    for button in buttons:
        button.click(reported(click_topic, len(topic_outputs), preset_outputs.index(status)),
                     [button, selected, codes, ctx.model_state, code_strengths], topic_outputs,
                     api_visibility="private", preprocess=False)
    # For API clients, by topic name: a preset's own steering (no chips to combine with).
    topic_name = gr.Textbox(visible=False)
    gr.Button(visible=False).click(apply_topic, [topic_name, ctx.model_state], preset_outputs,
                                   api_name="topic", preprocess=False)

    @gpu()
    def run(model_name, prompt_text, codes_now, strength_now, mode_now, positions_now, seed_now,
            random_now, temperature_now, max_now, highlight_now, blocked_now=None,
            code_strengths_now=None, request: gr.Request = None):
        session = getattr(request, "session_hash", None)
        stop_now = stop_flag(session)  # set by this page's Stop button
        try:
            yield from generation_updates(model_name, prompt_text, codes_now, strength_now,
                                          mode_now, positions_now, seed_now, random_now,
                                          temperature_now, max_now, highlight_now, stop_now,
                                          blocked_now, code_strengths_now)
        finally:
            _drop_stop_flag(session, stop_now)

    def generation_updates(model_name, prompt_text, codes_now, strength_now, mode_now,
                           positions_now, seed_now, random_now, temperature_now, max_now,
                           highlight_now, stop_now: threading.Event | None, blocked_now,
                           code_strengths_now):
        loaded = ctx.model(model_name)
        max_new = inputs.max_new_tokens(max_now, settings.max_new_tokens)
        ids = inputs.prompt_ids(loaded, prompt_text, settings.max_prompt_chars, max_new)
        steering = inputs.steering(loaded, codes_now, strength_now, mode_now, positions_now,
                                   blocked_now, code_strengths_now)
        temperature_value = inputs.temperature(temperature_now)
        used_seed = inputs.seed(seed_now, random_now)
        # Marking runs between forward passes.
        marker = highlight.Highlighter(inputs.text(highlight_now, "highlight"))
        pair = ([], [])
        sent = 0.0

        def tokens_of(tokens_pair) -> dict:
            """The pair's token ids, for the Token view (the ``last`` state)."""
            return {"prompt": prompt_text, "prompt_ids": ids,
                    "tokens": [list(t) for t in tokens_pair],
                    "steering": steering.to_json() if steering else None}

        def plain(tokens_pair, done: bool) -> dict:
            """The texts so far, for API clients (the hidden JSON output)."""
            return {"unsteered": continuation_text(loaded, ids, tokens_pair[0]),
                    "steered": continuation_text(loaded, ids, tokens_pair[1]),
                    "tokens": [len(tokens_pair[0]), len(tokens_pair[1])], "seed": used_seed,
                    "temperature": temperature_value,
                    "steering": steering.to_dict() if steering else None, "done": done}

        # Every update carries a value for each output an API client sees (no gr.skip()).
        stopped = False
        for pair in side_by_side(loaded, ids, steering, used_seed, temperature_value, max_new):
            if stop_now is not None and stop_now.is_set():
                stopped = True
                break
            if time.monotonic() - sent >= STREAM_INTERVAL:
                sent = time.monotonic()
                partial = plain(pair, done=False)
                # The token ids so far too: a stopped pair opens in the Token view.
                yield (marker.story_html(prompt_text, partial["unsteered"]),
                       marker.story_html(prompt_text, partial["steered"]), used_seed,
                       f"Writing: {len(pair[0])} and {len(pair[1])} new tokens…", partial,
                       tokens_of(pair))
        texts_out = plain(pair, done=not stopped)
        texts = [texts_out["unsteered"], texts_out["steered"]]
        stories = (marker.story_html(prompt_text, texts[0]),
                   marker.story_html(prompt_text, texts[1]))
        note = (f"Seed {used_seed}, temperature {temperature_value:g}: "
                f"{len(pair[0])} and {len(pair[1])} new tokens.")
        if steering is None:
            note += " No codes are switched on, so both sides are the same: pick a topic."
        elif marker.regex is not None:
            counts = [marker.count(t) for t in texts]
            if not marker.problem:  # both counted within the time limit
                note += f" Topic words: {counts[0]} without, **{counts[1]} with steering**."
        if marker.problem:
            note += f" Topic words are not marked: {marker.problem}."
        if stopped:
            note = stopped_note(texts_out)
        yield *stories, used_seed, note, texts_out, tokens_of(pair)

    def shared_query(model_name, result_now, last_now, max_now, highlight_now):
        """The share link of the pair just written (nothing when the generation failed)."""
        if not isinstance(result_now, dict) or not last_now:
            return gr.skip()
        steering = Steering.from_json(last_now["steering"]) if last_now["steering"] else None
        try:
            max_new = inputs.max_new_tokens(max_now, settings.max_new_tokens)
        except InputError:
            return gr.skip()
        return link_query(
            ctx.model(model_name).label, last_now["prompt"],
            [str(c) for c in steering.codes] if steering else [],
            steering.strength if steering else 1, steering.mode if steering else "add",
            steering.positions if steering else "all", result_now["seed"],
            result_now["temperature"], max_new, inputs.text(highlight_now, "highlight"),
            [str(c) for c in steering.block] if steering else [],
            {str(c): v for c, v in steering.code_strengths.items()} if steering else None)

    def starting(request: gr.Request):
        stop_flag(request.session_hash, fresh=True)
        return gr.update(interactive=False), gr.update(visible=True)

    run_inputs = [ctx.model_state, prompt, codes, strength, mode, positions, seed, random_seed,
                  temperature, max_tokens, highlight_box, blocked, code_strengths]
    run_outputs = [unsteered, steered, seed, status, result, last]
    # The inputs reach run as they are (it checks them itself), and its outputs are postprocessed
    # in its own thread (see postprocessed).
    run_options = dict(concurrency_limit=settings.concurrency, concurrency_id="generate",
                       preprocess=False, postprocess=False)
    # For API clients: the endpoint, raising on bad input.
    gr.Button(visible=False).click(postprocessed(shown(run), run_outputs), run_inputs,
                                   run_outputs, api_name="generate", **run_options)
    # In the page: Generate gives way to Stop, the generation runs (a bad input is told in the
    # status line and a notice, never raised into the stories), then Generate comes back.
    ready = (gr.update(interactive=True), gr.update(visible=False))
    gr.on([generate.click, prompt.submit], starting, None, [generate, stop], queue=False,
          api_visibility="private", show_progress="hidden").then(
        postprocessed(reported(run, len(run_outputs), run_outputs.index(status)), run_outputs),
        run_inputs, run_outputs, api_visibility="private", **run_options).then(
        lambda: ready, None, [generate, stop], api_visibility="private",
        show_progress="hidden", queue=False).then(
        shared_query, [ctx.model_state, result, last, max_tokens, highlight_box], share_query,
        api_visibility="private", show_progress="hidden", queue=False)
    share_query.change(None, [share_query], [share_link], js=LINK_JS, api_visibility="private",
                       show_progress="hidden")

    def stopping(request: gr.Request):
        flag = stop_flag(request.session_hash)
        if flag is None:  # the generation has ended already
            return ready
        flag.set()  # the generation ends after its current step, keeping what it wrote
        return gr.update(interactive=False), gr.update(visible=False)

    stop.click(stopping, None, [generate, stop], api_visibility="private",
               show_progress="hidden", queue=False)

    def find(query: str, model_name: str):
        loaded = ctx.model(model_name)
        pattern = inputs.regex(query, "search")
        rows, summary = topic_search(loaded, pattern)
        labels = code_labels(loaded, [r["name"] for r in rows])
        table = pd.DataFrame(
            [[r["name"], labels.get(r["name"], ""), round(r["precision"], 3),
              round(r["recall"], 3), r["example"]] for r in rows], columns=SEARCH_HEADERS)
        return table, summary + ". Click a row to add its code.", pattern

    endpoint([search.click, search_box.submit], find, [search_box, ctx.model_state],
             [search_table, search_summary, highlight_box], status=search_summary,
             api_name="search_topics", preprocess=False)

    def add_row(codes_now, evt: gr.SelectData):
        row = evt.row_value or []
        if not row or not row[0]:
            return gr.skip(), gr.skip()
        label = f" ({row[1]})" if len(row) > 1 and row[1] else ""
        return chips(with_code(codes_now, str(row[0]))), f"Added code `{row[0]}`{label}."

    search_table.select(add_row, [codes], [codes, status], api_visibility="private")

    clear.click(cleared, None, [codes, status, selected, *buttons], api_visibility="private")

    set_parts = [codes, strength, mode, positions, blocked, code_strengths]
    for part in set_parts:
        part.change(lambda *set_now: guarded(synced_json(*set_now)), set_parts, json_sync,
                    api_visibility="private", preprocess=False, show_progress="hidden")

    def check_codes(codes_now, model_name: str, strengths_now):
        """Take off the chips generation would refuse (a typed code the model does not have,
        one too many for a head), saying why; chips set by a topic or a search pass. Each
        chip shows its code's label (the box's choices are the chips, labelled; the values
        stay the codes). A code taken off the set loses its per-code strength too."""
        loaded = ctx.model(model_name)
        try:
            kept, problem = checked_chips(loaded, codes_now)
        except InputError as err:  # not a list at all
            return gr.skip(), f"**Not added**: {warn(str(err))}", gr.skip()
        labels = code_labels(loaded, kept)
        box = gr.update(choices=[(labelled(code, labels), code) for code in kept],
                        **({} if kept == codes_now else {"value": kept}))
        strengths = strengths_kept(strengths_now, kept)
        strengths = gr.skip() if strengths is None else guarded(strengths)
        if problem is None:
            return box, gr.skip(), strengths
        return box, f"**Not added**: {warn(problem)}", strengths

    codes.change(check_codes, [codes, ctx.model_state, code_strengths],
                 [codes, status, strengths_update], preprocess=False, api_visibility="private",
                 show_progress="hidden")

    def check_blocked(blocked_now, model_name: str):
        """As :func:`check_codes`, for the blocked codes (any number per head)."""
        loaded = ctx.model(model_name)
        kept, problems = [], []
        try:
            typed = inputs.code_list(blocked_now)
        except InputError as err:
            return gr.skip(), f"**Not blocked**: {warn(str(err))}"
        for code in typed:
            try:
                inputs.steering(loaded, [], 1.0, "add", "all", kept + [code])
            except InputError as err:
                problems.append(str(err))
                continue
            if (canonical := str(CodeRef.parse(code))) not in kept:
                kept.append(canonical)
        labels = code_labels(loaded, kept)
        box = gr.update(choices=[(labelled(code, labels), code) for code in kept],
                        **({} if kept == typed else {"value": kept}))
        return box, (f"**Not blocked**: {warn('; '.join(problems))}" if problems else gr.skip())

    blocked.change(check_blocked, [blocked, ctx.model_state], [blocked, status],
                   preprocess=False, api_visibility="private", show_progress="hidden")
    clear.click(lambda: [], None, blocked, api_visibility="private", show_progress="hidden")

    def check_strengths(strengths_now, before, codes_now, model_name: str):
        """The per-code strengths box when it is left or Enter is pressed: valid strengths are
        written ``CODE=STRENGTH, ...`` and become the last good value; anything else (an
        entry that is not CODE=STRENGTH, a code the model does not have or that is not
        switched on, a strength out of range) is refused with a notice and the box shows the
        last good value again, so it always holds what will run."""
        loaded = ctx.model(model_name)
        try:
            steering = inputs.steering(loaded, codes_now, 1.0, "add", "all", None,
                                       strengths_now)
        except InputError as err:
            kept = inputs.text(before, "per-code strengths") if isinstance(before, str) else ""
            note = warn(f"{err}; kept {kept or 'none'}")
            return kept, kept, f"**Not changed**: {note}."
        text = strengths_text(steering)
        if text == (strengths_now or ""):
            return gr.skip(), text, gr.skip()
        return text, text, gr.skip()

    strengths_before = gr.State("")
    code_strengths.focus(lambda value: value, code_strengths, strengths_before,
                         preprocess=False, api_visibility="private", show_progress="hidden")
    gr.on([code_strengths.blur, code_strengths.submit], check_strengths,
          [code_strengths, strengths_before, codes, ctx.model_state],
          [code_strengths, strengths_before, status], preprocess=False,
          api_visibility="private", show_progress="hidden")
    clear.click(lambda: "", None, code_strengths, api_visibility="private",
                show_progress="hidden")
    guard(strength, inputs.strength, status)
    guard(max_tokens, lambda value: inputs.max_new_tokens(value, settings.max_new_tokens),
          status)
    guard(seed, lambda value: inputs.integer(value, "seed", 0, inputs.MAX_SEED), status)

    def import_json(shared: str, model_name: str):
        steering = inputs.steering_json(ctx.model(model_name), shared)
        blocking = f", {len(steering.block)} blocked" if steering.block else ""
        own = (f", {len(steering.code_strengths)} with a strength of its own"
               if steering.code_strengths else "")
        return (chips([str(c) for c in steering.codes]), steering.strength, steering.mode,
                steering.positions,
                f"Applied a steering set of {len(steering.codes)} codes{blocking}{own}.",
                chips([str(c) for c in steering.block]), strengths_text(steering))

    import_outputs = [codes, strength, mode, positions, status, blocked, code_strengths]
    # In the page a pasted set also unselects the topic chips (it replaces their codes).
    endpoint([apply_json.click], import_json, [json_box, ctx.model_state], import_outputs,
             status=status, api_name="import_steering", preprocess=False,
             browser=lambda shared, model_name: (*import_json(shared, model_name),
                                                 *cleared()[2:]),
             browser_outputs=[*import_outputs, selected, *buttons])

    return SteerTab(prompt, hint, buttons, selected, codes, blocked, strength, code_strengths,
                    mode, positions, highlight_box, seed, random_seed, temperature, max_tokens,
                    unsteered, steered, status, search_summary, inspect_unsteered,
                    inspect_steered, last, generate, share_link)
