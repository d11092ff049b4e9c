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


# -- Hub datasets --------------------------------------------------------------------------------

TINYSTORIES_FILES = ["README.md", "TinyStories-train.txt", "TinyStories-valid.txt",
                     "TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt",
                     "TinyStories_all_data.tar.gz",
                     "data/train-00000-of-00004-2d5a1467fff1081b.parquet",
                     "data/train-00001-of-00004-5852b56a2bd28fd9.parquet",
                     "data/validation-00000-of-00001-869c898b519ad725.parquet"]


@pytest.mark.parametrize("selector, kind, expected", [
    ("train", "split", TINYSTORIES_FILES[6:8]),  # the parquet copy, not the .txt one as well
    ("validation", "split", TINYSTORIES_FILES[8:]),
    ("TinyStoriesV2-GPT4-valid.txt", "files", ["TinyStoriesV2-GPT4-valid.txt"]),
    ("TinyStories-*.txt", "files", ["TinyStories-train.txt", "TinyStories-valid.txt"]),
    ("test", "split", []),
])
def test_hub_data_files_are_chosen_by_split_and_format(selector, kind, expected):
    assert data.parse_hub_source(f"roneneldan/TinyStories:{selector}")[1:] == (selector, kind)
    assert data.choose_data_files(TINYSTORIES_FILES, selector, kind) == expected


def test_a_hub_repo_without_split_names_is_all_train():
    files = ["stories.jsonl", "notes/constraint.txt"]
    assert data.choose_data_files(files, "train", "split") == ["stories.jsonl"]
    assert data.choose_data_files(files, "validation", "split") == []
    assert data.parse_hub_source("me/set@v1") == ("me/set@v1", "train", "split")


HUB_READER = """
import json, sys
from training.data import read_documents
results = {}
for source in sys.argv[1:]:
    try:
        results[source] = read_documents([source])
    except Exception as err:
        results[source] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
"""


def test_hub_datasets_are_read_through_the_offline_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_hub import REPO_ROOT, build_hub_cache

    main, v1 = tmp_path / "main", tmp_path / "v1"
    (main / "data").mkdir(parents=True)
    (main / "README.md").write_text("# stories\n")
    pq.write_table(pa.table({"text": ["A cat sat.", "  ", "A dog ran."], "id": [1, 2, 3]}),
                   main / "data" / "train-00000-of-00001.parquet")
    (main / "data" / "train.txt").write_text("The same stories as text.\n")  # parquet wins
    (main / "data" / "validation.jsonl").write_text(
        '{"text": "Held out one."}\n{"story": "no text column here"}\n')
    (main / "extra.csv").write_text('text,label\n"Extra, with a comma.",1\n')
    (v1 / "data").mkdir(parents=True)
    (v1 / "data" / "train.txt").write_text("Old one.\n<|endoftext|>\nOld two.\n")
    cache = tmp_path / "hub"
    build_hub_cache(cache, "tester/stories", {"main": main, "v1": v1}, repo_type="dataset")
    sources = ["hf:tester/stories", "hf:tester/stories:validation", "hf:tester/stories:extra.csv",
               "hf:tester/stories@v1", "hf:tester/stories:test", "hf:tester/missing",
               "hf:tester/stories@v2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", HUB_READER, *sources], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["hf:tester/stories"] == ["A cat sat.", "A dog ran."]
    assert results["hf:tester/stories:validation"] == ["Held out one."]
    assert results["hf:tester/stories:extra.csv"] == ["Extra, with a comma."]
    assert results["hf:tester/stories@v1"] == ["Old one.", "Old two."]
    assert results["hf:tester/stories:test"].startswith("ValueError: Hub dataset 'tester/stories' "
                                                        "has no data files for the split 'test'")
    for missing in ("hf:tester/missing", "hf:tester/stories@v2"):
        assert results[missing].startswith("FileNotFoundError"), results[missing]
        assert "not in the local Hugging Face cache" in results[missing]


def test_a_hub_file_without_the_text_column_names_its_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"story": "x", "id": 1}\n')
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['id', 'story'\]"):
        data._file_documents(path, "auto", "text", "rows.jsonl of Hub dataset 'a/b'")
    assert data._file_documents(path, "auto", "story", "rows.jsonl") == ["x"]
