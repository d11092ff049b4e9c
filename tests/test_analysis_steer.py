"""Steering evaluation, topic presets and the analysis CLI, on tiny models."""

from __future__ import annotations

import json
import re

import pytest
import torch

from codebook import CodebookModel, Steering, attach_codebooks
from codebook.__main__ import main
from codebook.index import CodeIndex
from codebook.steer_eval import distinct_2, steer_eval
from codebook.topics import load_topics, make_preset, preset_steering, save_topics
from tests.test_analysis import WORDS, corpus, identity_model, with_tokenizer
from tests.tiny_models import VOCAB, tiny_base


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; more only contend for the shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


DRAGON = WORDS.index("dragon")
PLANTED = "1:block_out:0:5"


def steerable_model(seed=0) -> CodebookModel:
    """A tiny Llama that never writes "dragon" unless steered with code 5, and then always does.

    Its blocks add nothing, so the final residual is the token embedding snapped to the layer-1
    block-output codebook. Along one direction ``v``: every embedding and every code but code 5
    points against ``v``, code 5 is ``10 v``, and only the unembedding's "dragon" row reads ``v``
    (strongly). Unsteered, code 5 is never among the top-k and "dragon" has a logit far below
    the rest; forcing code 5 alone (mode "replace") makes "dragon" certain.
    """
    base = tiny_base("llama", seed)
    for block in base.model.layers:
        block.self_attn.o_proj.weight.data.zero_()
        block.mlp.down_proj.weight.data.zero_()
    model = attach_codebooks(base, sites=["block_out"], layers=[1], num_codes=24, k=3)
    torch.manual_seed(seed + 1)
    v = torch.randn(base.config.hidden_size)
    v /= v.norm()

    def against_v(x, weight):
        orth = x - (x @ v)[:, None] * v
        return orth - weight * orth.norm(dim=1, keepdim=True) * v

    emb = base.model.embed_tokens.weight.data
    emb.copy_(against_v(emb, 2.0))
    codes = model.codebook_layers()[(1, "block_out")].codebook.data
    codes[0] = against_v(torch.randn_like(codes[0]), 0.5)
    codes[0, 5] = 10 * v
    unembed = base.lm_head.weight.data
    unembed -= (unembed @ v)[:, None] * v
    unembed[DRAGON] = 50 * v
    return with_tokenizer(model.eval())


STEER = Steering([PLANTED], mode="replace")
PROMPTS = ("", "the cat")


def test_steer_eval_rates_on_a_case_whose_outcome_is_known():
    model = steerable_model()
    result = steer_eval(model, STEER, "dragon", prompts=PROMPTS, samples_per_prompt=4,
                        max_new_tokens=6, progress=False, keep_samples=True)
    assert result["baseline"]["rate"] == 0.0
    assert result["steered"]["rate"] == 1.0
    assert result["steered"]["per_prompt"] == {"": 1.0, "the cat": 1.0}
    steered = [s["continuation"] for s in result["steered"]["samples"]]
    assert len(steered) == 8 and all(s.strip() == " ".join(["dragon"] * 6) for s in steered)
    # Under the unsteered model "dragon" is all but impossible: steered text is far less fluent.
    assert result["fluency_ratio"] > 5
    assert result["steered"]["distinct_2"] == pytest.approx(1 / 5)
    assert result["steering"]["codes"] == [{"layer": 1, "site": "block_out", "head": 0,
                                            "code": 5}]


def test_steer_eval_rate_is_the_share_of_samples_the_regex_matches():
    model = steerable_model()
    result = steer_eval(model, STEER, r"\bw1\d\b|cat", prompts=PROMPTS, samples_per_prompt=6,
                        max_new_tokens=8, seed=3, progress=False, keep_samples=True)
    baseline = [s["continuation"] for s in result["baseline"]["samples"]]
    matched = [bool(re.search(r"\bw1\d\b|cat", s, re.I)) for s in baseline]
    assert result["baseline"]["rate"] == pytest.approx(sum(matched) / len(matched))
    assert 0 < result["baseline"]["rate"] < 1, "the check needs a rate strictly between 0 and 1"
    # The prompt itself ("the cat") is not part of the continuation.
    assert result["steered"]["rate"] == 0.0


def test_steer_eval_is_seeded_and_reproducible():
    model = steerable_model()
    run = lambda seed: steer_eval(model, STEER, "cat", prompts=PROMPTS, samples_per_prompt=3,
                                  max_new_tokens=8, seed=seed, progress=False,
                                  keep_samples=True)
    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first["baseline"]["samples"] != other["baseline"]["samples"]


def test_steer_eval_errors_name_the_problem():
    model = steerable_model()
    with pytest.raises(ValueError, match="invalid regex"):
        steer_eval(model, STEER, "drag(on", progress=False)
    with pytest.raises(ValueError, match="code id must be in"):
        steer_eval(model, Steering(["1:block_out:0:99"]), "dragon", prompts=("",),
                   samples_per_prompt=1, max_new_tokens=2, progress=False)


def test_distinct_2():
    assert distinct_2("the cat the cat the cat") == pytest.approx(2 / 5)
    assert distinct_2("a b c d") == 1.0
    assert distinct_2("alone") is None


def test_presets_round_trip_and_become_steerings(tmp_path):
    preset = make_preset("dragon", STEER, {"note": 1})
    path = save_topics(tmp_path, {"dragon": preset})
    loaded = load_topics(tmp_path)
    assert json.loads(path.read_text()) == loaded
    steering = preset_steering(loaded["dragon"], strength=2.0)
    assert steering.codes == STEER.codes and steering.mode == "replace"
    assert steering.strength == 2.0
    (tmp_path / "topics.json").write_text(json.dumps({"bad": {"codes": ["1:nowhere"]}}))
    with pytest.raises(ValueError, match="topic 'bad' is not a valid preset"):
        load_topics(tmp_path)
    assert load_topics(tmp_path / "missing") == {}


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture()
def model_dir(tmp_path):
    directory = tmp_path / "model"
    identity_model("dragon").save_pretrained(directory)
    return directory


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(corpus(12, topic_every=3)))
    return path


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_index_code_search_topics(model_dir, data_file, capsys):
    status, out, _ = run_cli(capsys, "index", "--model", model_dir, "--data", data_file,
                             "--no-progress")
    assert status == 0 and "12 of 12 documents" in out
    index = CodeIndex.load(model_dir)
    assert index.num_documents == 12 and index.meta["sources"] == [str(data_file)]

    status, out, _ = run_cli(capsys, "code", "0:block_out:0:5", "--model", model_dir, "--json")
    info = json.loads(out)
    assert status == 0 and info["count"] == 12
    assert all(c["token"] == " dragon" for c in info["contexts"])
    assert len(info["promoted_tokens"]) == 10

    status, out, _ = run_cli(capsys, "search", "--model", model_dir, "--regex", "(dragon)",
                             "--json")
    found = json.loads(out)
    assert status == 0 and found["targets"] == 12
    assert found["codes"][0]["name"] == "0:block_out:0:5"
    assert found["codes"][0]["precision"] == found["codes"][0]["recall"] == 1.0
    status, out, _ = run_cli(capsys, "search", "--model", model_dir, "--token", " dragon",
                             "--json")
    assert json.loads(out)["codes"] == found["codes"]

    status, out, _ = run_cli(capsys, "topics", "--model", model_dir, "--topic", "dragon",
                             "--statistic", "document", "--max-codes", "1", "--save", "--json")
    result = json.loads(out)["dragon"]
    assert status == 0 and result["selected"] == ["0:block_out:0:5"]
    assert load_topics(model_dir)["dragon"]["codes"] == [
        {"layer": 0, "site": "block_out", "head": 0, "code": 5}]
    status, out, _ = run_cli(capsys, "topics", "--model", model_dir)
    assert "dragon: /dragon/ 1 codes" in out


def test_cli_generate_and_steer_eval(tmp_path, capsys):
    directory = tmp_path / "steerable"
    steerable_model().save_pretrained(directory)
    status, out, _ = run_cli(capsys, "generate", "--model", directory, "--prompt", "the cat",
                             "--codes", PLANTED, "--mode", "replace", "--seed", 1,
                             "--max-new-tokens", 4, "--json")
    result = json.loads(out)
    assert status == 0 and result["steered"] == " dragon dragon dragon dragon"
    assert "dragon" not in result["unsteered"]

    status, out, _ = run_cli(capsys, "steer-eval", "--model", directory, "--topic", "dragon",
                             "--codes", PLANTED, "--mode", "replace", "--samples-per-prompt", 2,
                             "--max-new-tokens", 3, "--no-progress", "--json", "--save")
    result = json.loads(out)
    assert status == 0
    assert (result["baseline"]["rate"], result["steered"]["rate"]) == (0.0, 1.0)
    assert result["prompts"] == ["", "Once upon a time,", "Once there was a", "A long time ago,"]
    saved = load_topics(directory)["dragon"]
    assert saved["stats"]["steer_eval"]["steered"]["rate"] == 1.0 and saved["mode"] == "replace"
    # The saved preset now steers generate --steer.
    status, out, _ = run_cli(capsys, "generate", "--model", directory, "--steer", "dragon",
                             "--max-new-tokens", 2, "--json")
    assert json.loads(out)["codes_source"] == "preset"
    assert json.loads(out)["steered"] == "dragon dragon"  # empty prompt: no leading space


def test_cli_errors_are_one_clear_line(model_dir, data_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    status, _, err = run_cli(capsys, "index", "--model", model_dir, "--data", empty)
    assert status == 1 and "holds no text" in err
    status, _, err = run_cli(capsys, "search", "--model", model_dir, "--regex", "x")
    assert status == 1 and "no code index" in err
    run_cli(capsys, "index", "--model", model_dir, "--data", data_file, "--no-progress")
    status, _, err = run_cli(capsys, "search", "--model", model_dir, "--regex", "drag(on")
    assert status == 1 and "invalid regex 'drag(on'" in err
    status, _, err = run_cli(capsys, "code", "0:block_out:0:99", "--model", model_dir)
    assert status == 1 and "code id must be in [0, 24)" in err
    status, _, err = run_cli(capsys, "code", "nonsense", "--model", model_dir)
    assert status == 1 and "cannot parse code 'nonsense'" in err
    status, _, err = run_cli(capsys, "topics", "--model", model_dir, "--topic", "unicorn")
    assert status == 1 and "no document of the 12 matches 'unicorn'" in err
    status, _, err = run_cli(capsys, "generate", "--model", model_dir, "--steer", "unicorn",
                             "--max-new-tokens", 2)
    assert status == 1 and "unicorn" in err
    assert VOCAB == len(WORDS)
