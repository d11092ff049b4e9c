"""build-default end to end on a tiny configuration, and its stages' building blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from codebook import CodebookModel
from codebook.analysis.word_topics import WordTopics
from training.__main__ import main
from training.tokenizer import STORY_WORDS, split_words


@pytest.mark.slow
def test_build_default_runs_every_stage_then_skips_them(tmp_path, capsys, shared_dir):
    shared = shared_dir  # skips without ../shared
    work, output = tmp_path / "work", tmp_path / "shipped"
    argv = ["build-default", "--work", str(work), "--output", str(output), "--shared",
            str(shared), "--max-stories", "300", "--vocab-size", "400", "--hidden-size", "32",
            "--num-heads", "2", "--pretrain-steps", "3", "--finetune-steps", "3",
            "--num-codes", "16", "--k", "2", "--min-documents", "20", "--topics", "friend",
            "--preset-num-codes", "2", "--preset-strengths", "2", "--calibration-samples", "1",
            "--samples-per-prompt", "1", "--max-new-tokens", "8", "--index-tokens", "3000",
            "--batch-size", "4", "--block-size", "64", "--threads", "1", "--no-progress",
            "--card-notes", str(Path(__file__).resolve().parents[1] / "training" /
                                "default_model_notes.md")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    for stage in ("stories", "tokenizer", "pretrain", "baseline", "finetune", "word topics",
                  "presets", "index"):
        assert f"[{stage}] making" in first
    model = CodebookModel.from_pretrained(output)
    # 400 learned pieces, plus those that make every story word one token.
    assert len(model.tokenizer) >= 400
    assert set(split_words(model.tokenizer, STORY_WORDS).values()) == {1}
    stats = WordTopics.load(output / "word_topics.safetensors")
    assert "friend" in stats.words and stats.info["min_documents"] == 20
    assert "friend" in json.loads((output / "topics.json").read_text())
    assert json.loads((work / "base" / "training_config.json").read_text())["codebooks"] is False
    card = ModelCard.load(output / "README.md").data  # the shipped card's metadata
    assert (card.license, card.base_model, card.datasets) == ("mit", None,
                                                              ["roneneldan/TinyStories"])
    # A second run finds every output and redoes nothing.
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "making" not in second and second.count("skipped") == 8
