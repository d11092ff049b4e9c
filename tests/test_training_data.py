"""Reading, splitting, tokenising and ordering training text (training/data.py)."""

from __future__ import annotations

import pytest
import torch
from test_training_support import generated_stories, make_tokenizer

from training import data


def test_formats_are_detected_and_documents_stripped():
    assert data.split_text("a b\n<|endoftext|>\n c\nd \n<|endoftext|>\n") == ["a b", "c\nd"]
    assert data.split_text("one\ntwo\n\n  \nthree\n") == ["one\ntwo", "three"]
    assert data.split_text("one\ntwo\nthree") == ["one", "two", "three"]
    assert data.split_text("x\n\ny", fmt="lines") == ["x", "y"]
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        data.split_text("x", fmt="csv")


def test_read_documents_removes_duplicates_across_files(tmp_path):
    (tmp_path / "a.txt").write_text("Story one.\n<|endoftext|>\nStory two.\n")
    (tmp_path / "b.txt").write_text("Story  two. \n<|endoftext|>\nStory three.\n")
    assert data.read_documents([str(tmp_path)]) == ["Story one.", "Story two.", "Story three."]


def test_validation_is_held_out_by_document_stably():
    docs = generated_stories(400)
    docs = list(dict.fromkeys(docs))
    train, val = data.split_validation(docs, 0.1, seed=1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert len(val) == round(0.1 * len(docs))
    # the split depends on the documents, not on their order
    _, val_reversed = data.split_validation(docs[::-1], 0.1, seed=1)
    assert set(val_reversed) == set(val)
    _, val_other_seed = data.split_validation(docs, 0.1, seed=2)
    assert set(val_other_seed) != set(val)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        data.split_validation(["only one"], 0.1, seed=0)


def test_tokenize_puts_bos_before_each_document_and_counts_bytes():
    tokenizer = make_tokenizer(generated_stories(50))
    docs = ["The cat ran.", "Lily said \u201chi\u201d."]
    stream = data.tokenize(docs, tokenizer)
    ids = stream.tokens.tolist()
    first = tokenizer.encode(docs[0], add_special_tokens=False)
    second = tokenizer.encode(docs[1], add_special_tokens=False)
    assert ids == [tokenizer.bos_token_id, *first, tokenizer.bos_token_id, *second]
    assert stream.num_bytes == len(docs[0]) + len(docs[1].encode("utf-8"))  # curly quotes: 3 B


def test_blocks_share_one_token_and_eval_blocks_predict_every_token_once():
    tokens = torch.arange(23)
    blocks = data.pack_blocks(tokens, 5)
    assert blocks.tolist() == [list(range(i, i + 6)) for i in (0, 5, 10, 15)]
    evaluated = data.eval_blocks(tokens, 5)
    targets = torch.cat([b[1:] for b in evaluated])
    assert targets.tolist() == list(range(1, 23))
    assert data.pack_blocks(torch.arange(3), 5).shape == (0, 6)


def test_data_order_is_a_function_of_the_step_and_splits_across_processes():
    args = dict(num_blocks=37, seed=5)

    def read(step, micro, rank, world, batch, accum):
        return data.sample_indices(step, micro, rank, world, batch, accum, **args).tolist()

    for step in range(6):
        one_process = read(step, 0, 0, 1, 3, 2) + read(step, 1, 0, 1, 3, 2)
        two_processes = read(step, 0, 0, 2, 3, 1) + read(step, 0, 1, 2, 3, 1)
        assert one_process == two_processes
    # one epoch visits every block once, and the next epoch in another order
    epoch = [i for step in range(37) for i in read(step, 0, 0, 1, 1, 1)]
    assert sorted(epoch) == list(range(37))
    assert [i for s in range(37, 74) for i in read(s, 0, 0, 1, 1, 1)] != epoch
