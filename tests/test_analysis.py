"""Code index, code search, topic search, contexts and promoted tokens, on tiny models."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from codebook import CodeRef, attach_codebooks
from codebook.analysis.contexts import code_summary
from codebook.analysis.index import (
    CodeIndex,
    Layout,
    Site,
    build_index,
    corpus_documents,
    topic_stories_first,
)
from codebook.analysis.promote import promoted_tokens, residual_vector
from codebook.analysis.regex import RegexTimeout, compile_regex
from codebook.analysis.search import (
    CodeScore,
    code_search,
    regex_targets,
    select_codes,
    token_targets,
    topic_search,
)
from codebook.text import encode_document, token_surfaces
from tests.test_model import tiny_model
from tests.tiny_models import VOCAB, tiny_base


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; more only contend for the shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TOPIC_WORDS = ["dragon", "fire", "cave", "gold", "princess", "king"]
WORDS = ["<s>", "</s>", "the", "a", "cat", "dog", "ran", "sat", "big", "small", ".", *TOPIC_WORDS]
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the tiny models' 97 ids (BOS 0, EOS 1)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="w0")


def with_tokenizer(model):
    model.tokenizer = word_tokenizer()
    return model


def corpus(num_docs=12, topic_every=3, seed=0) -> list[str]:
    """Filler stories; every ``topic_every``-th also mentions the "big dragon" three times ("big"
    appears nowhere else, so it is the dragon's lead-in)."""
    rng = np.random.default_rng(seed)
    filler = [w for w in WORDS[2:11] + WORDS[len(TOPIC_WORDS) + 11:] if w != "big"]
    docs = []
    for d in range(num_docs):
        words = list(rng.choice(filler, size=int(rng.integers(6, 14))))
        if d % topic_every == 0:
            for _ in range(3):
                words.insert(int(rng.integers(0, len(words) + 1)), "big dragon")
        docs.append(" ".join(words))
    return docs


def identity_model(planted: str | None = "dragon", seed=0):
    """A tiny Llama whose blocks add nothing (attention and MLP outputs zeroed), so the residual
    stream is the token embedding, with one codebook at layer 0's block output. Code 5 is the
    ``planted`` word's embedding, and every other embedding points away from it, so code 5 fires
    on that word and nowhere else."""
    base = tiny_base("llama", seed)
    for block in base.model.layers:
        block.self_attn.o_proj.weight.data.zero_()
        block.mlp.down_proj.weight.data.zero_()
    model = attach_codebooks(base, sites=["block_out"], layers=[0], num_codes=24, k=3)
    torch.manual_seed(seed + 1)
    layer = model.codebook_layers()[(0, "block_out")]
    layer.codebook.data.normal_()
    if planted is not None:
        emb = base.model.embed_tokens.weight.data
        u = emb[WORDS.index(planted)].clone()
        u /= u.norm()
        others = torch.arange(VOCAB) != WORDS.index(planted)
        orth = emb[others] - (emb[others] @ u)[:, None] * u
        emb[others] = orth - orth.norm(dim=1, keepdim=True) * u
        layer.codebook.data[0, 5] = u
    return with_tokenizer(model.eval())


# -- the index ---------------------------------------------------------------------------------


def direct_counts(model, docs):
    """Per-site code counts from running each document alone."""
    totals = {key: torch.zeros(layer.groups, layer.num_codes, dtype=torch.long)
              for key, layer in model.codebook_layers().items()}
    for doc in docs:
        ids = torch.tensor([encode_document(model.tokenizer, doc)])
        with torch.no_grad(), model.capture_codes() as captured:
            model(ids)
        for key, calls in captured.items():
            groups = calls[0].shape[2]
            for g in range(groups):
                totals[key][g] += torch.bincount(calls[0][0, :, g].reshape(-1),
                                                 minlength=totals[key].shape[1])
    return totals


def test_index_counts_equal_a_direct_computation_with_padded_batches():
    model = with_tokenizer(tiny_model("llama", sites=["attn_heads", "mlp_out"]))
    docs = corpus(7)
    index = build_index(model, docs, batch_size=3, progress=False)
    expected = direct_counts(model, docs)
    assert index.num_documents == 7
    assert index.num_tokens == sum(len(encode_document(model.tokenizer, d)) for d in docs)
    for key, counts in expected.items():
        np.testing.assert_array_equal(index.counts[key], counts.numpy())
        assert index.codes[key].dtype == np.uint8
    # The per-document view holds the same activations.
    per_doc = sum(np.bincount(flat.reshape(-1), minlength=index.layout.size)
                  for _, flat in index.documents())
    for site in index.layout.sites:
        offset = index.layout.offsets[site.key]
        np.testing.assert_array_equal(per_doc[offset:offset + site.groups * site.num_codes],
                                      index.counts[site.key].reshape(-1))


def test_index_records_each_documents_tokens_and_codes_in_place(tmp_path):
    model = with_tokenizer(tiny_model("gpt2", sites=["attn_heads"]))
    docs = corpus(5, seed=3)
    index = build_index(model, docs, batch_size=2, progress=False, meta={"model": "tiny"})
    path = index.save(tmp_path / "idx.safetensors")
    loaded = CodeIndex.load(path)
    assert loaded.meta["model"] == "tiny" and loaded.layout.to_list() == index.layout.to_list()
    for d, doc in enumerate(docs):
        ids = encode_document(model.tokenizer, doc)
        np.testing.assert_array_equal(loaded.document(d), ids)
        with torch.no_grad(), model.capture_codes() as captured:
            model(torch.tensor([ids]))
        begin, end = loaded.doc_offsets[d], loaded.doc_offsets[d + 1]
        for key, calls in captured.items():
            np.testing.assert_array_equal(loaded.codes[key][begin:end], calls[0][0].numpy())


def test_max_tokens_keeps_the_first_documents_that_fit_and_max_length_cuts():
    model = with_tokenizer(tiny_model("llama", sites=["attn_heads"]))
    docs = corpus(6)
    lengths = [len(encode_document(model.tokenizer, d)) for d in docs]
    index = build_index(model, docs, max_tokens=lengths[0] + lengths[1], progress=False)
    assert index.num_documents == 2
    cut = build_index(model, docs, max_length=5, progress=False)
    assert np.diff(cut.doc_offsets).max() == 5
    assert cut.meta["truncated_documents"] == sum(n > 5 for n in lengths)


def test_index_errors_name_the_problem(tmp_path):
    model = with_tokenizer(tiny_model("llama", sites=["attn_heads"]))
    with pytest.raises(ValueError, match="corpus is empty"):
        build_index(model, [], progress=False)
    with pytest.raises(FileNotFoundError, match="no code index"):
        CodeIndex.load(tmp_path)
    (tmp_path / "other.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors code index"):
        CodeIndex.load(tmp_path / "other.safetensors")
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        build_index(model, ["the cat"], progress=False)


def test_corpus_documents_give_the_codes_the_index_holds():
    model = with_tokenizer(tiny_model("gpt_neox", sites=["attn_heads", "block_out"]))
    docs = corpus(6, seed=1)
    streamed = list(corpus_documents(model, docs, batch_size=4, progress=False))
    indexed = list(build_index(model, docs, batch_size=2, progress=False).documents())
    assert len(streamed) == len(indexed) == 6
    # Streamed documents come in batch order: match them up by their tokens.
    key = lambda doc: doc[0].tobytes()
    for (tokens, flat), (tokens2, flat2) in zip(sorted(streamed, key=key),
                                                  sorted(indexed, key=key), strict=True):
        np.testing.assert_array_equal(tokens, tokens2)
        np.testing.assert_array_equal(flat, flat2)
    layout = Layout.of_model(model)
    # Every token has k codes of every head of every site, each id inside its site's range.
    assert flat.shape == (len(tokens), sum(s.groups * s.k for s in layout.sites))
    assert flat.max() < layout.size


# -- code search on a constructed index ----------------------------------------------------------


def constructed_index() -> tuple[CodeIndex, list[str]]:
    """Two documents over one head (k=2), codes chosen by hand:

    doc 0: <s> the dragon sat . dragon      doc 1: <s> a cat sat
    code 1 fires on both "dragon" tokens and on "cat"; code 2 on the first "dragon" only;
    code 3 everywhere else (slot 0), code 0 fills the second slot elsewhere.
    """
    tok = word_tokenizer()
    doc0 = encode_document(tok, "the dragon sat . dragon")
    doc1 = encode_document(tok, "a cat sat")
    tokens = np.array(doc0 + doc1, dtype=np.uint16)
    codes = np.zeros((len(tokens), 1, 2), dtype=np.uint8)
    codes[:, 0, 0], codes[:, 0, 1] = 3, 0
    dragon = np.nonzero(tokens == WORDS.index("dragon"))[0]
    cat = np.nonzero(tokens == WORDS.index("cat"))[0]
    codes[dragon, 0] = [1, 0]
    codes[dragon[0], 0] = [2, 1]
    codes[cat, 0] = [1, 3]
    layout = Layout([Site(0, "attn_heads", 1, 4, 2)])
    counts = {(0, "attn_heads"): np.bincount(codes.reshape(-1), minlength=4)[None, :]}
    index = CodeIndex(tokens, np.array([0, len(doc0), len(tokens)]),
                      {(0, "attn_heads"): codes}, counts, layout, {})
    return index, token_surfaces(tok)


def test_code_search_precision_and_recall_on_a_constructed_case():
    index, surfaces = constructed_index()
    targets = regex_targets(index, surfaces, r"(drag\w+)")
    assert targets.sum() == 2
    scores = {s.ref.code: s for s in code_search(index, targets)}
    # code 1: 3 activations, 2 on targets; code 2: 1 activation, on a target.
    assert (scores[1].precision, scores[1].recall) == pytest.approx((2 / 3, 1.0))
    assert (scores[2].precision, scores[2].recall) == pytest.approx((1.0, 0.5))
    assert scores[1].score == pytest.approx(0.8)  # F1
    assert 3 not in scores and 0 in scores  # code 3 never fires on a dragon
    assert [s.ref.code for s in code_search(index, targets)][:2] == [1, 2]
    # The token search finds the same targets.
    assert (token_targets(index, [WORDS.index("dragon")]) == targets).all()


def test_capture_group_selects_the_target_token():
    index, surfaces = constructed_index()
    # Only the "dragon" that follows "." is captured.
    targets = regex_targets(index, surfaces, r"\. (dragon)")
    assert np.nonzero(targets)[0].tolist() == [5]
    whole = regex_targets(index, surfaces, r"\. dragon")
    assert np.nonzero(whole)[0].tolist() == [4, 5]
    assert np.nonzero(regex_targets(index, surfaces, r"\. dragon", tokens="last"))[0].tolist() \
        == [5]
    named = regex_targets(index, surfaces, r"(?P<t>cat) sat", group="t")
    assert np.nonzero(named)[0].tolist() == [8]


def test_search_errors_name_the_problem():
    index, surfaces = constructed_index()
    with pytest.raises(ValueError, match="invalid regex"):
        regex_targets(index, surfaces, "drag(on")
    with pytest.raises(ValueError, match="has no group 2"):
        regex_targets(index, surfaces, "(drag)on", group=2)
    with pytest.raises(ValueError, match="selects no token"):
        code_search(index, regex_targets(index, surfaces, "unicorn"))
    with pytest.raises(ValueError, match="code id must be in"):
        code_summary(index, CodeRef(0, "attn_heads", 0, 9), surfaces)
    with pytest.raises(ValueError, match="no codebook at layer 3"):
        code_summary(index, CodeRef(3, "attn_heads", 0, 1), surfaces)


# Nested repeats with overlapping alternatives: the number of ways to split a text of n
# characters grows like Fibonacci(n), and the required "#" or "%" never comes, so every one is
# tried. (The report's "(.+)+#" is as slow with Python's re; the regex package sees that "#" is
# missing and answers at once, so the tests use a pattern that defeats it too.)
HOSTILE = r"(?:.|..)*(?:#|%)"


def test_a_time_limited_regex_stops_with_a_clear_error_and_lets_other_threads_run():
    hostile = compile_regex(HOSTILE, time_limit=0.5)
    ticks = []
    stop = threading.Event()

    def tick():  # a thread that needs the GIL, as a web server's other requests do
        while not stop.wait(0.01):
            ticks.append(time.monotonic())

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.monotonic()
    try:
        with pytest.raises(RegexTimeout, match=r"took longer than 0.5 s to match; simplify it"):
            hostile.finditer("the girl ran to the park and saw a big dragon there " * 2)
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        ticker.join()
    assert elapsed < 4
    assert len([t for t in ticks if t < started + elapsed]) >= 10  # the GIL was released
    # The limit is for all matching done with the pattern: once spent, the next call stops.
    started = time.monotonic()
    with pytest.raises(RegexTimeout):
        hostile.search("a")
    assert time.monotonic() - started < 0.1
    # The report's pattern, on a text long enough to take Python's re for ever, and matches.
    assert compile_regex(r"(.+)+#", time_limit=0.5).finditer("a" * 10_000) == []
    assert [m.span() for m in compile_regex("DRAGON", time_limit=0.5).finditer(
        "a dragon, a Dragon")] == [(2, 8), (12, 18)]


def test_searches_stop_at_the_regexs_time_limit():
    model = identity_model("dragon")
    index = build_index(model, corpus(6), progress=False)
    for run in (lambda regex: regex_targets(index, token_surfaces(model.tokenizer), regex),
                lambda regex: search(model, corpus(6), regex)):
        started = time.monotonic()
        with pytest.raises(RegexTimeout, match="took longer than 0.2 s"):
            run(compile_regex(HOSTILE, time_limit=0.2))
        assert time.monotonic() - started < 3


def test_a_regex_that_repeats_too_much_is_refused_before_it_is_compiled():
    # The regex package unrolls counted repeats when it compiles: these would take gigabytes.
    for pattern in (r"(?:(?:(?:a{100}){100}){100}){100}", r"[\w\W]{4294967294}"):
        with pytest.raises(ValueError, match="repeats too much"):
            compile_regex(pattern)
    assert compile_regex(r"\b\d{4}-\d{2}-\d{2}\b|(?:\w+ ){3}dragon|a{0,100000}").search(
        "on 2023-01-02 a big red dragon")


def test_code_summary_counts_and_marks_contexts():
    index, surfaces = constructed_index()
    summary = code_summary(index, CodeRef(0, "attn_heads", 0, 1), surfaces, window=1)
    assert summary["count"] == 3 and summary["documents"] == 2
    # Rank 0 hits come first, and among them a document's first hit (cat) before a document's
    # second (the last dragon); the rank-1 dragon comes last.
    texts = [c["text"] for c in summary["contexts"]]
    assert texts == [" a[[ cat]] sat", " .[[ dragon]]", " the[[ dragon]] sat"]
    assert [c["rank"] for c in summary["contexts"]] == [0, 0, 1]


def test_topic_stories_first_puts_up_to_n_matching_stories_first_in_corpus_order():
    docs = ["a cat", "a dragon", "the king", "a dog", "dragon and king", "another dragon"]
    ordered, taken = topic_stories_first(docs, {"dragon": "dragon", "royal": r"\bking"}, 2)
    assert ordered == ["a dragon", "dragon and king", "the king", "a cat", "a dog",
                       "another dragon"]
    assert taken == {"dragon": 2, "royal": 1}  # the one king story left was used already
    assert topic_stories_first(docs, {"dragon": "dragon"}, 0) == (docs, {"dragon": 0})
    with pytest.raises(ValueError, match="invalid regex"):
        topic_stories_first(docs, {"bad": "drag(on"}, 1)


# -- topic search --------------------------------------------------------------------------------


def search(model, docs, pattern="dragon", statistic="context"):
    surfaces = token_surfaces(model.tokenizer)
    documents = corpus_documents(model, docs, progress=False)
    return topic_search(documents, Layout.of_model(model), surfaces, {"t": pattern},
                        statistic)["t"]


def test_document_statistic_finds_the_code_planted_on_the_topic_word():
    model = identity_model("dragon")
    result = search(model, corpus(12, topic_every=3), statistic="document")
    assert result.topic_documents == 4 and result.documents == 12
    best = result.codes[0]
    assert best.ref == CodeRef(0, "block_out", 0, 5)
    assert best.recall == 1.0 and best.hits == best.count == 12
    assert select_codes(result.codes, Layout.of_model(model), max_codes=1) == [best.ref]
    # Without the plant no code is that specific.
    plain = search(identity_model(None), corpus(12, topic_every=3), statistic="document")
    assert plain.codes[0].precision < best.precision


def test_lead_in_statistic_finds_the_code_planted_on_the_word_before_the_topic():
    model = identity_model("big")  # code 5 fires on "big", which always precedes "dragon"
    result = search(model, corpus(12, topic_every=3), statistic="lead-in")
    assert result.lead_ins == 12
    best = result.codes[0]
    assert best.ref == CodeRef(0, "block_out", 0, 5)
    # It fires at every lead-in and nowhere else: enrichment 1, precision 1.
    assert (best.recall, best.precision, best.score) == (1.0, 1.0, 1.0)
    # The document statistic sees the "big" code as no better than the "dragon" code would be.
    assert search(model, corpus(12, topic_every=3), statistic="document").codes[0].recall == 1.0


def context_corpus() -> list[str]:
    """Four dragon stories that mention "cave" after the dragon (one also before it), and eight
    other stories, one of which has a cave."""
    topic = ["cave the cat sat . big dragon ran . cave cave .",
             "a dog sat . big dragon cave ran cave .",
             "the cat ran . big dragon sat cave . cave",
             "big dragon . the dog ran cave cave ."]
    other = ["the cat sat . a dog ran .", "a small dog sat . the cat ran .",
             "the dog ran . a cat sat . cave", "a cat ran . the small dog sat ."] * 2
    other[5] = "the small cat ran . a dog sat ."
    return topic + other


def test_context_statistic_finds_the_code_planted_after_the_first_mention():
    model = identity_model("cave")  # code 5 fires on "cave" and nowhere else
    docs = context_corpus()
    result = search(model, docs, statistic="context")
    # By hand: a document is its BOS plus one token per word; context starts after the token
    # holding the first "dragon".
    tokens = sum(1 + len(d.split()) for d in docs)
    context, hits, count = 0, 0, 0
    for d in docs:
        words = d.split()
        count += words.count("cave")
        if "dragon" in words:
            first = words.index("dragon")
            context += len(words) - first - 1
            hits += words[first + 1:].count("cave")
    assert (result.context_tokens, result.topic_documents) == (context, 4)
    assert (hits, count) == (8, 11)  # the corpus is as described
    # k = 3: two other codes happen to fire on "cave" alone too, and tie with the planted one.
    best = next(c for c in result.codes if c.ref == CodeRef(0, "block_out", 0, 5))
    assert best.score == result.codes[0].score and result.codes[3].score < best.score
    assert (best.hits, best.count) == (hits, count)
    chance = context / tokens
    assert result.chance == pytest.approx(chance)
    assert best.precision == pytest.approx((hits + 10 * chance) / (count + 10))
    assert best.recall == pytest.approx(hits / context)
    # "cave" never comes just before "dragon": the lead-in statistic does not see this code.
    lead_in = search(model, docs, statistic="lead-in")
    assert CodeRef(0, "block_out", 0, 5) not in [c.ref for c in lead_in.codes[:3]]


def test_topic_search_errors_name_the_problem():
    model = identity_model("dragon")
    docs = corpus(6)
    with pytest.raises(ValueError, match="no document of the 6 matches"):
        search(model, docs, "unicorn")
    with pytest.raises(ValueError, match="every one of the 6 documents"):
        search(model, docs, ".", statistic="document")
    with pytest.raises(ValueError, match="invalid regex"):
        search(model, docs, "[dragon")
    with pytest.raises(ValueError, match="corpus is empty"):
        search(model, [])
    with pytest.raises(ValueError, match="ends at its first match"):
        search(model, ["the cat dragon", "a dog sat"], statistic="context")


def test_select_codes_respects_per_head_and_total_limits():
    layout = Layout([Site(0, "attn_heads", 2, 8, 2)])
    scores = [CodeScore(CodeRef(0, "attn_heads", h, c), 1.0, 1.0, 1, 1, 1.0)
              for h, c in [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5)]]
    assert select_codes(scores, layout, 10, per_head=1) == [scores[0].ref, scores[3].ref]
    # per_head is capped at the site's k = 2.
    assert len(select_codes(scores, layout, 10, per_head=5)) == 4
    assert len(select_codes(scores, layout, 3, per_head=2)) == 3


# -- promoted tokens -----------------------------------------------------------------------------


def test_promoted_tokens_follow_the_code_through_the_unembedding():
    model = identity_model("dragon")
    # Code 5 of block_out is the (unit) dragon embedding; Llama's tiny config ties nothing, so
    # point the unembedding's "cat" row along it: "cat" must then be the top promoted token.
    layer = model.codebook_layers()[(0, "block_out")]
    model.base.lm_head.weight.data[WORDS.index("cat")] = 100 * layer.codebook.data[0, 5]
    top = promoted_tokens(model, CodeRef(0, "block_out", 0, 5), top=3,
                          surfaces=token_surfaces(model.tokenizer))
    assert top[0]["id"] == WORDS.index("cat") and top[0]["token"] == " cat"
    assert top[0]["logit"] > top[1]["logit"]


def test_attention_head_codes_go_through_their_heads_slice_of_the_projection():
    for family in ("llama", "gpt2"):
        model = tiny_model(family, sites=["attn_heads"])
        layer = model.codebook_layers()[(1, "attn_heads")]
        ref = CodeRef(1, "attn_heads", 2, 7)
        heads_input = torch.zeros(layer.groups, layer.dim)
        heads_input[2] = layer.codebook.data[2, 7]
        block = model.base.model.layers[1] if family == "llama" else model.base.transformer.h[1]
        proj = block.self_attn.o_proj if family == "llama" else block.attn.c_proj
        # The projection's own hook would snap its input to codes: call it with codebooks off.
        with torch.no_grad(), model.codebooks_disabled():
            expected = proj(heads_input.reshape(1, -1))[0]
            expected = expected - proj(torch.zeros(1, layer.groups * layer.dim))[0]  # no bias
        torch.testing.assert_close(residual_vector(model, ref), expected)
