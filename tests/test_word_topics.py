"""Topic search without a corpus: per-word statistics equal a full topic search."""

from __future__ import annotations

import pytest

from codebook import CodeRef
from codebook.analysis.index import Layout, corpus_documents
from codebook.analysis.search import topic_search
from codebook.analysis.word_topics import WordTopics
from codebook.text import token_surfaces
from tests.test_analysis import context_corpus, corpus, identity_model, one_thread  # noqa: F401


def full_search(model, docs, pattern):
    documents = corpus_documents(model, docs, progress=False)
    return topic_search(documents, Layout.of_model(model), token_surfaces(model.tokenizer),
                        {"t": pattern}, "context", top=50)["t"]


def ranked(result, n):
    return [(c.ref, c.hits, c.count, round(c.precision, 12)) for c in result.codes[:n]]


@pytest.mark.parametrize("word", ["dragon", "cave", "cat"])
def test_word_statistics_rank_codes_exactly_as_a_search_over_the_corpus(tmp_path, word):
    model = identity_model("cave")
    docs = context_corpus() + corpus(12, topic_every=3)
    stats = WordTopics.build(model, docs, min_documents=2, top=40, progress=False)
    stats = WordTopics.load(stats.save(tmp_path / "word_topics.safetensors"))
    mine = stats.result(f"^{word}$", top=10)
    reference = full_search(model, docs, rf"\b{word}\b")
    assert (mine.topic_documents, mine.context_tokens, mine.documents) == (
        reference.topic_documents, reference.context_tokens, reference.documents)
    assert mine.chance == pytest.approx(reference.chance)
    assert ranked(mine, 10) == ranked(reference, 10)


def test_the_planted_context_code_leads_for_its_topic():
    model = identity_model("cave")
    stats = WordTopics.build(model, context_corpus(), min_documents=2, progress=False)
    assert stats.result("dragon").codes[0].score == max(
        c.score for c in stats.result("dragon").codes)
    assert CodeRef(0, "block_out", 0, 5) in [c.ref for c in stats.result("dragon").codes[:3]]


def test_a_regex_over_several_words_ranks_each_code_by_its_best_word():
    model = identity_model("cave")
    docs = context_corpus() + corpus(12, topic_every=3)
    stats = WordTopics.build(model, docs, min_documents=2, progress=False)
    assert stats.matching_words(r"\b(?:cat|dog)") == ["cat", "dog"]
    both = stats.result(r"\b(?:cat|dog)", top=100)
    cat, dog = stats.result("^cat$", top=100), stats.result("^dog$", top=100)
    assert both.context_tokens == cat.context_tokens + dog.context_tokens
    assert both.topic_documents == cat.topic_documents + dog.topic_documents
    alone = {}
    for result in (cat, dog):
        for code in result.codes:
            alone[code.ref] = max(alone.get(code.ref, 0.0), code.precision)
    assert {c.ref: c.precision for c in both.codes} == alone
    assert all(0 <= c.precision <= 1 for c in both.codes)
    assert [c.score for c in both.codes] == sorted((c.score for c in both.codes), reverse=True)


def test_rare_or_unknown_words_are_refused_with_the_reason(tmp_path):
    model = identity_model("cave")
    docs = context_corpus()
    stats = WordTopics.build(model, docs, min_documents=5, progress=False)
    assert "dragon" not in stats.words  # in 4 documents only
    with pytest.raises(ValueError, match=r"no word of at least 5 .* matches 'dragon'.*--data"):
        stats.result("dragon")
    with pytest.raises(ValueError, match="no word appears in 100"):
        WordTopics.build(model, docs, min_documents=100, progress=False)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="bad.safetensors|header|deserializ"):
        WordTopics.load(tmp_path / "bad.safetensors")


def test_topic_search_on_the_shipped_model_needs_no_data(capsys):
    import json

    from codebook.__main__ import main
    from codebook.analysis.cli import TOPIC_MAX_CODES
    from codebook.analysis.word_topics import WORD_TOPICS_NAME
    from codebook.hub import DEFAULT_MODEL_DIR

    stats = WordTopics.load(DEFAULT_MODEL_DIR / WORD_TOPICS_NAME)
    assert stats.documents.min() >= 20 and stats.info["min_documents"] == 20
    assert {"rain", "fish", "cake", "snow", "boat", "dragon"} <= set(stats.words)
    assert main(["topics", "--model", "default", "--topic", "snow", "--json", "--threads", "1",
                 "--no-progress"]) == 0
    found = json.loads(capsys.readouterr().out)["snow"]
    assert found["topic_documents"] >= 20 and len(found["selected"]) == TOPIC_MAX_CODES
    assert found["codes"][0]["name"] == str(stats.result("snow").codes[0].ref)
    with pytest.raises(ValueError, match="no word of at least 20"):
        stats.result("zyzzyva")
