"""Where base models come from, and bad inputs failing early with a clear message."""

from __future__ import annotations

import argparse
import shlex
import shutil

import pytest
import torch
from huggingface_hub import constants
from test_training_support import make_tiny_base, write_stories

from training.__main__ import main
from training.models import load_base

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, tiny_base):
    """A Hugging Face cache holding ``tester/tiny-llama`` (as a download would leave it), with
    the Hub switched off."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--tester--tiny-llama"
    shutil.copytree(tiny_base, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads its environment once, at import: set what it read
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_base_model_loads_from_the_offline_cache(offline_hub, tiny_base):
    model, tokenizer = load_base("tester/tiny-llama")
    local, local_tokenizer = load_base(str(tiny_base))
    assert tokenizer.encode("Lily had a cat.") == local_tokenizer.encode("Lily had a cat.")
    for (name, a), (_, b) in zip(model.state_dict().items(), local.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


@pytest.fixture
def stories(tmp_path):
    return write_stories(tmp_path / "stories.txt", 40)


def run_finetune(tmp_path, capsys, *options: str) -> str:
    """Run the CLI; it must fail (exit status 2) without creating the output directory."""
    out = tmp_path / "out"
    status = main(["finetune", "--output", str(out), "--threads", "1", "--no-progress",
                   *options])
    assert status == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(("options", "message"), [
    (["--sites", "attn_heads", "mlp"], "unknown codebook site(s) ['mlp']"),
    (["--num-codes", "16", "--k", "32"], "k must be between 1 and num_codes (16), got 32"),
    (["--block-size", "0"], "--block-size must be at least 1, got 0"),
    (["--similarity", "manhattan"], "similarity must be one of"),
    (["--push-to-hub", "not a repo"], "not a valid Hub repo id"),
])
def test_bad_options_fail_with_a_clear_message(tmp_path, capsys, tiny_base, stories, options,
                                               message):
    err = run_finetune(tmp_path, capsys, "--base", str(tiny_base), "--data", str(stories),
                       *options)
    assert message in err


def test_missing_and_empty_data_fail_early(tmp_path, capsys, tiny_base):
    err = run_finetune(tmp_path, capsys, "--base", str(tiny_base),
                       "--data", str(tmp_path / "missing.txt"))
    assert f"data file not found: {tmp_path / 'missing.txt'}" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n<|endoftext|>\n  \n")
    err = run_finetune(tmp_path, capsys, "--base", str(tiny_base), "--data", str(empty))
    assert "holds no text" in err
    one_story = tmp_path / "one.txt"
    one_story.write_text("A single story, on a single line.\n")
    err = run_finetune(tmp_path, capsys, "--base", str(tiny_base), "--data", str(one_story))
    assert "at least 2 are needed" in err


def test_too_little_text_for_one_block_fails_before_training(tmp_path, capsys, tiny_base,
                                                             stories):
    err = run_finetune(tmp_path, capsys, "--base", str(tiny_base), "--data", str(stories),
                       "--block-size", "100000")
    assert "too few for one block of --block-size 100000" in err


def test_a_base_model_that_cannot_be_found_fails_early(tmp_path, capsys, stories, offline_hub):
    err = run_finetune(tmp_path, capsys, "--base", str(tmp_path / "no-such-dir"),
                       "--data", str(stories))
    assert "model directory not found" in err
    err = run_finetune(tmp_path, capsys, "--base", "tester/no-such-model", "--data", str(stories))
    assert "'tester/no-such-model' is not in the local Hugging Face cache" in err
    err = run_finetune(tmp_path, capsys, "--base", f"llama2c:{tmp_path}/nothing.bin",
                       "--data", str(stories))
    assert "llama2.c checkpoint not found" in err
    err = run_finetune(tmp_path, capsys, "--data", str(stories))
    assert "finetune needs --base" in err


def test_evaluate_rejects_a_missing_model_or_file(tmp_path, capsys, tiny_base, stories):
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(stories)]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_base), "--data", str(tmp_path / "no.txt")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_push_to_hub_needs_a_token_before_training(tmp_path, capsys, tiny_base, stories,
                                                    monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    err = run_finetune(tmp_path, capsys, "--base", str(tiny_base), "--data", str(stories),
                       "--push-to-hub", "someone/tiny-codebooks")
    assert "--push-to-hub needs a Hugging Face token" in err


def test_push_uploads_the_run_without_its_checkpoints(tmp_path, monkeypatch):
    # The Hub is out of reach here: record what would be sent.
    import huggingface_hub

    from training.publish import push_output

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["exist_ok"]))

        def upload_folder(self, repo_id, folder_path, ignore_patterns, **kwargs):
            calls.append(("upload", repo_id, folder_path))
            from fnmatch import fnmatch

            files = [p.relative_to(folder_path).as_posix() for p in
                     sorted(tmp_path.joinpath("run").rglob("*")) if p.is_file()]
            calls.append(("files", [f for f in files
                                    if not any(fnmatch(f, pat) for pat in ignore_patterns)]))
            return "https://huggingface.co/someone/tiny/commit/1"

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "model.safetensors").write_text("x")
    for name in ("README.md", "config.json", "codebooks.safetensors", "loss.png"):
        (run / name).write_text("x")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert push_output(run, "someone/tiny", token="t").endswith("/commit/1")
    assert calls == [("token", "t"), ("create", "someone/tiny", True),
                     ("upload", "someone/tiny", str(run)),
                     ("files", ["README.md", "codebooks.safetensors", "config.json",
                                "loss.png"])]


def test_the_recorded_command_line_parses_back_to_the_same_recipe(tmp_path):
    from training.__main__ import build_parser, finetune_config
    from training.config import FinetuneConfig

    config = FinetuneConfig(base="llama2c:m.bin", data=["a.txt", "b dir"], output=str(tmp_path),
                            sites=["attn_heads", "mlp_out"], layers=[0, 2], k=4,
                            kmeans_init=False, lr_codebook=2e-3, max_steps=7)
    line = config.command_line()
    assert line.startswith("python -m training finetune ") and "'b dir'" in line
    args = build_parser().parse_args(shlex.split(line)[3:])
    assert finetune_config(args) == config
    # --resume takes the recipe saved in the output directory; runtime options may change
    config.save(tmp_path)
    args = build_parser().parse_args(["finetune", "--output", str(tmp_path), "--resume",
                                      "--threads", "3"])
    resumed = finetune_config(args)
    assert resumed.recipe_differences(config) == [] and (resumed.resume, resumed.threads) == (
        True, 3)


def test_every_recipe_field_is_an_option_of_the_same_name_and_default():
    """The CLIs are plain argparse: these keep them and the dataclasses in step."""
    import dataclasses

    from training.__main__ import build_parser
    from training.build import BuildConfig
    from training.config import FinetuneConfig

    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices

    def options(command: str) -> dict[str, argparse.Action]:
        return {a.dest: a for a in commands[command]._actions if a.dest != "help"}

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    finetune = options("finetune")
    assert set(finetune) == fields | {"preset"}
    assert all(finetune[name].help and finetune[name].default is argparse.SUPPRESS
               for name in fields)  # defaults come from the preset, the saved recipe, the config
    codebook_only = {"base", "codebooks", "reinit_base", "sites", "layers", "num_codes", "k",
                     "similarity", "combine", "layer_norm", "reconstruction_weight",
                     "kmeans_init", "kmeans_tokens", "kmeans_iters", "dead_code_steps",
                     "lr_codebook"}
    pretrain = options("pretrain")
    assert set(pretrain) == (fields - codebook_only) | {
        "family", "num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
        "tokenizer"}
    build = options("build-default")
    defaults = BuildConfig()
    assert {name: action.default for name, action in build.items()} == dataclasses.asdict(
        defaults)
    assert all(action.help for action in build.values())
    parsed = build_parser().parse_args(["build-default", "--no-baseline", "--preset-strengths",
                                        "1", "2.5", "--max-stories", "3"])
    assert (parsed.baseline, parsed.preset_strengths, parsed.max_stories) == (False, [1.0, 2.5],
                                                                              3)


def test_runs_of_one_preset_with_different_outputs_keep_their_own_checkpoints(tmp_path,
                                                                              monkeypatch):
    from pathlib import Path

    import training.__main__ as cli
    from training import checkpoint
    from training.presets import PRESETS
    from training.trainer import _check_output

    monkeypatch.chdir(tmp_path)  # relative paths resolve where the command runs
    monkeypatch.setattr(cli, "preset", lambda name: dict(PRESETS[name]))  # needs no ../shared

    def config_for(*options):
        args = cli.build_parser().parse_args(["finetune", "--preset", "stories260k", *options])
        return cli.finetune_config(args)

    first = config_for("--output", "run-a")
    assert first.checkpoint_path == Path("run-a") / "checkpoints"
    saved = first.checkpoint_path / "step-00000100"  # what the first run left behind
    saved.mkdir(parents=True)
    (saved / checkpoint.STATE_FILE).write_text("{}")
    (first.checkpoint_path / checkpoint.LATEST).write_text(saved.name + "\n")
    with pytest.raises(FileExistsError, match="pass --resume"):
        _check_output(config_for("--output", "run-a"))
    assert _check_output(config_for("--output", "run-b")) is None  # a fresh run of its own
    assert config_for("--output", "run-c", "--checkpoint-dir", "elsewhere").checkpoint_path == (
        Path("elsewhere"))
