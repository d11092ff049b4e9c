"""Widening a base's vocabulary (training/vocabulary.py, ``python -m training widen-vocab``)."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import tiny_base
from training.__main__ import main
from training.data import split_validation
from training.models import load_base
from training.vocabulary import learn_merges, widen_vocabulary

SPECIALS = ["<unk>", "<s>", "</s>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A llama2.c-like tokenizer with no merges yet: one piece per character, spaces included."""
    chars = SPECIALS + list(" " + string.ascii_letters + ".,!")
    backend = Tokenizer(BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[],
                            unk_token="<unk>"))
    backend.normalizer = normalizers.Prepend(" ")
    backend.decoder = decoders.Sequence([decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def char_model(tokenizer):
    model = tiny_base("llama")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


DOCS = ["the dragon saw the dragon.", "a dragon and the cat.", "the cat sat."] * 5


def test_merges_follow_pair_frequency_inside_words():
    # Words, with the leading space the tokenizer gives every document: " the" x20, " dragon"
    # x15, " cat" x10, " saw", " a", " and", " sat" x5. The pairs of " the" (20 each) beat all
    # others (15 at most), so the first three merges spell it.
    merges = learn_merges(char_tokenizer(), DOCS, 3)
    assert {left + right for left, right in merges} <= {" t", "th", "he", " th", "the", " the"}
    assert " the" in {left + right for left, right in merges}
    # Never across a word boundary or into punctuation.
    many = learn_merges(char_tokenizer(), DOCS, 40)
    assert all(" " not in right and "." not in left + right for left, right in many)
    assert {" dragon", " cat", " saw", " sat", " and"} <= {left + right for left, right in many}


def test_widened_model_spells_frequent_words_in_one_piece_and_keeps_what_it_knew():
    tokenizer = char_tokenizer()
    model = char_model(tokenizer).eval()
    old_ids = tokenizer.encode("the cat")
    with torch.no_grad():
        before = model(torch.tensor([old_ids])).logits
    embedding = model.get_input_embeddings().weight.detach().clone()
    unembedding = model.get_output_embeddings().weight.detach().clone()  # untied here
    model, wide = widen_vocabulary(model, tokenizer, DOCS, len(tokenizer) + 15)
    assert len(wide) == model.config.vocab_size == len(tokenizer) + 15
    assert wide.tokenize("the dragon") == [" the", " dragon"]
    assert wide.decode(wide.encode("the dragon saw a cat!")) == "the dragon saw a cat!"
    # A new piece starts as the mean of the pieces it replaces, in and out.
    dragon = wide.convert_tokens_to_ids(" dragon")
    parts = [tokenizer.convert_tokens_to_ids(c) for c in " dragon"]
    assert torch.allclose(model.get_input_embeddings().weight[dragon], embedding[parts].mean(0))
    assert torch.allclose(model.get_output_embeddings().weight[dragon],
                          unembedding[parts].mean(0))
    # Old pieces keep their ids and the model its outputs over them.
    with torch.no_grad():
        after = model(torch.tensor([old_ids])).logits
    assert torch.allclose(after[..., :len(tokenizer)], before, atol=1e-6)


def test_widening_stops_when_no_pair_occurs_twice():
    tokenizer = char_tokenizer()
    model, wide = widen_vocabulary(char_model(tokenizer), tokenizer, DOCS, len(tokenizer) + 100)
    # Every word of DOCS is one piece; nothing else repeats.
    assert len(wide) == model.config.vocab_size == len(tokenizer) + 19
    assert all(len(wide.tokenize(w)) == 1 for w in ("the", "dragon", "saw", "a", "and", "cat"))


def test_widening_errors_name_the_problem():
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="must exceed the base's"):
        widen_vocabulary(char_model(tokenizer), tokenizer, DOCS, len(tokenizer))
    with pytest.raises(ValueError, match="no words"):
        widen_vocabulary(char_model(tokenizer), tokenizer, ["1 2 3", "..."], 200)
    with pytest.raises(ValueError, match="the tokenizer has .* tokens but the model 97"):
        widen_vocabulary(tiny_base("llama"), tokenizer, DOCS, 200)
    byte_level = char_tokenizer()
    byte_level.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    with pytest.raises(ValueError, match="without a pre-tokenizer"):
        widen_vocabulary(char_model(byte_level), byte_level, DOCS, 200)


def test_cli_learns_only_from_the_training_documents(tmp_path, capsys):
    tokenizer = char_tokenizer()
    base = tmp_path / "base"
    char_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    docs = [f"story {i}: the dragon met the cat." for i in range(40)]
    # A frequent word, but only in a document that the split holds out.
    held_out = next(doc for doc in (f"{i} " + " ".join(["zyx"] * 200) for i in range(100))
                    if doc in split_validation([*docs, doc], 0.1, 0)[1])
    (tmp_path / "data.txt").write_text("\n<|endoftext|>\n".join([*docs, held_out]))
    out = tmp_path / "wide"
    argv = ["widen-vocab", "--base", str(base), "--data", str(tmp_path / "data.txt"),
            "--vocab-size", str(len(tokenizer) + 20), "--val-fraction", "0.1", "--output",
            str(out)]
    assert main(argv) == 0
    assert f"{len(tokenizer)} -> {len(tokenizer) + 20} pieces" in capsys.readouterr().out
    model, wide = load_base(str(out))
    assert model.config.vocab_size == len(wide) == len(tokenizer) + 20
    assert wide.tokenize("the dragon") == [" the", " dragon"]
    assert wide.tokenize("zyx") == [" ", "z", "y", "x"]
    assert main(argv) == 2  # the output exists: nothing is overwritten
    assert "exists and is not empty" in capsys.readouterr().err


def test_stories260k_widened_to_4096_spells_the_papers_topics_in_one_piece(shared_dir, tmp_path):
    data = [str(shared_dir / "data/tinystories/tinystories_v1_train_prefix_2MiB.txt")]
    out = tmp_path / "wide"
    assert main(["widen-vocab", "--base",
                 f"llama2c:{shared_dir}/models/stories260K/stories260K.bin", "--data", *data,
                 "--vocab-size", "4096", "--output", str(out)]) == 0
    _, wide = load_base(str(out))
    for word in ("dragon", "slide", "friend", "flower", "fire", "baby", "princess", "king"):
        assert wide.tokenize(word) == [" " + word], word
