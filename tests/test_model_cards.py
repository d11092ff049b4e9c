"""Model cards: written through huggingface_hub's ModelCard/ModelCardData and read back with it.

The training run's card (training/report.py), the shipped default model's (training/build.py's
ship stage) and an export bundle's (cbexport/card.py). Nothing here reaches the Hub: a Hub base's
card is served by a stand-in for ``hf_hub_download``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from cbexport.card import TAGS, source_metadata
from cbexport.card import model_card as bundle_card
from codebook import hub
from training import report
from training.build import SHIPPED_CARD
from training.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
SUMMARY = {
    "data": {"train_documents": 90, "train_tokens": 9000, "train_blocks": 35,
             "val_documents": 10, "val_tokens": 1000, "val_bytes": 4000},
    "base_parameters": 12345, "steps": 8, "tokens_per_step": 1024, "epochs": 0.5,
    "train_seconds": 12.0, "device": "cpu", "processes": 1, "tokens_per_second": 700.0,
    "command": "python -m training finetune --base x --data y --output z",
}
LM = {"loss": 2.0, "bits_per_byte": 1.5, "accuracy": 0.4}
SITE = {"mse": 0.1, "fvu": 0.2, "dead_fraction": 0.0, "dead_fraction_max": 0.0,
        "usage_entropy_bits": 3.0, "max_entropy_bits": 3.0}
EVALUATION = {**LM, "block_size": 32, "without_codebooks": LM, "sites": {"0:attn_heads": SITE}}


def write_run(directory: Path, **options) -> Path:
    """The files of a finished run that its card is written from."""
    directory.mkdir(parents=True, exist_ok=True)
    config = FinetuneConfig(**({"base": "owner/base", "data": ["stories.txt"],
                                "output": str(directory)} | options))
    config.save(directory)
    (directory / report.SUMMARY_FILE).write_text(json.dumps(SUMMARY))
    (directory / report.EVAL_FILE).write_text(json.dumps(EVALUATION))
    return directory


def write_card(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README.md").write_text(text)
    return directory


@pytest.fixture
def hub_cards(monkeypatch, tmp_path):
    """A stand-in Hub: ``hf_hub_download`` serves README.md of the repos in ``.cards`` (repo id
    -> card text), fails like an unreachable Hub for any other, and records ``.calls``."""
    cards, calls = {}, []

    def download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        if repo_id not in cards:
            raise huggingface_hub.errors.LocalEntryNotFoundError("offline")
        return str(write_card(tmp_path / "hub" / repo_id, cards[repo_id]) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return SimpleNamespace(cards=cards, calls=calls)


def test_hub_repo_id_names_only_hub_repos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    assert hub.hub_repo_id("gpt2") == "gpt2"
    assert hub.hub_repo_id("owner/name@v1.0") == "owner/name"
    for name in ("default", "local/model", "./x", "/abs/dir", "llama2c:a/b.bin",
                 "runs/build/base", "", "not a repo"):
        assert hub.hub_repo_id(name) is None, name


def test_training_card_metadata_of_a_hub_base_and_hub_data(tmp_path, hub_cards):
    hub_cards.cards["owner/base"] = "---\nlicense: apache-2.0\n---\n\n# base\n"
    run = write_run(tmp_path / "run", base="owner/base@main",
                    data=["hf:owner/stories@v2:train", "more.txt"],
                    val_data=["hf:owner/stories:validation"])
    report.write_model_card(run)
    card = ModelCard.load(run / "README.md")
    assert card.data.license == "apache-2.0"  # the base's, fetched from its card
    assert hub_cards.calls == [("owner/base", "README.md", "main")]
    assert card.data.base_model == "owner/base"
    assert card.data.datasets == ["owner/stories"]
    assert card.data.tags == ["codebook-features", "interpretability"]
    assert card.data.library_name == "codebook-features-studio"
    assert card.data.pipeline_tag == "text-generation"
    assert card.text.startswith("\n# Codebook model: run\n") and "| 0:attn_heads |" in card.text


def test_training_card_licence_from_the_option_a_local_base_or_nowhere(tmp_path, hub_cards):
    # --license wins, and the Hub is not asked
    run = write_run(tmp_path / "a", license="cc-by-4.0")
    report.write_model_card(run)
    assert ModelCard.load(run / "README.md").data.license == "cc-by-4.0"
    assert hub_cards.calls == []
    # a local base: its card's licence; no base_model (a directory is no Hub repo)
    base = write_card(tmp_path / "base", "---\nlicense: mit\nbase_model: gpt2\n---\n# base\n")
    run = write_run(tmp_path / "b", base=str(base))
    report.write_model_card(run)
    data = ModelCard.load(run / "README.md").data
    assert (data.license, data.base_model) == ("mit", None)
    # a Hub base the Hub cannot tell about (offline, no card): no licence
    run = write_run(tmp_path / "c", base="owner/other")
    report.write_model_card(run)
    data = ModelCard.load(run / "README.md").data
    assert (data.license, data.base_model) == (None, "owner/other")
    # re-initialised: trained from scratch, the Hub base only lent its architecture
    run = write_run(tmp_path / "d", base="owner/base", reinit_base=True, data=["TinyStories.txt"])
    report.write_model_card(run)
    data = ModelCard.load(run / "README.md").data
    assert (data.license, data.base_model) == (None, None)
    assert data.tags == ["codebook-features", "interpretability", "tinystories"]
    assert hub_cards.calls == [("owner/other", "README.md", None)]


def test_the_license_option_is_a_runtime_option(tmp_path):
    run = FinetuneConfig(base="b", data=["d"], output=str(tmp_path), license="mit")
    assert run.recipe_differences(FinetuneConfig(base="b", data=["d"], output=str(tmp_path))) == []
    assert "--license" not in run.command_line()


def test_shipped_card_front_matter_is_what_the_ship_stage_writes(tmp_path):
    shipped = hub.DEFAULT_MODEL_DIR / "README.md"
    data = ModelCard.load(shipped).data
    assert data.license == "mit" and data.base_model is None
    assert data.datasets == ["roneneldan/TinyStories"]
    assert data.tags == ["codebook-features", "interpretability"]
    assert data.pipeline_tag == "text-generation"
    # the ship stage, rerun on the shipped run's files, writes the same front matter
    for name in ("training_config.json", "run_summary.json", "eval.json"):
        (tmp_path / name).write_bytes((hub.DEFAULT_MODEL_DIR / name).read_bytes())
    for name in ("loss.png", "code_usage.png"):
        (tmp_path / name).touch()
    report.write_model_card(tmp_path, str(REPO / "training" / "default_model_notes.md"),
                            **SHIPPED_CARD)
    written = ModelCard.load(tmp_path / "README.md")
    assert written.data.to_dict() == data.to_dict()


MANIFEST = {
    "source": "owner/codebook-model",
    "model": {"model_type": "llama", "num_layers": 1, "vocab_size": 64, "kv_heads": 2,
              "head_dim": 8},
    "codebook": {"combine": "sum", "k": 2, "similarity": "cosine"},
    "sites": [{"layer": 0, "site": "attn_heads", "groups": 2, "num_codes": 8, "k": 2}],
    "topics": ["animals"], "formats": ["onnx"], "file_sizes": {"decoder.onnx": 2048},
}
REPORT = {"passed": True, "full": False, "near_ties": 0, "max_abs_diff": 1e-6, "tolerance": 1e-4}


def test_bundle_card_carries_the_source_models_licence_and_lineage():
    source = {"license": "mit", "base_model": "gpt2", "datasets": ["roneneldan/TinyStories"],
              "tags": ["not", "inherited"]}
    # exported from a Hub repo: that repo is the bundle's base model
    card = ModelCard(bundle_card(MANIFEST, REPORT, source_metadata(source, "owner/cb")))
    assert card.data.license == "mit" and card.data.base_model == "owner/cb"
    assert card.data.datasets == ["roneneldan/TinyStories"]
    assert card.data.tags == TAGS and card.data.pipeline_tag == "text-generation"
    assert card.text.startswith("\n# Codebook model bundle: owner/codebook-model\n")
    assert "--steer animals" in card.text
    # exported from a local directory: the source's own base model
    assert ModelCard(bundle_card(MANIFEST, REPORT, source_metadata(source, None))
                     ).data.base_model == "gpt2"
    bare = ModelCard(bundle_card(MANIFEST, REPORT)).data  # a loaded model: nothing to carry
    assert (bare.license, bare.base_model, bare.tags) == (None, None, TAGS)


@pytest.mark.slow
def test_exported_bundle_card_from_a_model_directory(tmp_path):
    from cbexport.bundle import export_bundle
    from tests.test_export import tiny_codebook_model

    model_dir = tmp_path / "model"
    tiny_codebook_model("llama", sites=["attn_heads"], num_codes=8, k=2).save_pretrained(
        model_dir)
    write_card(model_dir, "---\nlicense: apache-2.0\nbase_model: owner/base\n---\n# m\n")
    export_bundle(model_dir, tmp_path / "bundle", formats="onnx")
    data = ModelCard.load(tmp_path / "bundle" / "README.md").data
    assert (data.license, data.base_model, data.tags) == ("apache-2.0", "owner/base", TAGS)
