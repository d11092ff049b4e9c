"""The app with the model it ships: ``python app.py`` serving the embedded default model (512 codes
per head, its code index and its ``topics.json`` presets), driven with ``gradio_client`` and, in the
last test, a real browser.

The presets are read from ``codebook/default_model/topics.json`` at test time, so these tests hold
whatever codes, strength, mode and positions the presets are regenerated with.
"""

from __future__ import annotations

import pytest
import torch
from gradio_client import Client

from codebook import CodebookModel, hub
from codebook.analysis.topics import load_topics, preset_steering
from codebook.text import encode_document, stop_ids
from tests.test_app_server import CHROMIUM, SCREENSHOTS, running_app

PROMPT = "Once upon a time,"
TOKENS = 24  # per side; greedy, so each run is exact


@pytest.fixture(scope="module")
def presets() -> dict:
    topics = load_topics(hub.resolve_model_dir("default"))
    assert topics, "the default model ships topic presets"
    return topics


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app("default", tmp_path_factory.mktemp("hub")) as (url, lines):
        yield url, lines


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app[0], verbose=False)


@pytest.fixture(scope="module")
def model() -> CodebookModel:
    return CodebookModel.from_pretrained("default")


def names(preset: dict) -> list[str]:
    return [f"{c['layer']}:{c['site']}:{c['head']}:{c['code']}" for c in preset["codes"]]


def steered_text(client: Client, codes, strength, mode, positions) -> str:
    """The app's greedy steered continuation of :data:`PROMPT`."""
    job = client.submit(PROMPT, list(codes), strength, mode, positions, 0, False, 0.0, TOKENS, "",
                        api_name="/generate")
    return job.result()[4]["steered"]


@torch.no_grad()
def core_text(model: CodebookModel, steering) -> str:
    """The same continuation from the core alone: ``CodebookModel.generate``, greedy, cut at the
    first end-of-story token as the app cuts it."""
    tokenizer = model.tokenizer
    prompt = encode_document(tokenizer, PROMPT)
    out = model.generate(torch.tensor([prompt]), steering=steering, max_new_tokens=TOKENS,
                         do_sample=False)[0, len(prompt):].tolist()
    stops = set(stop_ids(tokenizer))
    new = next((out[:i] for i, t in enumerate(out) if t in stops), out)
    prefix = tokenizer.decode(prompt, skip_special_tokens=True)
    return tokenizer.decode(prompt + new, skip_special_tokens=True)[len(prefix):]


def test_every_preset_button_sets_exactly_its_presets_steering(client, presets):
    for name, preset in presets.items():
        chips, strength, mode, positions, highlight, status, own = client.predict(
            name, api_name="/topic")
        steering = preset_steering(preset)
        assert chips == names(preset), name
        assert own == "", name  # no shipped preset gives a code a strength of its own
        assert (strength, mode, positions) == (steering.strength, steering.mode,
                                               steering.positions), name
        assert highlight == preset["regex"]
        assert f"Steering toward **{name}**: {len(preset['codes'])} codes" in status
        # The status says how well the preset steered when it was evaluated.
        measured = preset["stats"]["steer_eval"]
        assert (f"Measured: {measured['steered']['rate']:.0%} of "
                f"{measured['samples_per_prompt'] * len(measured['prompts'])} sampled stories "
                f"mention it, against {measured['baseline']['rate']:.0%} unsteered") in status


@pytest.mark.slow
def test_a_presets_mode_strength_and_positions_reach_the_steering(app, model, presets):
    """Each variant of the first preset, through the app, writes what the core writes with that
    steering; the variants differ from one another, so a setting the app dropped would show."""
    name, preset = next(iter(presets.items()))
    base = preset_steering(preset)
    other_mode = "replace" if base.mode == "add" else "add"
    other_positions = "generated" if base.positions != "generated" else "all"
    variants = [{}, {"mode": other_mode}, {"positions": other_positions},
                {"strength": base.strength / 2}]
    texts = []
    for change in variants:
        steering = preset_steering(preset, **change)
        app_text = steered_text(Client(app[0], verbose=False), names(preset),
                                steering.strength, steering.mode, steering.positions)
        assert app_text == core_text(model, steering), (name, change)
        texts.append(app_text)
    assert len(set(texts)) > 1, "every setting gave the same text: the test would prove nothing"


def test_the_codes_browser_shows_a_preset_codes_contexts_and_promoted_tokens(client, presets):
    code = next(iter(presets.values()))["codes"][0]
    summary, contexts = client.predict(f"{code['layer']}:{code['site']}", code["head"],
                                       code["code"], api_name="/code")
    assert f"Code `{names({'codes': [code]})[0]}`" in summary
    assert "Fires on" in summary and "Promotes" in summary
    assert contexts.count("<mark>") >= 1  # a preset's code fires somewhere in the index


def test_searches_find_codes_in_the_shipped_index(client, presets):
    # The index holds a few stories, two about each preset topic first (`index --topic-stories`):
    # every preset's search finds its stories.
    found = {name: client.predict(preset["regex"], api_name="/search_topics")
             for name, preset in presets.items()}
    for name, (table, summary, highlight) in found.items():
        assert int(summary.split(" of ")[0]) >= 2, (name, summary)
        assert "indexed stories match" in summary and highlight == presets[name]["regex"]
        column = {name: i for i, name in enumerate(table["headers"])}
        assert table["data"] and all(0 <= row[column["precision"]] <= 1
                                     and 0 <= row[column["recall"]] <= 1
                                     for row in table["data"])
    table, summary = client.predict(r"\bthe\b", api_name="/search_codes")
    f1 = [row[table["headers"].index("F1")] for row in table["data"]]
    assert f1 and f1 == sorted(f1, reverse=True) and "marks" in summary


def test_the_token_view_shows_every_token_with_and_without_the_steering(client, presets):
    preset = next(iter(presets.values()))
    steering = preset_steering(preset)
    story = PROMPT + steered_text(client, names(preset), steering.strength, steering.mode,
                                  steering.positions)
    for choice in ("off", "on"):
        segments, note, _ = client.predict(story, choice, names(preset), steering.strength,
                                           steering.mode, steering.positions, PROMPT,
                                           api_name="/tokens")
        assert segments[0]["token"] == "«start»"
        # A SentencePiece token carries its leading space, the text's first one too.
        assert "".join(s["token"] for s in segments[1:]).lstrip() == story
        assert note.startswith(f"{len(segments)} tokens")


# -- a visitor in a browser ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_a_visitor_steers_with_a_preset_on_a_desktop_and_a_phone(app, presets):
    from playwright.sync_api import expect, sync_playwright

    name, preset = next(iter(presets.items()))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--no-sandbox"])
        try:
            for device, viewport in (("desktop", {"width": 1366, "height": 900}),
                                     ("phone", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                page.goto(app[0])
                page.get_by_role("button", name=name, exact=True).click()
                expect(page.get_by_text(f"Steering toward {name}")).to_be_visible(timeout=30_000)
                chips = page.locator("#steering-codes .token")
                expect(chips).to_have_count(len(preset["codes"]))
                page.get_by_role("button", name="Generate", exact=True).click()
                expect(page.get_by_text("Topic words:")).to_be_visible(timeout=90_000)
                stories = [page.locator(".story-text").nth(i).inner_text() for i in range(2)]
                assert all(s.startswith(PROMPT) and len(s) > len(PROMPT) for s in stories)
                # Nothing pushes the page wider than the screen (no sideways scrolling).
                width = page.evaluate("() => [document.documentElement.clientWidth, "
                                      "document.documentElement.scrollWidth]")
                assert width[1] <= width[0], (device, width)
                page.screenshot(path=str(SCREENSHOTS / f"default-steer-{device}.png"),
                                full_page=True)
                page.close()
        finally:
            browser.close()

