"""The app's parts without a server: which models a visitor may load, input checks, side-by-side
generation, highlighting, the token view, export choices, the model tab, settings.

:func:`build_app_model` makes the small model every app test serves: a tiny random Llama with
per-head codebooks, a word-level tokenizer, a code index over a made-up corpus where every third
story is about a dragon, and a ``dragon`` topic preset found by topic search over that index.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from app import highlight, inputs
from app.exporting import parse_formats
from app.generation import continuation_text, side_by_side
from app.inputs import InputError
from app.models import LoadedModel, ModelError, ModelRegistry, check_model_name, load
from app.settings import Settings
from app.token_view import token_codes
from codebook import attach_codebooks
from codebook.analysis.index import INDEX_NAME, Layout, build_index
from codebook.analysis.search import select_codes, topic_search
from codebook.analysis.steer_eval import sample
from codebook.analysis.topics import make_preset, save_topics
from codebook.steering import CodeRef, Steering
from codebook.text import encode_document, token_surfaces
from tests.tiny_models import VOCAB, tiny_base

STORY_WORDS = ["the", "a", "cat", "dog", "girl", "boy", "ran", "sat", "played", "big", "small",
               "happy", "park", "home", "ball", "tree", ".", ","]
TOPIC_WORDS = ["dragon", "fire", "cave"]
WORDS = ["<s>", "</s>", *STORY_WORDS, *TOPIC_WORDS]
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]
STRENGTH = 4.0


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No telemetry, no Hub: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    from huggingface_hub import constants

    for name, value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                        ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; more only contend for the shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-separated words over the tiny models' 97 ids (BOS 0, EOS 1)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="w0")


def corpus(num_docs: int = 45, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(num_docs):
        words = list(rng.choice(STORY_WORDS, size=int(rng.integers(8, 16))))
        if d % 3 == 0:
            for word in TOPIC_WORDS:
                words.insert(int(rng.integers(0, len(words) + 1)), word)
        docs.append(" ".join(words))
    return docs


def build_app_model(directory: Path) -> Path:
    """Save the app tests' model to ``directory`` (see the module docstring); stop tokens get
    zero logits, so greedy continuations never end early."""
    model = attach_codebooks(tiny_base("llama"), tokenizer=word_tokenizer(),
                             sites=["attn_heads"], num_codes=32, k=4)
    torch.manual_seed(1)
    for layer in model.codebook_layers().values():
        layer.codebook.data.normal_()
    # Peaked next-token distributions (a random model's are nearly flat, so steering would
    # rarely change a sampled token), and stop tokens that never win: stories run to the end.
    unembedding = model.base.lm_head.weight.data
    unembedding *= 10
    unembedding[[0, 1]] = 0
    model.eval()
    model.save_pretrained(directory)
    index = build_index(model, corpus(), progress=False)
    index.save(directory / INDEX_NAME)
    found = topic_search(index.documents(), index.layout, token_surfaces(model.tokenizer),
                         {"dragon": "dragon"}, top=40)["dragon"]
    codes = select_codes(found.codes, Layout.of_model(model), max_codes=4, per_head=1)
    save_topics(directory, {"dragon": make_preset("dragon", Steering(codes, strength=STRENGTH),
                                                  {"search": found.to_dict()})})
    (directory / "README.md").write_text("---\ntags:\n- test\n---\n# Tiny app model\n\nFor tests.")
    (directory / "eval.json").write_text(json.dumps(
        {"loss": 4.5, "accuracy": 0.1, "without_codebooks": {"loss": 4.4, "accuracy": 0.11}}))
    return directory


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    return load(str(build_app_model(tmp_path_factory.mktemp("app-model"))))


@pytest.fixture(scope="module")
def dragon(loaded) -> Steering:
    preset = loaded.topics["dragon"]
    return Steering(preset["codes"], strength=preset["strength"], mode=preset["mode"])


# -- which models a visitor may load ------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "owner/name", " owner/name ", "owner/name@v1.0",
                                  "owner/name@refs/pr/1", "Owner-1/name_2.x@" + "a" * 40])
def test_the_model_box_accepts_default_and_hub_repo_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_model_name(name, roots=()) == name.strip()


@pytest.mark.parametrize("name, problem", [
    ("", "empty"),
    ("   ", "empty"),
    ("/etc", "local directories is disabled"),
    ("/", "local directories is disabled"),
    ("../../etc/passwd", "local directories is disabled"),
    ("./secrets", "local directories is disabled"),
    ("~/.cache/huggingface", "local directories is disabled"),
    ("..", "local directories is disabled"),
    ("owner/../../etc", "not a Hub repo id"),
    ("owner/name/extra", "not a Hub repo id"),
    ("owner--x/name", "not a Hub repo id"),
    ("owner/name@../../../etc", "not a valid revision"),
    ("owner/name@", "not a valid revision"),
    ("owner/name@a b", "not a valid revision"),
    ("file:///etc/passwd", "no URL"),
    ("https://huggingface.co/owner/name", "no URL"),
    ("C:\\Windows\\System32", "no URL"),
    ("owner/na\x00me", "control characters"),
    ("owner/\nname", "control characters"),
    ("a" * 201, "at most 200 characters"),
])
def test_the_model_box_refuses_paths_urls_and_malformed_names(name, problem, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=problem.replace(" ", r"\s")):
        check_model_name(name, roots=())


def test_local_directories_load_only_inside_the_allowed_roots(tmp_path):
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    (root / "mine").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    roots = (root.resolve(),)
    assert check_model_name(str(root / "mine"), roots) == str((root / "mine").resolve())
    for sneaky in (str(outside), str(root / "mine" / ".." / ".." / "elsewhere"),
                   str(root / "escape")):
        with pytest.raises(ModelError, match="outside the folders"):
            check_model_name(sneaky, roots)
    with pytest.raises(ModelError, match="not found"):
        check_model_name(str(root / "missing"), roots)


def test_a_repo_id_that_also_names_a_local_path_is_refused(tmp_path, monkeypatch):
    # codebook.hub would load ./owner/name from the working directory instead of the Hub.
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="also names a local path"):
        check_model_name("owner/name", roots=())


def test_a_failed_load_changes_nothing_and_the_start_model_is_never_evicted(loaded, tmp_path):
    registry = ModelRegistry(Settings(model=str(loaded.directory), max_models=1))
    start = registry.start_model()
    with pytest.raises(ModelError, match="cannot load 'someone/missing'"):
        registry.load_for_visitor("someone/missing")
    assert registry.start_model() is start
    other = tmp_path / "other"
    build_app_model(other)
    registry.settings = Settings(model=str(loaded.directory), max_models=1,
                                 model_roots=(tmp_path.resolve(),))
    assert registry.load_for_visitor(str(other)).directory == other.resolve()
    assert registry.start_model() is start  # over max_models, yet kept


def test_settings_come_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("CODEBOOK_MODEL", "owner/name@v2")
    monkeypatch.setenv("CODEBOOK_APP_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("CODEBOOK_APP_MODEL_ROOTS", os.pathsep.join(["/tmp", "/srv/models"]))
    settings = Settings.from_env()
    assert (settings.model, settings.max_new_tokens) == ("owner/name@v2", 64)
    assert settings.model_roots == (Path("/tmp").resolve(), Path("/srv/models").resolve())
    monkeypatch.setenv("CODEBOOK_APP_CONCURRENCY", "many")
    with pytest.raises(ValueError, match="CODEBOOK_APP_CONCURRENCY must be an integer"):
        Settings.from_env()


# -- input checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, problem", [
    (math.nan, "finite"), (math.inf, "finite"), (-math.inf, "finite"), ("strong", "a number"),
    (None, "a number"), (101, "between"), (-101, "between"),
])
def test_strength_must_be_a_finite_number_in_range(loaded, value, problem):
    with pytest.raises(InputError, match=problem):
        inputs.steering(loaded, ["0:attn_heads:0:1"], value, "add", "all")


def test_integers_must_be_whole_and_in_range():
    assert inputs.integer("12", "seed", 0, 20) == 12
    with pytest.raises(InputError, match="whole number"):
        inputs.integer(1.5, "max new tokens", 1, 10)
    with pytest.raises(InputError, match="between 1 and 64"):
        inputs.max_new_tokens(-5, 64)
    with pytest.raises(InputError, match="between 1 and 64"):
        inputs.max_new_tokens(10**9, 64)
    assert 0 <= inputs.seed("not even looked at", random_seed=True) <= inputs.MAX_SEED


def test_prompts_must_be_non_empty_short_and_fit_the_context(loaded):
    assert inputs.prompt_ids(loaded, "the cat", 100, 10) == [0, 2, 4]
    with pytest.raises(InputError, match="prompt is empty"):
        inputs.prompt_ids(loaded, "  \n", 100, 10)
    with pytest.raises(InputError, match="100,000 characters; the limit is 2,000"):
        inputs.prompt_ids(loaded, "a" * 100_000, 2000, 10)
    with pytest.raises(InputError, match="exceed the model's context of 128"):
        inputs.prompt_ids(loaded, "the cat", 100, 126)


@pytest.mark.parametrize("codes, problem", [
    (["9:attn_heads:0:1"], "no codebook at layer 9"),
    (["0:mlp_out:0:1"], "no codebook at layer 0 site 'mlp_out'"),
    (["0:attn_heads:4:1"], r"head must be in \[0, 4\)"),
    (["0:attn_heads:0:32"], r"code id must be in \[0, 32\)"),
    (["0:attn_heads:0:-1"], "cannot parse code"),
    (["dragon"], "cannot parse code"),
    ([f"0:attn_heads:0:{c}" for c in range(5)], "only k=4 can be active"),
    ([f"0:attn_heads:{c % 4}:{c}" for c in range(65)], "limit is 64"),
])
def test_steering_codes_must_exist_in_the_model(loaded, codes, problem):
    with pytest.raises(InputError, match=problem):
        inputs.steering(loaded, codes, 1.0, "add", "all")


def test_steering_json_round_trips_and_bad_json_is_named(loaded, dragon):
    assert inputs.steering_json(loaded, dragon.to_json()) == dragon
    for text, problem in [("", "paste a steering set"), ("{not json", "not valid"),
                          ('["0:attn_heads:0:1"]', "must be an object"),
                          ('{"codes": [], "strength": 1}', "has no codes"),
                          ('{"codes": ["0:attn_heads:0:1"], "mode": "sideways"}', "mode"),
                          ('{"codes": ["0:attn_heads:0:1"], "block": ["0:attn_heads:0:1"]}',
                           "both forced and blocked"),
                          ('{"codes": ["0:attn_heads:0:1"], "colour": "red"}', "unknown"),
                          ('{"codes": ["0:attn_heads:0:1"], "code_strengths": '
                           '{"0:attn_heads:0:1": 30}}', "per-code strengths: the strength of "
                           "0:attn_heads:0:1 must be between -10 and 10, got 30"),
                          ('{"codes": ["0:attn_heads:0:1"], "code_strengths": '
                           '{"0:attn_heads:0:2": 3}}', "0:attn_heads:0:2, which is not a forced")]:
        with pytest.raises(InputError, match=problem):
            inputs.steering_json(loaded, text)
    assert inputs.steering(loaded, [], 1.0, "add", "all") is None


def test_regexes_must_compile_and_stay_short():
    assert inputs.regex(" dragon ") == "dragon"
    for pattern, problem in [("", "empty"), ("(", "invalid regex"), ("a" * 201, "limit is 200")]:
        with pytest.raises(InputError, match=problem):
            inputs.regex(pattern)


# -- generation -----------------------------------------------------------------------------------

def last(iterator):
    return collections.deque(iterator, maxlen=1)[0]


def test_greedy_side_by_side_equals_generate_with_and_without_steering(loaded, dragon):
    ids = encode_document(loaded.tokenizer, "the girl ran to the park")
    unsteered, steered = last(side_by_side(loaded, ids, dragon, 0, 0.0, 20))
    prompt = torch.tensor([ids])
    plain = loaded.model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None)
    forced = loaded.model.generate(prompt, steering=dragon, max_new_tokens=20, do_sample=False,
                                   eos_token_id=None)
    # A side stops at an end-of-story token; generate (told not to stop) goes on past it.
    assert unsteered == plain[0, len(ids):len(ids) + len(unsteered)].tolist()
    assert steered == forced[0, len(ids):len(ids) + len(steered)].tolist()
    assert unsteered != steered


def test_a_pasted_set_with_per_code_strengths_round_trips(loaded, dragon):
    from app.tabs import steer

    own = Steering(dragon.codes, strength=dragon.strength, mode=dragon.mode,
                   code_strengths={dragon.codes[0]: -2.5, dragon.codes[2]: 1.5})
    imported = inputs.steering_json(loaded, own.to_json())
    assert imported == own
    text = steer.strengths_text(imported)
    assert text == f"{dragon.codes[0]}=-2.5, {dragon.codes[2]}=1.5"
    # The box's text is what generation and the shared JSON read back.
    codes = [str(c) for c in dragon.codes]
    assert inputs.steering(loaded, codes, dragon.strength, dragon.mode, "all", [], text) == own
    shared = json.loads(steer.synced_json(codes, dragon.strength, dragon.mode, "all", [], text))
    assert Steering.from_dict({**shared, "block": []}) == own
    assert shared["code_strengths"] == {str(dragon.codes[0]): -2.5, str(dragon.codes[2]): 1.5}
    assert "code_strengths" not in json.loads(steer.synced_json(codes, 1, "add", "all", [], ""))


@pytest.mark.parametrize("typed, problem", [
    ("0:attn_heads:0:1", "write CODE=STRENGTH, e.g. 3:attn_heads:2:117=2.5, got "
                         "'0:attn_heads:0:1'"),
    ("0:attn_heads:0:1=", "write CODE=STRENGTH"),
    ("dragon=2", "cannot parse code 'dragon'"),
    ("0:attn_heads:0:1=11", "the strength of 0:attn_heads:0:1 must be between -10 and 10, "
                            "got 11"),
    ("0:attn_heads:0:1=-10.5", "must be between -10 and 10, got -10.5"),
    ("0:attn_heads:0:1=strong", "the strength of 0:attn_heads:0:1 must be a number, got "
                                "'strong'"),
    ("0:attn_heads:0:1=nan", "must be a finite number"),
    ("0:attn_heads:0:1=1, L0.attn_heads.H0.C1=2", "0:attn_heads:0:1 is given twice"),
    ("0:attn_heads:0:2=2", "0:attn_heads:0:2 is not among the codes switched on"),
    ("9:attn_heads:0:1=2", "code 9:attn_heads:0:1: there is no codebook at layer 9"),
    ("0:attn_heads:0:99=2", r"code id must be in \[0, 32\)"),
    (5, "per-code strengths must be text such as 3:attn_heads:2:117=2.5, got 5"),
])
def test_per_code_strengths_are_checked_and_a_bad_one_is_named(loaded, typed, problem):
    with pytest.raises(InputError, match="per-code strengths") as raised:
        inputs.steering(loaded, ["0:attn_heads:0:1", "1:attn_heads:3:30"], 1.0, "add", "all",
                        [], typed)
    assert raised.match(problem)


def test_per_code_strengths_parse_to_canonical_codes_and_only_forced_codes_take_them(loaded):
    import gradio as gr

    from app.tabs import steer

    typed = "0:attn_heads:0:1=2.5,\n L1.attn_heads.H3.C30 = -1 ,"
    assert inputs.code_strengths(typed) == {"0:attn_heads:0:1": 2.5, "1:attn_heads:3:30": -1.0}
    assert inputs.code_strengths({"0:attn_heads:0:1": 3}) == {"0:attn_heads:0:1": 3.0}
    assert inputs.code_strengths("") == inputs.code_strengths(None) == {}
    steering = inputs.steering(loaded, ["0:attn_heads:0:1", "1:attn_heads:3:30"], 1.0, "add",
                               "all", [], typed)
    assert steering.code_strengths == {CodeRef(0, "attn_heads", 0, 1): 2.5,
                                       CodeRef(1, "attn_heads", 3, 30): -1.0}
    with pytest.raises(InputError, match="not among the codes switched on"):
        inputs.steering(loaded, [], 1.0, "add", "all", [], "0:attn_heads:0:1=2")
    with pytest.raises(InputError, match="not among the codes switched on"):  # blocked
        inputs.steering(loaded, [], 1.0, "add", "all", ["0:attn_heads:0:1"], "0:attn_heads:0:1=2")
    # A code taken off the set loses its strength; the shared JSON waits for a set that runs.
    assert steer.strengths_kept(typed, ["1:attn_heads:3:30"]) == "1:attn_heads:3:30=-1"
    assert steer.strengths_kept(typed, ["0:attn_heads:0:1", "1:attn_heads:3:30"]) is None
    assert steer.strengths_kept("0:attn_heads:0:1=", []) is None  # being typed: left alone
    assert steer.synced_json(["1:attn_heads:3:30"], 1.0, "add", "all", [], typed) == gr.skip()


def test_a_per_code_strength_changes_the_seeded_story_as_the_library_samples_it(loaded, dragon):
    """The steering the app builds from the per-code strengths box samples what the library's
    generate samples with that Steering, seeded alike, and not what the set without it does."""
    codes = [str(c) for c in dragon.codes]
    own = inputs.steering(loaded, codes, dragon.strength, dragon.mode, "all", [],
                          f"{codes[0]}=-4, {codes[1]}=-4")
    assert own.code_strengths and own.codes == dragon.codes
    ids = encode_document(loaded.tokenizer, "a dog sat")
    _, steered = last(side_by_side(loaded, ids, own, 1234, 1.0, 30))
    _, without = last(side_by_side(loaded, ids, dragon, 1234, 1.0, 30))
    assert steered == sample(loaded.model, ids, 1, 30, 1.0, 1234, own)[0][:len(steered)]
    assert steered != without


def test_sampling_with_a_seed_is_the_cli_protocol_and_differs_only_by_steering(loaded, dragon):
    ids = encode_document(loaded.tokenizer, "a dog sat")
    unsteered, steered = last(side_by_side(loaded, ids, dragon, 1234, 1.0, 30))
    assert unsteered == sample(loaded.model, ids, 1, 30, 1.0, 1234)[0][:len(unsteered)]
    assert steered == sample(loaded.model, ids, 1, 30, 1.0, 1234, dragon)[0][:len(steered)]
    again = last(side_by_side(loaded, ids, dragon, 1234, 1.0, 30))
    assert again == (unsteered, steered)


def test_without_steering_both_sides_are_one_computation(loaded):
    ids = encode_document(loaded.tokenizer, "the cat")
    steps = list(side_by_side(loaded, ids, None, 5, 1.0, 12))
    assert all(a is b for a, b in steps)  # the same list: computed once
    assert 1 <= len(steps) <= 12


def test_each_step_yields_one_more_token_per_side_so_the_app_can_stream(loaded, dragon):
    ids = encode_document(loaded.tokenizer, "the cat")
    lengths = [(len(a), len(b)) for a, b in side_by_side(loaded, ids, dragon, 0, 0.0, 8)]
    final_a, final_b = lengths[-1]
    assert lengths == [(min(i, final_a), min(i, final_b)) for i in range(1, len(lengths) + 1)]
    assert len(lengths) == max(final_a, final_b) + (max(final_a, final_b) < 8)


def test_continuation_text_is_what_follows_the_prompt(loaded):
    ids = encode_document(loaded.tokenizer, "the cat")
    tokens = loaded.tokenizer("sat . dragon", add_special_tokens=False)["input_ids"]
    assert continuation_text(loaded, ids, tokens) == " sat . dragon"


# -- highlighting ---------------------------------------------------------------------------------

def test_topic_words_are_marked_and_everything_is_escaped():
    marker = highlight.Highlighter("dragon|fire")
    html = marker.story_html("<b>Once</b>", " a Dragon & fire<script>")
    assert "<b>" not in html and "<script>" not in html
    assert "&lt;b&gt;Once&lt;/b&gt;" in html
    assert "<mark>Dragon</mark> &amp; <mark>fire</mark>&lt;script&gt;" in html
    assert marker.count("dragon, fire, DRAGON") == 3 and marker.problem is None
    assert highlight.Highlighter("(unclosed").regex is None
    assert highlight.Highlighter("").regex is None
    assert highlight.Highlighter("x*").count("aaa") == 0  # empty matches


# Exponential for every backtracking engine (see tests/test_analysis.py).
HOSTILE = r"(?:.|..)*(?:#|%)"


def test_a_slow_regex_stops_highlighting_and_searches_with_a_message(loaded, monkeypatch):
    from app import analysis

    marker = highlight.Highlighter(HOSTILE, time_limit=0.3)
    story = " the girl ran to the park and saw a big dragon there" * 2
    html = marker.story_html("Once", story)
    assert story in html and "<mark>" not in html  # the story is shown, unmarked
    assert "took longer than 0.3 s to match; simplify it" in marker.problem
    started = time.monotonic()
    assert marker.count(story) == 0 and time.monotonic() - started < 0.1  # no second try
    monkeypatch.setattr(inputs, "REGEX_TIME_LIMIT", 0.3)
    for search in (analysis.code_search, analysis.topic_search):
        started = time.monotonic()
        with pytest.raises(InputError, match="took longer than 0.3 s to match; simplify it"):
            search(loaded, HOSTILE)
        assert time.monotonic() - started < 4


# -- token view -----------------------------------------------------------------------------------

def test_token_view_shows_the_codes_of_each_token_and_which_were_forced(loaded, dragon):
    ids = encode_document(loaded.tokenizer, "the cat sat . the dog ran")
    generated = Steering(dragon.codes, strength=dragon.strength, positions="generated")
    view = token_codes(loaded, ids, prompt_length=4, steering=generated)
    assert view.tokens[:3] == ["", " the", " cat"]  # surfaces: the text each token adds
    with torch.no_grad(), loaded.model.steer(generated, prompt_length=4), \
            loaded.model.capture_codes() as captured:
        loaded.model(torch.tensor([ids]))
    for key, calls in captured.items():
        assert np.array_equal(view.codes[key], calls[0][0].numpy())
    forced = {(c.layer, c.head, c.code) for c in dragon.codes}
    for position in range(len(ids)):
        rows = view.rows(position)
        assert len(rows) == 2 * 4  # two layers of four heads
        marked = {(r["layer"], r["head"], c) for r in rows for c in r["forced"]}
        # Forced codes fire at every generated position and are marked only there.
        assert marked == (forced if position >= 4 else set())
        if position >= 4:
            assert all(c in r["codes"] for r in rows for c in r["forced"])


# -- export choices, model tab, ZeroGPU -----------------------------------------------------------

def test_export_formats_are_onnx_torchscript_or_both():
    assert parse_formats("both") == ["onnx", "torchscript"]
    assert parse_formats(["torchscript", "onnx"]) == ["onnx", "torchscript"]
    assert parse_formats("onnx") == ["onnx"]
    for bad in ("", "tflite", None, ["onnx", "pickle"]):
        with pytest.raises(InputError, match="choose the export format"):
            parse_formats(bad)


def test_the_model_tab_shows_the_card_without_front_matter_and_the_metrics(loaded, tmp_path):
    from app import model_info

    assert model_info.card(loaded).startswith("# Tiny app model")
    facts = model_info.facts(loaded)
    assert "LlamaForCausalLM, 2 layers" in facts and "32 codes each" in facts
    assert "dragon" in facts and "loss 4.500" in facts and "loss 4.400" in facts
    (loaded.directory / "loss.png").write_bytes(b"\x89PNG fake")
    try:
        plots = model_info.plots(loaded, tmp_path / "served")
    finally:
        (loaded.directory / "loss.png").unlink()
    assert plots["code_usage.png"] is None
    assert Path(plots["loss.png"]).parent.parent == tmp_path / "served"


def test_the_gpu_decorator_is_spaces_gpu_on_zero_gpu_and_a_no_op_elsewhere(monkeypatch):
    from app import gpu

    def fn():
        return 1

    monkeypatch.setattr(gpu, "spaces", None)
    assert gpu.gpu(duration=10)(fn) is fn
    calls = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):
            calls.append(duration)
            return lambda f: ("wrapped", f)

    monkeypatch.setattr(gpu, "spaces", FakeSpaces)
    assert gpu.gpu(duration=10)(fn) == ("wrapped", fn) and calls == [10]


LEAN_IMPORT_CHECK = """
import sys
from app.lean_imports import skip_unused_imports
skip_unused_imports()
import gradio as gr
import gradio.component_meta as meta
from transformers.utils import is_scipy_available
from app.lean_imports import _no_stub_update

# Gradio's stub writer is the no-op, and components still work.
assert meta.create_or_modify_pyi is _no_stub_update
with gr.Blocks() as demo:
    box = gr.Textbox("hi")
assert demo.get_config_file()["components"]
# The optional packages the app does not use look absent, as on a Space.
assert not is_scipy_available()
for name in ("IPython", "scipy"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise AssertionError(name + " was importable")
print("lean imports ok")
"""


@pytest.mark.slow
def test_lean_imports_skip_gradios_stub_writer_and_unused_optional_packages():
    """In a fresh interpreter, as ``python app.py`` starts."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run([sys.executable, "-c", LEAN_IMPORT_CHECK], env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "lean imports ok" in done.stdout


def test_a_failed_export_names_the_problem_and_leaves_no_zip(tmp_path):
    from app.exporting import ExportCache

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    cache = ExportCache(tmp_path / "exports")
    with pytest.raises(InputError, match="export failed: .*has no codebook_config.json") as raised:
        cache.build(_Stub("broken", not_a_model), ["onnx"], False)
    assert not list((tmp_path / "exports").rglob("*.zip"))
    assert str(tmp_path) not in str(raised.value)  # the model's name, not its folder


class _Stub:
    """What the export cache reads of a loaded model: its name and directory."""

    def __init__(self, name: str, directory: Path):
        self.name, self.directory, self.label = name, directory, name


# -- analysis over the index ----------------------------------------------------------------------

def test_searches_and_code_details_read_the_models_index(loaded, dragon):
    from app import analysis

    rows, summary = analysis.topic_search(loaded, "dragon", top=40)
    assert summary.startswith("15 of 45 indexed stories match /dragon/")
    assert {r["name"] for r in rows} >= {str(c) for c in dragon.codes}
    assert all(r["example"].count("[") >= 1 for r in rows if r["count"])
    rows, summary = analysis.code_search(loaded, r"\bfire\b")
    assert "marks 15 of" in summary
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    details = analysis.code_details(loaded, dragon.codes[0])
    assert details["count"] > 0 and len(details["contexts"]) == min(12, details["count"])
    assert len(details["promoted_tokens"]) == 12
    with pytest.raises(InputError, match="none of the 45 indexed stories matches /zebra/"):
        analysis.topic_search(loaded, "zebra")
    with pytest.raises(InputError, match=r"code id must be in \[0, 32\)"):
        analysis.code_details(loaded, CodeRef(0, "attn_heads", 0, 99))


def test_without_an_index_searches_say_so_and_codes_still_show_what_they_promote(tmp_path):
    from app import analysis

    directory = build_app_model(tmp_path / "model")
    (directory / INDEX_NAME).unlink()
    bare = load(str(directory))
    for search in (analysis.topic_search, analysis.code_search):
        with pytest.raises(analysis.NoIndexError, match="has no code index"):
            search(bare, "dragon")
    details = analysis.code_details(bare, CodeRef(1, "attn_heads", 2, 3))
    assert details["count"] is None and details["contexts"] is None
    assert len(details["promoted_tokens"]) == 12


def test_a_presets_measured_steering_is_stated_only_when_recorded():
    from app.tabs.steer import measured

    stats = {"steer_eval": {"steered": {"rate": 0.9}, "baseline": {"rate": 0.35},
                            "samples_per_prompt": 10, "prompts": ["", "a", "b", "c"],
                            "fluency_ratio": 1.234}}
    assert measured({"codes": [], "stats": stats}) == (
        "Measured: 90% of 40 sampled stories mention it, against 35% unsteered, text loss "
        "1.23x unsteered. ")
    assert measured({"codes": []}) == ""
    assert measured({"codes": [], "stats": {"steer_eval": {"steered": {}}}}) == ""
    stats["steer_eval"]["fluency_ratio"] = None
    assert measured({"codes": [], "stats": stats}).endswith("against 35% unsteered. ")


# -- one range per control, refused at entry; no server paths in messages ------------------------

@pytest.fixture(scope="module")
def demo(loaded, tmp_path_factory):
    """The whole interface over the test model, built in this process (not served)."""
    from app.ui import build_demo

    settings = Settings(model=str(loaded.directory), max_new_tokens=48)
    return build_demo(ModelRegistry(settings), settings, tmp_path_factory.mktemp("work"))


def component(demo, label: str):
    [found] = [b for b in demo.blocks.values() if getattr(b, "label", None) == label]
    return found


def test_strength_has_one_range_negative_included_and_import_keeps_to_it(loaded, demo):
    import gradio as gr

    low, high = inputs.STRENGTH_RANGE
    assert low < 0 < 1 < high  # the library takes any finite strength: negative steers away
    assert inputs.steering(loaded, ["0:attn_heads:0:1"], low, "add", "all").strength == low
    assert Steering(["0:attn_heads:0:1"], strength=low).strength == low
    box = component(demo, "Strength")
    # A number box: a Gradio slider clamps a typed value to its ends on blur, silently.
    assert not isinstance(box, gr.Slider) and (box.minimum, box.maximum) == (low, high)
    for value in (low - 0.5, high + 0.5, 100):
        with pytest.raises(InputError, match=f"strength must be between {low:g} and {high:g}, "
                                             f"got {value:g}"):
            inputs.steering(loaded, ["0:attn_heads:0:1"], value, "add", "all")
        shared = json.dumps({"codes": ["0:attn_heads:0:1"], "strength": value})
        with pytest.raises(InputError, match=f"strength must be between {low:g} and {high:g}"):
            inputs.steering_json(loaded, shared)


def test_the_number_boxes_range_is_what_runs_and_a_value_outside_it_is_refused(demo):
    import gradio as gr

    from app.tabs import steer

    tokens = component(demo, "Max new tokens")
    assert not isinstance(tokens, gr.Slider)
    assert (tokens.minimum, tokens.maximum, tokens.precision) == (1, 48, 0)
    temperature = component(demo, "Temperature")
    assert (temperature.minimum, temperature.maximum) == (0, inputs.MAX_TEMPERATURE)
    with pytest.raises(InputError, match="temperature must be between 0 and 2, got 3"):
        inputs.temperature(3)

    def max_tokens(value):
        return inputs.max_new_tokens(value, 48)

    refuse = steer.refusing(max_tokens)
    # A good value is kept and becomes the one to fall back to; a bad one puts the last good
    # value back in the box and says why.
    assert refuse(12, 150) == (gr.skip(), 12, gr.skip())
    for bad, problem in ((10**9, "between 1 and 48, got 1000000000"),
                         (0, "between 1 and 48, got 0"), (2.5, "a whole number, got 2.5"),
                         (None, "a number, got None")):
        box, fallback, note = refuse(bad, 12)
        assert (box, fallback) == (12, gr.skip())
        assert f"max new tokens must be {problem}" in note and "kept 12" in note
    box, _, note = steer.refusing(inputs.strength)(-15, 4.0)
    assert box == 4.0 and "strength must be between -10 and 10, got -15; kept 4" in note


def test_a_malformed_code_typed_as_a_chip_is_refused_with_generations_message(loaded):
    from app.tabs import steer

    good = "0:attn_heads:0:1"
    for bad in ("abc", "99:attn_heads:0:1", "0:attn_heads:9:1", "0:attn_heads:0:99"):
        with pytest.raises(InputError) as generation:
            inputs.steering(loaded, [good, bad], 1.0, "add", "all")
        kept, note = steer.checked_chips(loaded, [good, bad])
        assert kept == [good] and str(generation.value) in note
    # Good chips pass untouched (no update), other spellings become the canonical one.
    assert steer.checked_chips(loaded, [good]) == ([good], None)
    assert steer.checked_chips(loaded, ["L0.attn_heads.H1.C2", good, good]) == (
        ["0:attn_heads:1:2", good], None)
    five = [f"0:attn_heads:0:{c}" for c in range(5)]
    kept, note = steer.checked_chips(loaded, five)
    assert kept == five[:4] and "only k=4 can be active" in note


def test_messages_show_the_models_name_and_files_base_names_never_server_paths(loaded, tmp_path):
    import gradio as gr

    from app import errors, exporting, model_info
    from app.ui import model_line

    directory = str(loaded.directory)
    assert loaded.label == loaded.directory.name and directory not in loaded.label
    for text in (model_line(loaded), model_info.facts(loaded)):
        assert loaded.label in text and directory not in text
    stub = LoadedModel.__new__(LoadedModel)
    stub.name, stub.directory = directory, tmp_path  # a directory without a model card
    assert str(tmp_path) not in model_info.card(stub)
    # Whatever a library puts in a message, a visitor sees file names, not where they are.
    message = errors.public(f"cannot load {directory!r}: /root/.cache/hub/models--a--b/"
                            "snapshots/c1/config.json is missing; see ~/work/notes.txt")
    assert "/root" not in message and directory not in message and "~/work" not in message
    assert "config.json is missing" in message and loaded.label in message

    @errors.shown
    def failing():
        raise InputError(f"wrote {tmp_path}/exports/abc/bundle")

    with pytest.raises(gr.Error) as raised:
        failing()
    assert str(tmp_path) not in str(raised.value) and "bundle" in str(raised.value)
    # The export's progress steps name the step, not the folders cbexport logs.
    for line in (f"loaded {directory}", "exporting ONNX", "tracing TorchScript",
                 "verifying (quick)", f"wrote {tmp_path}/codebook-app-x/exports/k/bundle"):
        step = exporting.progress_step(line)
        assert step is not None and "/" not in step[1], (line, step)
    assert exporting.progress_step("some other line") is None


def test_the_start_model_loads_by_its_shown_name(loaded):
    registry = ModelRegistry(Settings(model=str(loaded.directory)))
    start = registry.start_model()
    assert registry.load_for_visitor(start.label) is start
    assert registry.load_for_visitor(f" {start.label} ") is start


# -- topic chips toggle and combine; a Stop button while generating ------------------------------

def two_topics(loaded: LoadedModel) -> tuple[LoadedModel, list[str], list[str]]:
    """``loaded`` with a second preset, ``cave``, beside its own first one: one code shared with
    the first preset, two of its own on the same heads, another strength and mode."""
    import copy

    first_name, first = next(iter(loaded.topics.items()))
    first_codes = [str(CodeRef.parse(c)) for c in
                   (f"{c['layer']}:{c['site']}:{c['head']}:{c['code']}" for c in first["codes"])]
    others = []
    for code in first_codes[1:3]:
        ref = CodeRef.parse(code)
        others.append(f"{ref.layer}:{ref.site}:{ref.head}:{(ref.code + 1) % 32}")
    cave_codes = [first_codes[0], *[c for c in others if c not in first_codes]]
    model = copy.copy(loaded)
    cave = make_preset("cave", Steering(cave_codes, strength=2.0, mode="replace"), {})
    model.topics = {first_name: first, "cave": cave}
    return model, first_codes, cave_codes


def test_topic_chips_toggle_and_combine_and_clear_empties_them(loaded):
    from app.tabs import steer

    model, first, cave = two_topics(loaded)
    name = next(iter(model.topics))
    typed = "0:attn_heads:3:30"  # a code the visitor added by hand stays
    picked = steer.toggled(model, name, [], [typed])
    assert picked.selected == [name] and picked.codes == [typed, *first]
    assert picked.steering.strength == model.topics[name]["strength"]
    assert f"Steering toward **{name}**: {len(first) + 1} codes switched on" in picked.note
    # A second chip adds its codes to the set (a shared code once); its strength and mode win,
    # and the status says so.
    both = steer.toggled(model, "cave", picked.selected, picked.codes)
    assert both.selected == [name, "cave"]
    assert both.codes == [typed, *first, *[c for c in cave if c not in first]]
    assert (both.steering.strength, both.steering.mode) == (2.0, "replace")
    assert f"**{name}** + **cave**" in both.note and "those of **cave**" in both.note
    assert both.regex == f"(?:{model.topics[name]['regex']})|(?:cave)"
    # Clicking a selected chip again takes off its codes, except those another chip holds.
    left = steer.toggled(model, name, both.selected, both.codes)
    assert left.selected == ["cave"] and left.codes == [typed, *cave]
    assert left.regex == "cave" and f"Removed **{name}**" in left.note
    none = steer.toggled(model, "cave", left.selected, left.codes)
    assert none.selected == [] and none.codes == [typed] and none.steering is None
    # Selected chips look selected; Clear empties the set and unselects every chip.
    looks = steer.topic_buttons(model, [name])
    assert [u["variant"] for u in looks[:2]] == ["primary", "secondary"]
    assert "selected" in looks[0]["elem_classes"] and "selected" not in looks[1]["elem_classes"]
    codes, note, selected, *buttons = steer.cleared()
    assert codes == [] and selected == [] and "cleared" in note
    assert len(buttons) == steer.MAX_TOPIC_BUTTONS
    assert all(b["variant"] == "secondary" and "selected" not in b["elem_classes"]
               for b in buttons)
    with pytest.raises(InputError, match="no topic preset 'nope'"):
        steer.toggled(model, "nope", [], [])


def test_topic_chips_bring_their_presets_per_code_strengths_and_keep_the_typed_ones(loaded):
    from app.tabs import steer

    model, first, cave = two_topics(loaded)
    name = next(iter(model.topics))
    own = Steering(cave, strength=2.0, mode="replace", code_strengths={cave[-1]: -3.0})
    model.topics = {**model.topics, "cave": make_preset("cave", own, {})}
    typed = f"{first[1]}=2.5, 0:attn_heads:3:30=1"  # the second code is not switched on
    picked = steer.toggled(model, name, [], [], typed)
    assert picked.strengths == f"{first[1]}=2.5"  # the typed strength of a code in the set
    both = steer.toggled(model, "cave", picked.selected, picked.codes, picked.strengths)
    assert both.strengths == f"{first[1]}=2.5, {cave[-1]}=-3"
    left = steer.toggled(model, name, both.selected, both.codes, both.strengths)
    assert left.codes == cave and left.strengths == f"{cave[-1]}=-3"
    assert steer.toggled(model, "cave", left.selected, left.codes, left.strengths).strengths == ""
    # The /topic endpoint: a preset's own steering, its per-code strengths the last output.
    _, strength, *_, strengths = steer.applied_topic(model, "cave")
    assert (strength, strengths) == (2.0, f"{cave[-1]}=-3")


def test_generation_has_a_stop_button_that_stops_it_from_inside(demo):
    from app.tabs import steer

    config = demo.get_config_file()
    buttons = {c["props"].get("value"): c for c in config["components"] if c["type"] == "button"}
    stop = buttons["Stop"]
    assert stop["props"]["visible"] is False  # shown only while a generation streams
    # Stop sets the page's flag, which the generation checks after each step; nothing is
    # cancelled (a cancelled stream could end as failed, with Error badges on the stories).
    assert not any(d["cancels"] for d in config["dependencies"])
    assert steer.stop_flag("page", fresh=True) is steer.stop_flag("page")
    assert not steer.stop_flag("page").is_set() and steer.stop_flag("other") is None
    note = steer.stopped_note({"tokens": [12, 9], "seed": 5, "done": False})
    assert note.startswith("**Stopped**") and "12 and 9 new tokens" in note and "Seed 5" in note
    assert steer.stopped_note(None).startswith("**Stopped**")


# -- codes with labels -----------------------------------------------------------------------

def test_a_codes_label_is_the_tokens_it_promotes_computed_once_per_model(loaded):
    from app import analysis
    from codebook.analysis.promote import promoted_tokens

    codes = ["0:attn_heads:0:1", "1:attn_heads:3:30", "0:attn_heads:2:17"]
    started = time.perf_counter()
    labels = analysis.code_labels(loaded, codes + ["9:attn_heads:0:1", "nonsense"])
    first = time.perf_counter() - started
    assert set(labels) == {*codes, "9:attn_heads:0:1"}  # what cannot be parsed is left out
    assert labels["9:attn_heads:0:1"] == ""  # no such codebook: no label
    for code in codes:
        top = promoted_tokens(loaded.model, CodeRef.parse(code), analysis.LABEL_TOKENS,
                              loaded.surfaces())
        assert labels[code] == ", ".join(t["token"].strip() for t in top)
    assert analysis.labelled(codes[0], labels) == f"{codes[0]} · {labels[codes[0]]}"
    assert analysis.labelled("0:attn_heads:0:5", {}) == "0:attn_heads:0:5"
    # Cached per model: asking again computes nothing.
    started = time.perf_counter()
    assert analysis.code_labels(loaded, codes) == {c: labels[c] for c in codes}
    assert time.perf_counter() - started < max(first, 0.01)
    assert set(analysis._analysis(loaded).labels) >= set(codes)


def test_a_share_link_round_trips_and_a_bad_one_names_the_parameter():
    import urllib.parse

    from app.tabs import steer

    query = steer.link_query("someone/tiny-app", "the cat, & the dog", ["0:attn_heads:0:1",
                             "1:attn_heads:3:30"], -2.5, "replace", "generated", 77, 1.0, 12,
                             "dragon|cave", ["0:attn_heads:1:2"], {"1:attn_heads:3:30": 4.5})
    link = steer.read_link(dict(urllib.parse.parse_qsl(query)), 48)
    assert link == steer.Link("someone/tiny-app", "the cat, & the dog", 77,
                              ["0:attn_heads:0:1", "1:attn_heads:3:30"], -2.5, "replace",
                              "generated", 1.0, 12, "dragon|cave", ["0:attn_heads:1:2"],
                              {"1:attn_heads:3:30": 4.5})
    assert "code_strengths" not in steer.link_query("m", "p", ["0:attn_heads:0:1"], 1, "add",
                                                    "all", 0, 1.0, 12, "")
    assert steer.read_link({"__theme": "dark"}, 48) is None  # not a share link
    for bad, message in (({"seed": "x"}, "seed must be a number"),
                         ({"strength": "99"}, "strength must be between -10 and 10"),
                         ({"codes": "abc"}, "cannot parse code"),
                         ({"max_tokens": "49"}, "max new tokens must be between 1 and 48"),
                         ({"mode": "sideways"}, "mode must be one of"),
                         ({"code_strengths": "0:attn_heads:0:1=99"},
                          "per-code strengths: the strength of 0:attn_heads:0:1 must be")):
        with pytest.raises(InputError, match=f"the share link is not valid: {message}"):
            steer.read_link(bad, 48)


def test_the_steering_set_takes_blocked_codes(loaded):
    blocked = inputs.steering(loaded, [], 1.0, "add", "all", ["0:attn_heads:1:5"])
    assert blocked is not None and blocked.codes == [] and [str(c) for c in blocked.block] == [
        "0:attn_heads:1:5"]
    assert inputs.steering(loaded, [], 1.0, "add", "all", []) is None
    with pytest.raises(InputError, match="both forced and blocked"):
        inputs.steering(loaded, ["0:attn_heads:1:5"], 1.0, "add", "all", ["0:attn_heads:1:5"])
    with pytest.raises(InputError, match="no codebook at layer 9"):
        inputs.steering(loaded, [], 1.0, "add", "all", ["9:attn_heads:0:1"])
    shared = inputs.steering_json(loaded, json.dumps({"codes": [], "block": ["0:attn_heads:0:3"]}))
    assert [str(c) for c in shared.block] == ["0:attn_heads:0:3"]
    with pytest.raises(InputError, match="no codes, forced or blocked"):
        inputs.steering_json(loaded, json.dumps({"codes": []}))


def test_a_generations_outputs_are_postprocessed_as_gradio_postprocesses_them():
    """app.tabs.steer.postprocessed (the generation's events run with postprocess=False): every
    output value is what the component's own postprocess gives Gradio to send, updates and State
    values pass as they are, and the wrapped handler is still a generator function (Gradio
    streams it)."""
    import inspect

    import gradio as gr

    from app.tabs import steer

    outputs = [gr.HTML(), gr.Number(precision=0), gr.Markdown(), gr.JSON(), gr.State()]
    state = {"tokens": [[1, 2], [3]]}
    updates = [["<b>a</b>", 7.0, "  **Seed** 7  ", {"texts": ("x", "y"), "n": 2}, state],
               [gr.skip(), gr.skip(), "**Cannot do that**: no", gr.skip(), gr.skip()]]

    def handler():
        yield from updates

    wrapped = steer.postprocessed(handler, outputs)
    assert inspect.isgeneratorfunction(wrapped)
    first, second = list(wrapped())
    # (Markdown's postprocess is inspect.cleandoc: the first line's leading white space goes.)
    # (JSON's is a pydantic model, which Gradio sends as its dump.)
    first[3] = first[3].model_dump()
    assert first == ["<b>a</b>", 7, "**Seed** 7  ", {"texts": ["x", "y"], "n": 2}, state]
    assert isinstance(first[1], int) and first[4] is state
    assert second == [gr.skip(), gr.skip(), "**Cannot do that**: no", gr.skip(), gr.skip()]
