"""The paper's released models open by name (their bases from the table in codebook.original), with
the download size told before loading; a visitor's repo never chooses its base.

Offline throughout: stand-in repos of the same names (tiny checkpoints in the original library's
layout, from ``tests/fixtures/original``) in a Hugging Face cache made in the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codebook import CodebookModel, hub
from codebook.__main__ import main
from codebook.download_size import download_size, hub_file_sizes
from codebook.original import BASE_PATTERNS, KNOWN_ORIGINALS, known_original, load_original
from tests.test_original import FIXTURES, assert_matches_fixture, edit_json

TINY = "taufeeque/TinyStories-1Layer-21M-Codebook"
PYTHIA = "taufeeque/pythia410m_wikitext_attn_codebook_model"
FSM = "taufeeque/TokFSM_k1_codebook_model"
OTHER_COMMIT = "e" * 40
# Each stand-in: the fixture it copies, as the released model (weights as pytorch_model.bin, as
# the real repos have them) on the fixture's base, cached under the table's base name.
STAND_INS = {TINY: "gpt_neo_attn_preproj", PYTHIA: "gpt_neox_attn_preproj"}


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, ref: str = "main") -> Path:
    """``source`` as commit ``commit`` (what ``ref`` points to) of ``repo_id`` in
    huggingface_hub's cache layout; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def with_tokenizer(directory: Path) -> Path:
    from tests.test_analysis import word_tokenizer

    word_tokenizer().save_pretrained(directory)
    return directory


def as_released(fixture: str, tmp: Path) -> Path:
    """The fixture's checkpoint laid out as the authors' repos are: pytorch_model.bin, with a
    tokenizer and the run's other files beside it (training_args.bin is pickled: never read)."""
    src = tmp / f"{fixture}-released"
    shutil.copytree(FIXTURES / fixture / "codebook", src)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    (src / "training_args.bin").write_bytes(b"not read")
    (src / "README.md").write_text("stand-in\n")
    return with_tokenizer(src)


def fsm_checkpoint(directory: Path, num_codes: int = 16) -> Path:
    """A stand-in for the TokFSM model: a GPT-NeoX built from the table's base config, codebooks
    at attn_preproj (one per head) and mlp in every layer, saved in the library's layout (the
    wrapped model under ``model.``, a wrapped MLP's own weights under ``module_layer``)."""
    from transformers import AutoConfig, GPT2TokenizerFast, GPTNeoXForCausalLM

    config = AutoConfig.for_model(**KNOWN_ORIGINALS[FSM].base_config)
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(config)
    state = {}
    for key, tensor in base.state_dict().items():
        state["model." + key.replace(".mlp.", ".mlp.module_layer.")] = tensor
    dim, heads = config.hidden_size, config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        prefix = f"model.gpt_neox.layers.{layer}"
        leaves = [(f"{prefix}.attention.codebook_layer.codebook.{g}", dim // heads)
                  for g in range(heads)] + [(f"{prefix}.mlp.codebook_layer", dim)]
        for leaf, width in leaves:
            state[f"{leaf}.codebook.weight"] = torch.randn(num_codes, width)
            state[f"{leaf}.ln.weight"] = torch.ones(width)
            state[f"{leaf}.ln.bias"] = torch.zeros(width)
    directory.mkdir(parents=True)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["GPTNeoXCodebookModel"], "codebook_at": ["attn_preproj", "mlp"],
        "codebook_kwargs": {}, "codebook_type": ["group", "vanilla"], "k_codebook": [1, 1],
        "layers_to_snap": [0, 1, 2, 3], "loss": "aeloss", "model_type": "codebook",
        "num_codebooks": [4, 1], "num_codes": num_codes, "similarity_metric": "inner_product"}))
    # The authors' tokenizer: the ten digits and <|endoftext|> (create_tokenizer in their code).
    vocab = {str(i): i for i in range(10)} | {"<|endoftext|>": 10}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("")
    GPT2TokenizerFast(vocab_file=str(directory / "vocab.json"),
                      merges_file=str(directory / "merges.txt"),
                      pad_token="<|endoftext|>").save_pretrained(directory)
    return directory


def build_papers_hub(cache: Path, tmp: Path) -> None:
    """The stand-ins and their bases. The TinyStories base is cached at the table's pinned commit
    and, as ``main``, at another commit whose config does not fit: only the pin loads."""
    for repo, fixture in STAND_INS.items():
        cache_repo(cache, repo, as_released(fixture, tmp), "a" * 40)
        known = KNOWN_ORIGINALS[repo]
        cache_repo(cache, known.base, FIXTURES / fixture / "base",
                   known.base_revision or "b" * 40,
                   ref="main" if known.base_revision is None else "pinned")
    wrong = tmp / "wrong-base"
    shutil.copytree(FIXTURES / "gpt_neo_attn_preproj" / "base", wrong)
    edit_json(wrong / "config.json", vocab_size=100)
    cache_repo(cache, KNOWN_ORIGINALS[TINY].base, wrong, OTHER_COMMIT)
    cache_repo(cache, FSM, fsm_checkpoint(tmp / "fsm"), "c" * 40)


@pytest.fixture()
def papers_hub(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    build_papers_hub(cache, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


# -- the table ----------------------------------------------------------------------------------


def test_the_table_names_each_released_model_and_where_its_base_came_from():
    assert set(KNOWN_ORIGINALS) == {TINY, PYTHIA, FSM}
    assert KNOWN_ORIGINALS[TINY].base == "roneneldan/TinyStories-1Layer-21M"
    assert len(KNOWN_ORIGINALS[TINY].base_revision) == 40
    assert KNOWN_ORIGINALS[PYTHIA].base == "EleutherAI/pythia-410m-deduped"
    assert KNOWN_ORIGINALS[FSM].base is None and KNOWN_ORIGINALS[FSM].base_config
    for known in KNOWN_ORIGINALS.values():
        assert known.source and known.family in ("gpt2", "gpt_neo", "gpt_neox")
    assert known_original(TINY.lower() + "@main") is KNOWN_ORIGINALS[TINY]
    for name in ("someone/TinyStories-1Layer-21M-Codebook", "./" + TINY, "default"):
        assert known_original(name) is None


# -- the library and the CLI --------------------------------------------------------------------


@pytest.mark.parametrize("repo", sorted(STAND_INS))
def test_a_released_model_loads_by_name_on_its_tables_base(papers_hub, repo):
    model = CodebookModel.from_pretrained(repo)
    assert_matches_fixture(model, STAND_INS[repo])
    assert model.tokenizer is not None


def test_the_pinned_base_revision_is_the_one_read(papers_hub):
    # The base's main points to a config that does not fit: asked for main, the load fails.
    with pytest.raises(ValueError, match="does not fit base model"):
        load_original(TINY, "roneneldan/TinyStories-1Layer-21M")
    assert_matches_fixture(load_original(TINY), STAND_INS[TINY])


def test_a_model_trained_from_scratch_gets_the_base_config_kept_in_the_code(papers_hub):
    model = CodebookModel.from_pretrained(FSM)
    assert model.config.model_type == "gpt_neox"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (128, 4)
    assert model.codebook_config.sites == ["attn_heads", "mlp_out"]
    assert {layer.groups for (_, site), layer in model.codebook_layers().items()
            if site == "attn_heads"} == {4}
    assert model.tokenizer is not None and model.tokenizer.eos_token == "<|endoftext|>"
    ids = torch.tensor([[10, 3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 11)


def test_the_cli_converts_a_released_model_without_base(papers_hub, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert-original", TINY, "--out", str(out)]) == 0, capsys.readouterr().err
    assert_matches_fixture(CodebookModel.from_pretrained(out), STAND_INS[TINY])


def test_only_the_owner_follows_a_base_named_in_a_checkpoint(papers_hub, tmp_path):
    # Without a policy (the library, the CLI: the machine's owner) base_model_name_or_path is
    # followed, and an explicit base wins over the table; with any policy it is refused.
    src = tmp_path / "names-a-base"
    shutil.copytree(FIXTURES / "gpt_neo_attn_preproj" / "codebook", src)
    edit_json(src / "config.json", base_model_name_or_path=KNOWN_ORIGINALS[TINY].base + "@pinned")
    cache_repo(papers_hub, "visitor/names-a-base", src, "d" * 40)
    assert_matches_fixture(load_original("visitor/names-a-base"), "gpt_neo_attn_preproj")
    with pytest.raises(ValueError, match="cannot choose the base model it runs on"):
        load_original("visitor/names-a-base", policy=hub.Policy())


# -- download size ------------------------------------------------------------------------------


def fake_hub(files: dict[str, dict[str, int]], commits: dict[str, str]):
    def lookup(repo_id, revision, token):
        if repo_id not in files:
            raise FileNotFoundError("not found on the Hub (or private)")
        return files[repo_id], commits.get(repo_id, "f" * 40)
    return lookup


def test_the_size_counts_what_the_loaders_read_of_the_model_and_its_base(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    mb = 2**20
    files = {
        TINY: {"pytorch_model.bin": 371 * mb, "training_args.bin": 5000, "config.json": 655,
               "tokenizer.json": 2 * mb, "merges.txt": 456_000, "README.md": 17_900,
               ".gitattributes": 1520},
        "roneneldan/TinyStories-1Layer-21M": {"pytorch_model.bin": 269 * mb, "config.json": 1050,
                                              "tokenizer.json": 2 * mb, "vocab.json": 798_000,
                                              "readme.md": 665},
        "someone/ours": {"model.safetensors": 10 * mb, "pytorch_model.bin": 10 * mb,
                         "config.json": 100},
    }
    size = download_size(TINY, lookup=fake_hub(files, {}))
    model, base = size.repos
    assert model.size == 371 * mb + 655 + 2 * mb + 456_000 + 17_900  # no training_args.bin
    assert (base.repo_id, base.size) == ("roneneldan/TinyStories-1Layer-21M",
                                         1050 + 2 * mb + 798_000)  # config and tokenizer only
    assert size.total == model.size + base.size and size.to_download == size.total
    assert "to download" in size.describe() and "roneneldan/TinyStories-1Layer-21M" in \
        size.describe()
    # Safetensors weights: the pickled copy is not fetched. Another repo has no base to count.
    assert download_size("someone/ours", lookup=fake_hub(files, {})).total == 10 * mb + 100
    missing = download_size("someone/missing", lookup=fake_hub(files, {}))
    assert missing.total is None and "not found on the Hub" in missing.describe()


def test_the_size_is_asked_of_the_hub_and_unknown_when_it_cannot_answer(monkeypatch):
    from huggingface_hub import HfApi, constants

    class Sibling:
        def __init__(self, name, size):
            self.rfilename, self.size = name, size

    class Info:
        sha = "f" * 40
        siblings = [Sibling("config.json", 10), Sibling("model.safetensors", 90)]

    asked = []

    def model_info(self, repo_id, revision=None, files_metadata=False, token=None):
        asked.append((repo_id, revision, files_metadata))
        return Info()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    assert hub_file_sizes("someone/ours", "v1") == ({"config.json": 10,
                                                     "model.safetensors": 90}, "f" * 40)
    assert asked == [("someone/ours", "v1", True)]

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    assert hub_file_sizes("someone/ours") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    assert hub_file_sizes("someone/ours") is None and len(asked) == 1  # offline: not asked


def test_offline_the_size_is_measured_in_the_cache_or_unknown(papers_hub):
    size = download_size(TINY)
    snapshot = papers_hub / "models--taufeeque--TinyStories-1Layer-21M-Codebook" / "snapshots"
    weights = next(snapshot.iterdir()) / "pytorch_model.bin"
    assert all(r.source == "cache" for r in size.repos)
    assert size.repos[0].size > weights.stat().st_size  # the weights and the small files
    assert size.to_download == 0 and "local cache" in size.describe()
    base = size.repos[1]
    base_files = papers_hub / "models--roneneldan--TinyStories-1Layer-21M" / "snapshots" / \
        KNOWN_ORIGINALS[TINY].base_revision
    # Only the base's config files (no tokenizer in this one; never its weights).
    assert base.size == sum(f.stat().st_size for f in base_files.glob("*.json"))
    assert BASE_PATTERNS == ["*.json", "*.txt", "*.model"]
    unknown = download_size("someone/not-cached")
    assert unknown.total is None and "cannot be reached" in unknown.describe()


# -- the app ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def papers_app(tmp_path_factory):
    from tests.test_app_server import running_app
    from tests.test_app_units import build_app_model

    tmp = tmp_path_factory.mktemp("papers")
    cache = tmp / "hub"
    build_papers_hub(cache, tmp)
    src = tmp / "visitor"
    shutil.copytree(FIXTURES / "gpt_neo_attn_preproj" / "codebook", src)
    edit_json(src / "config.json", base_model_name_or_path=KNOWN_ORIGINALS[TINY].base)
    cache_repo(cache, "visitor/names-a-base", with_tokenizer(src), "d" * 40)
    with running_app(build_app_model(tmp / "start"), cache) as (url, lines):
        yield url, lines


def test_the_app_sizes_then_loads_a_released_model_by_name(papers_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(papers_app[0], verbose=False)
    note = client.predict(TINY, api_name="/model_size")
    assert "paper's released models" in note and "roneneldan/TinyStories-1Layer-21M" in note
    assert "MB" in note and "local cache" in note
    unknown = client.predict("someone/not-cached", api_name="/model_size")
    assert "download size unknown" in unknown
    assert client.predict("../etc", api_name="/model_size").startswith("**Cannot load**")
    assert client.predict("default", api_name="/model_size") == ""

    status, header, *_ = client.predict(TINY, api_name="/load_model")
    assert status == f"Loaded `{TINY}`." and TINY in header
    tokens = client.predict("w5 w6", "off", api_name="/tokens")
    assert tokens  # the loaded model reads text
    # A visitor's repo naming its base (a base that is even in the cache) is refused.
    with pytest.raises(AppError, match="cannot choose the base model it runs on"):
        client.predict("visitor/names-a-base", api_name="/load_model")
