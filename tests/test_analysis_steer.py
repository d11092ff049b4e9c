"""Steering evaluation, topic presets and the analysis CLI, on tiny models."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from codebook import CodebookModel, CodeRef, Steering, attach_codebooks
from codebook.__main__ import main
from codebook.analysis.calibrate import calibrate
from codebook.analysis.index import INDEX_NAME, CodeIndex, build_index
from codebook.analysis.search import CodeScore
from codebook.analysis.steer_eval import distinct_2, steer_eval
from codebook.analysis.topics import (
    load_topics,
    make_preset,
    plot_presets,
    preset_steering,
    save_topics,
)
from codebook.analysis.userdata import analysis_file
from codebook.hub import DEFAULT_MODEL_DIR
from codebook.text import encode_document
from tests.test_analysis import WORDS, corpus, identity_model, with_tokenizer, word_tokenizer
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


# -- calibration --------------------------------------------------------------------------------


def ranked_planted_first():
    """Topic-search output with the steering code first, then two codes that change nothing."""
    refs = [CodeRef.parse(PLANTED), CodeRef(1, "block_out", 0, 3), CodeRef(1, "block_out", 0, 7)]
    return [CodeScore(ref, 1.0, 1.0, 1, 1, 1.0 - i / 10) for i, ref in enumerate(refs)]


def test_calibration_keeps_the_strongest_setting_within_the_fluency_limit():
    model = steerable_model()
    grid = dict(num_codes=(1,), strengths=(0.05, 1.0), per_head=3, modes=("add",),
                prompts=PROMPTS, samples_per_prompt=3, max_new_tokens=5, progress=False,
                min_distinct=0)  # "dragon dragon ..." repeats itself (tested below)
    loose = calibrate(model, ranked_planted_first(), "dragon", max_fluency=1000, **grid)
    weak, strong = loose.trials
    assert (weak["strength"], strong["strength"]) == (0.05, 1.0)
    # Code 5 at full strength always writes "dragon", at 0.05 never; the baseline never does.
    assert (loose.baseline_rate, weak["rate"], strong["rate"]) == (0.0, 0.0, 1.0)
    assert strong["fluency_ratio"] > 5 and weak["fluency_ratio"] < 1.01
    assert loose.chosen == 1 and loose.steering.strength == 1.0
    assert loose.steering.codes == [CodeRef.parse(PLANTED)]
    # With a tight limit the strong setting is too disfluent: the weak one is kept.
    tight = calibrate(model, ranked_planted_first(), "dragon", max_fluency=1.5, **grid)
    assert tight.chosen == 0 and tight.steering.strength == 0.05
    assert tight.to_dict()["fluency_met"] is True
    # Nothing within the limit: the most fluent setting, and the record says so.
    grid["strengths"] = (1.0, 0.5)
    none = calibrate(model, ranked_planted_first(), "dragon", max_fluency=2.0, **grid)
    assert [t["strength"] for t in none.trials] == [0.5, 1.0]
    assert 2.0 < none.trials[0]["fluency_ratio"] < none.trials[1]["fluency_ratio"]
    assert none.chosen == 0 and none.to_dict()["fluency_met"] is False


def test_calibration_measures_what_steer_eval_measures():
    model = steerable_model()
    found = calibrate(model, ranked_planted_first(), r"\bw1\d\b|dragon", num_codes=(1, 3),
                      strengths=(0.5,), per_head=3, prompts=PROMPTS, samples_per_prompt=3,
                      max_new_tokens=6, seed=4, progress=False)
    # Both modes by default, each over the rest of the grid.
    assert [(t["mode"], t["num_codes"]) for t in found.trials] == [
        ("add", 1), ("add", 3), ("replace", 1), ("replace", 3)]
    assert found.to_dict()["mode_grid"] == ["add", "replace"]
    chosen = found.trials[found.chosen]
    assert found.steering.mode == chosen["mode"]
    assert found.steering.codes == [c.ref for c in ranked_planted_first()][:chosen["num_codes"]]
    for trial in found.trials:
        steering = Steering([c.ref for c in ranked_planted_first()][:trial["num_codes"]],
                            strength=0.5, mode=trial["mode"])
        again = steer_eval(model, steering, r"\bw1\d\b|dragon", prompts=PROMPTS,
                           samples_per_prompt=3, max_new_tokens=6, seed=4, progress=False)
        assert trial["rate"] == again["steered"]["rate"]
        assert trial["fluency_ratio"] == pytest.approx(again["fluency_ratio"])
        assert found.baseline_rate == again["baseline"]["rate"]
    # The modes steer differently here, or trying both would prove nothing.
    assert len({(t["rate"], round(t["fluency_ratio"], 6)) for t in found.trials
                if t["num_codes"] == 1}) == 2


def test_calibration_finalists_are_chosen_on_both_rounds():
    model = steerable_model()
    grid = dict(num_codes=(1, 3), strengths=(0.3, 0.5), per_head=3, modes=("add",),
                prompts=PROMPTS, samples_per_prompt=3, max_new_tokens=6, seed=4, progress=False,
                max_fluency=1000, min_distinct=0)
    found = calibrate(model, ranked_planted_first(), "dragon", finalists=2, **grid)
    finalists = [t for t in found.trials if "both_rounds" in t]
    assert len(finalists) == 2
    # The finalists are the first round's best rates...
    assert min(t["rate"] for t in finalists) >= max(t["rate"] for t in found.trials
                                                    if "both_rounds" not in t)
    # ...measured again on the next seed: over both rounds, what steer_eval measures on each.
    for trial in finalists:
        steering = Steering([c.ref for c in ranked_planted_first()][:trial["num_codes"]],
                            strength=trial["strength"], mode="add")
        rates = [steer_eval(model, steering, "dragon", prompts=PROMPTS, samples_per_prompt=3,
                            max_new_tokens=6, seed=seed, progress=False)["steered"]["rate"]
                 for seed in (4, 5)]
        assert rates[0] == trial["rate"]
        assert trial["both_rounds"]["rate"] == pytest.approx(sum(rates) / 2)
    assert found.chosen == max(
        (found.trials.index(t) for t in finalists),
        key=lambda i: (found.trials[i]["both_rounds"]["rate"],
                       -found.trials[i]["both_rounds"]["fluency_ratio"]))
    assert found.to_dict()["finalists"] == 2
    one_round = calibrate(model, ranked_planted_first(), "dragon", finalists=0, **grid)
    assert not any("both_rounds" in t for t in one_round.trials)
    with pytest.raises(ValueError, match="finalists must be 0 or more"):
        calibrate(model, ranked_planted_first(), "dragon", finalists=-1, **grid)


def test_calibration_refuses_settings_that_repeat_themselves():
    model = steerable_model()
    grid = dict(num_codes=(1,), strengths=(0.05, 1.0), per_head=3, modes=("add",),
                prompts=PROMPTS, samples_per_prompt=3, max_new_tokens=5, max_fluency=1000,
                progress=False)
    # At full strength the planted code writes "dragon dragon ...": distinct-2 collapses.
    repetitive = calibrate(model, ranked_planted_first(), "dragon", min_distinct=0, **grid)
    weak, strong = repetitive.trials
    assert strong["distinct_2"] < 0.5 * weak["distinct_2"] and repetitive.chosen == 1
    varied = calibrate(model, ranked_planted_first(), "dragon", min_distinct=0.9, **grid)
    assert varied.chosen == 0 and varied.to_dict()["min_distinct"] == 0.9
    with pytest.raises(ValueError, match="min_distinct must be between 0 and 1"):
        calibrate(model, ranked_planted_first(), "dragon", min_distinct=1.5, **grid)


def test_calibration_restricts_codes_to_the_last_layers():
    base = tiny_base("llama", 0)
    model = with_tokenizer(attach_codebooks(base, sites=["block_out"], layers=[0, 1],
                                            num_codes=24, k=3).eval())
    # Ranked: a layer-0 code first, then layer-1 codes.
    refs = [CodeRef(0, "block_out", 0, 2), CodeRef(1, "block_out", 0, 4),
            CodeRef(1, "block_out", 0, 6)]
    ranked = [CodeScore(ref, 1.0, 1.0, 1, 1, 1.0 - i / 10) for i, ref in enumerate(refs)]
    run = dict(num_codes=(2,), strengths=(1.0,), modes=("add",), prompts=("",),
               samples_per_prompt=1, max_new_tokens=2, progress=False)
    last = calibrate(model, ranked, "dragon", last_layers=(1,), **run)
    assert [t["layers"] for t in last.trials] == [[1]]
    assert last.steering.codes == refs[1:]
    both = calibrate(model, ranked, "dragon", last_layers=(1, 2, None), **run)
    # "last 2" and "all" are the same two layers here: tried once.
    assert [t["layers"] for t in both.trials] == [[1], [0, 1]]
    assert both.to_dict()["last_layers_grid"] == [1, 2, None]
    with pytest.raises(ValueError, match="last_layers must be positive"):
        calibrate(model, ranked, "dragon", last_layers=(0,), **run)


def test_calibration_errors_name_the_problem():
    model = steerable_model()
    with pytest.raises(ValueError, match="max_fluency must be above 1"):
        calibrate(model, ranked_planted_first(), "dragon", max_fluency=0.9, progress=False)
    with pytest.raises(ValueError, match="at least one number of codes"):
        calibrate(model, ranked_planted_first(), "dragon", num_codes=(), progress=False)
    with pytest.raises(ValueError, match=r"unknown steering modes \['swap'\]"):
        calibrate(model, ranked_planted_first(), "dragon", modes=("add", "swap"), progress=False)
    with pytest.raises(ValueError, match="invalid regex"):
        calibrate(model, ranked_planted_first(), "drag(on", progress=False)
    with pytest.raises(ValueError, match="topic search found no code to steer with"):
        calibrate(model, [], "dragon", progress=False)


def test_presets_round_trip_and_become_steerings(tmp_path):
    preset = make_preset("dragon", STEER, {"note": 1})
    path = save_topics(tmp_path, {"dragon": preset})
    loaded = load_topics(tmp_path)
    assert json.loads(path.read_text()) == loaded
    steering = preset_steering(loaded["dragon"], strength=2.0)
    assert steering.codes == STEER.codes and steering.mode == "replace"
    assert steering.strength == 2.0
    assert "code_strengths" not in loaded["dragon"]
    # A strength per code is kept too.
    own = Steering([PLANTED], mode="replace", code_strengths={PLANTED: 2.5})
    save_topics(tmp_path, {"dragon": make_preset("dragon", own, {})})
    assert preset_steering(load_topics(tmp_path)["dragon"]) == own
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


def test_cli_index_can_put_stories_about_the_presets_first(model_dir, data_file, capsys):
    # corpus(): every third story (0, 3, 6, 9) mentions the dragon; keep room for two stories.
    docs = data_file.read_text().split("\n<|endoftext|>\n")
    save_topics(model_dir, {"dragon": make_preset("dragon", STEER, {})})
    first_two = sum(len(encode_document(word_tokenizer(), d)) for d in docs[:2])
    argv = ["index", "--model", model_dir, "--data", data_file, "--max-tokens", first_two,
            "--no-progress"]
    run_cli(capsys, *argv)
    plain = CodeIndex.load(model_dir)
    assert plain.num_documents == 2 and "topic_stories_first" not in plain.meta
    status, _, _ = run_cli(capsys, *argv[:-1], "--topic-stories", 3, "--max-tokens", 10_000)
    index = CodeIndex.load(model_dir)
    assert status == 0 and index.meta["topic_stories_first"] == {"dragon": 3}
    texts = [word_tokenizer().decode(index.document(d), skip_special_tokens=True)
             for d in range(index.num_documents)]
    assert texts[:4] == [docs[0], docs[3], docs[6], docs[1]]
    (model_dir / "topics.json").unlink()
    status, _, err = run_cli(capsys, *argv, "--topic-stories", 1)
    assert status == 1 and "--topic-stories needs topic presets" in err


def test_cli_topic_steering_takes_codes_from_the_last_layers(tmp_path, data_file, capsys):
    directory = tmp_path / "two-layer"
    with_tokenizer(attach_codebooks(tiny_base("llama", 0), sites=["block_out"], layers=[0, 1],
                                    num_codes=24, k=3).eval()).save_pretrained(directory)
    argv = ["topics", "--model", directory, "--data", data_file, "--topic", "dragon",
            "--max-codes", 6, "--no-progress", "--json"]
    layers_of = lambda out: {int(c.split(":")[0]) for c in json.loads(out)["dragon"]["selected"]}
    status, out, _ = run_cli(capsys, *argv)  # default: the last layer
    assert status == 0 and layers_of(out) == {1}
    status, out, _ = run_cli(capsys, *argv, "--last-layers", "all")
    assert status == 0 and layers_of(out) == {0, 1}
    status, _, err = run_cli(capsys, *argv, "--last-layers", "0")
    assert status == 1 and "--last-layers takes positive numbers or 'all', got 0" in err


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


def test_cli_presets_search_calibrate_evaluate_and_save(model_dir, data_file, capsys):
    save_topics(model_dir, {"kept": make_preset("cat", STEER, {})})
    argv = ["presets", "--model", model_dir, "--data", data_file, "--topic", "dragon",
            "--num-codes", 1, 2, "--strengths", 1.5, "--calibration-samples", 1,
            "--samples-per-prompt", 2, "--max-new-tokens", 3, "--no-progress"]
    status, out, _ = run_cli(capsys, *argv, "--json", "--plot", model_dir / "steering.png")
    assert status == 0
    assert (model_dir / "steering.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preset = load_topics(model_dir)["dragon"]
    assert json.loads(out)["dragon"] == preset
    assert "kept" in load_topics(model_dir)  # other presets stay
    stats = preset["stats"]
    calibration, evaluation = stats["calibration"], stats["steer_eval"]
    assert [(t["mode"], t["num_codes"]) for t in calibration["trials"]] == [
        ("add", 1), ("add", 2), ("replace", 1), ("replace", 2)]
    assert (calibration["seed"], evaluation["seed"]) == (1, 0)
    assert evaluation["samples_per_prompt"] == 2 and len(evaluation["prompts"]) == 4
    chosen = calibration["trials"][calibration["chosen"]]
    assert len(preset["codes"]) == chosen["num_codes"] and preset["strength"] == 1.5
    assert preset["mode"] == chosen["mode"]
    # The preset forces the best-ranked codes of the context search, recorded with it.
    assert stats["search"]["statistic"] == "context"
    assert [{k: c[k] for k in ("layer", "site", "head", "code")}
            for c in stats["search"]["codes"]] == preset["codes"]
    # The evaluation is the preset's own steer-eval on seed 0.
    status, out, _ = run_cli(capsys, "steer-eval", "--model", model_dir, "--topic", "dragon",
                             "--samples-per-prompt", 2, "--max-new-tokens", 3, "--no-progress",
                             "--json")
    again = json.loads(out)
    assert again["codes_source"] == "preset"
    assert again["steered"]["rate"] == evaluation["steered"]["rate"]
    assert again["fluency_ratio"] == pytest.approx(evaluation["fluency_ratio"])
    for seed in (1, 2):  # the calibration's two rounds
        status, _, err = run_cli(capsys, *argv, "--seed", seed)
        assert status == 1 and f"--seed {seed} is a calibration seed" in err
    status, _, err = run_cli(capsys, *argv, "--last-layers", "1", "late")
    assert status == 1 and "--last-layers takes positive numbers or 'all', got 'late'" in err
    with pytest.raises(ValueError, match="no preset has a steering evaluation"):
        plot_presets({"kept": load_topics(model_dir)["kept"]}, model_dir / "none.png")


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


# -- where analysis files go --------------------------------------------------------------------

COMMIT = "c" * 40


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def linked_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """``source`` as the main revision of ``repo_id`` in huggingface_hub's cache, laid out as the
    Hub client leaves it: the snapshot's files are links to content-addressed blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


@pytest.fixture()
def user_data(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user-data"
    monkeypatch.setenv("CODEBOOK_DATA_DIR", str(folder))
    return folder


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, read offline (huggingface_hub reads the variables once, at
    import, so its constants are patched too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_analysis_of_a_hub_model_writes_to_the_user_data_dir_not_the_cache(
        model_dir, data_file, offline_hub, user_data, capsys):
    # The repo ships presets and a one-story index, as the default model does.
    save_topics(model_dir, {"kept": make_preset("cat", STEER, {})})
    build_index(identity_model("dragon"), ["the cat sat"], progress=False).save(
        model_dir / INDEX_NAME)
    snapshot = linked_hub_cache(offline_hub, "someone/tiny", model_dir)
    blobs = digests(offline_hub / "models--someone--tiny" / "blobs")
    own = user_data / "hub" / "models--someone--tiny" / COMMIT

    status, out, err = run_cli(capsys, "index", "--model", "someone/tiny", "--data", data_file,
                               "--no-progress")
    assert status == 0, err
    assert f"wrote {own / INDEX_NAME}" in out
    status, out, err = run_cli(capsys, "topics", "--model", "someone/tiny", "--topic", "dragon",
                               "--statistic", "document", "--max-codes", "1", "--save")
    assert status == 0, err
    assert f"to {own / 'topics.json'}" in out
    # The cache is as the Hub left it: the same blobs, linked from the snapshot.
    assert digests(offline_hub / "models--someone--tiny" / "blobs") == blobs
    assert all(path.is_symlink() for path in snapshot.iterdir())
    # Readers look in the user data directory first: the new index, the presets with the
    # shipped one kept.
    assert analysis_file(snapshot, INDEX_NAME) == own / INDEX_NAME
    status, out, _ = run_cli(capsys, "code", "0:block_out:0:5", "--model", "someone/tiny",
                             "--json")
    assert json.loads(out)["indexed_documents"] == 12
    assert set(load_topics(snapshot)) == {"kept", "dragon"}
    # Even asked to, nothing is written into the cache.
    status, _, err = run_cli(capsys, "index", "--model", "someone/tiny", "--data", data_file,
                             "--output", snapshot, "--no-progress")
    assert status == 1 and "inside the Hugging Face cache" in err
    assert digests(offline_hub / "models--someone--tiny" / "blobs") == blobs


def test_analysis_of_the_default_model_leaves_the_package_alone(data_file, user_data, tmp_path,
                                                                  capsys):
    shipped = digests(DEFAULT_MODEL_DIR)
    shipped_presets = load_topics(DEFAULT_MODEL_DIR)
    status, out, err = run_cli(capsys, "index", "--model", "default", "--data", data_file,
                               "--no-progress")
    assert status == 0, err
    [own] = user_data.iterdir()  # the default model's folder, named after its weights
    assert own.name.startswith("default_model-") and f"wrote {own / INDEX_NAME}" in out
    status, out, err = run_cli(capsys, "topics", "--model", "default", "--topic", "dragon",
                               "--max-codes", "1", "--save")
    assert status == 0, err
    assert digests(DEFAULT_MODEL_DIR) == shipped
    presets = load_topics(DEFAULT_MODEL_DIR)  # the user's copy
    assert set(presets) == set(shipped_presets) and len(presets["dragon"]["codes"]) == 1
    assert CodeIndex.load(analysis_file(DEFAULT_MODEL_DIR, INDEX_NAME)).num_documents == 12
    # --output writes where it says (maintainers update the shipped files with
    # --output codebook/default_model).
    status, out, err = run_cli(capsys, "topics", "--model", "default", "--topic", "dragon",
                               "--max-codes", "2", "--save", "--output", tmp_path)
    assert status == 0, err
    assert len(load_topics(tmp_path)["dragon"]["codes"]) == 2
    assert set(load_topics(tmp_path)) == set(shipped_presets)
    assert digests(DEFAULT_MODEL_DIR) == shipped
