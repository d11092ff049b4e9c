"""A word-level base from scratch: the tokenizer, the repaired corpus, synthesis, pretraining."""

from __future__ import annotations

import json

import pytest
import torch

from codebook.text import ENDOFTEXT, split_text
from tests.tiny_models import tiny_base
from training.__main__ import main
from training.corpus import fix_mojibake, recase, repair_lowercased, word_cases
from training.models import load_base
from training.synthesize import synthesize
from training.tokenizer import STORY_WORDS, split_words, train_tokenizer

STORIES = [
    "Once upon a time, Lily saw a dragon near the castle. The dragon was kind.",
    "Tom had a red ball. He played with his friend in the park under a big tree.",
    "A baby bird sat on a flower. The sun was warm and the bird sang a song.",
    "The princess and the king ate cake by the fire. It was snowing outside.",
    "Sue and her dog went on a boat. They saw a fish and a frog in the rain.",
] * 4


def test_the_tokenizer_makes_every_story_word_one_token_and_round_trips():
    tokenizer = train_tokenizer(STORIES, vocab_size=300)
    assert set(split_words(tokenizer, STORY_WORDS).values()) == {1}
    for story in STORIES[:5]:
        ids = tokenizer(story, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == story
    # Other text still encodes, byte by byte where it must.
    assert tokenizer.decode(tokenizer("Zebras ü 42", add_special_tokens=False)["input_ids"]) \
        == "Zebras ü 42"
    assert tokenizer.convert_ids_to_tokens(tokenizer.bos_token_id) == ENDOFTEXT
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="vocab-size must exceed"):
        train_tokenizer(STORIES, vocab_size=100)


def test_learned_words_keep_their_learned_pieces_when_others_are_added():
    plain = train_tokenizer(STORIES, vocab_size=300, required_words=())
    widened = train_tokenizer(STORIES, vocab_size=300)
    assert split_words(plain, ("garden",)) != {"garden": 1}  # added, not learned
    text = "Lily played with her sister by the kind old house."
    assert plain(text)["input_ids"] == widened(text)["input_ids"]


def test_the_lowercased_file_is_repaired_against_the_cased_stories():
    cased = ["Lily said, \u201cMom, I found it.\u201d She smiled at Tom.",
             "Ben likes the park. Ben and Lily run."]
    assert fix_mojibake("she said, â€œhi.â€\x9d itâ€™s") == "she said, \u201chi.\u201d it\u2019s"
    cases = word_cases(cased)
    assert cases["lily"] == "Lily" and "she" not in cases  # only ever starts a sentence
    assert recase('lily said, "mom, i see tom." she ran. then tom came!', cases) == \
        'Lily said, "Mom, I see Tom." She ran. Then Tom came!'
    lowercased = ("ben likes the park. ben and lily run.\n"
                  "lily saw a big dog.\n\nthe dog ran to tom.\n")
    assert repair_lowercased(lowercased, cased) == ["Lily saw a big dog.\nThe dog ran to Tom."]


def tiny_teacher():
    model = tiny_base("llama", seed=3)
    model.tokenizer = train_tokenizer(STORIES, vocab_size=300)
    model.resize_token_embeddings(len(model.tokenizer))
    model.config.bos_token_id = model.config.eos_token_id = 0
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
    with torch.no_grad():  # end a story now and then, so that samples finish
        model.lm_head.weight[0] += 0.1 * model.lm_head.weight.std()
    return model


@pytest.mark.slow
def test_synthesis_is_deterministic_for_a_seed_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr("training.synthesize.MIN_WORDS", 1)
    teacher = tiny_teacher()
    args = dict(batch_size=8, max_new_tokens=24, progress=False)
    whole = synthesize(teacher, teacher.tokenizer, 12, tmp_path / "a.txt", seed=5, **args)
    synthesize(teacher, teacher.tokenizer, 12, tmp_path / "b.txt", seed=5, **args)
    synthesize(teacher, teacher.tokenizer, 12, tmp_path / "c.txt", seed=6, **args)
    synthesize(teacher, teacher.tokenizer, 5, tmp_path / "d.txt", seed=5, **args)
    resumed = synthesize(teacher, teacher.tokenizer, 12, tmp_path / "d.txt", seed=5, **args)
    a = (tmp_path / "a.txt").read_text()
    assert whole["stories"] == 12 and len(split_text(a, "endoftext")) == 12
    assert (tmp_path / "b.txt").read_text() == a
    assert (tmp_path / "c.txt").read_text() != a
    assert (tmp_path / "d.txt").read_text() == a and resumed["stories"] == 12
    # A run killed while writing a story leaves half of it; resuming drops that half.
    half = a.split(f"\n{ENDOFTEXT}\n")
    (tmp_path / "e.txt").write_text("".join(f"{s}\n{ENDOFTEXT}\n" for s in half[:4])
                                    + half[4][:10])
    synthesize(teacher, teacher.tokenizer, 12, tmp_path / "e.txt", seed=5, **args)
    assert (tmp_path / "e.txt").read_text() == a
    stories = split_text(a, "endoftext")
    assert len({" ".join(s.split()) for s in stories}) == 12  # deduplicated


@pytest.mark.slow
def test_pretrain_trains_a_word_level_base_whose_loss_falls(tmp_path):
    data = tmp_path / "stories.txt"
    data.write_text("".join(f"{s}\n{ENDOFTEXT}\n" for s in STORIES * 5))
    output = tmp_path / "base"
    argv = ["pretrain", "--data", str(data), "--output", str(output), "--vocab-size", "300",
            "--hidden-size", "32", "--num-heads", "2", "--block-size", "32", "--batch-size", "8",
            "--max-steps", "60", "--lr-base", "3e-3", "--warmup-steps", "5", "--log-every", "10",
            "--eval-every", "0", "--checkpoint-every", "30", "--threads", "1", "--no-progress",
            "--val-fraction", "0.2"]
    assert main(argv) == 0
    losses = [r["loss"] for r in map(json.loads, (output / "metrics.jsonl").open())
              if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    model, tokenizer = load_base(str(output))
    assert model.config.num_hidden_layers == 1 and model.config.tie_word_embeddings
    assert set(split_words(tokenizer, STORY_WORDS).values()) == {1}
    recipe = json.loads((output / "training_config.json").read_text())
    assert recipe["codebooks"] is False and recipe["base"].endswith("initial")
    # The initial weights are kept for --resume; a fresh run into the same output is refused.
    assert (output / "checkpoints" / "initial" / "config.json").is_file()
    assert main(argv) == 2
