"""The ``codebook::topk_codebook`` op against its plain reference (``reference_topk_codebook``,
all scores at once), whose similarity scores are checked against their textbook definitions."""

from __future__ import annotations

import itertools
import math
import threading
import zlib

import pytest
import torch
import torch.fx.traceback as fx_traceback
from torch.library import opcheck

from codebook import ops
from codebook.ops import reference_topk_codebook, top_codes, topk_codebook

# The built-in similarities by their textbook definitions, elementwise over [..., g, C, d].
TEXTBOOK_SCORES = {
    "cosine": lambda x, c: torch.nn.functional.cosine_similarity(x, c, dim=-1, eps=1e-8),
    "inner_product": lambda x, c: (x * c).sum(-1),
    "euclidean": lambda x, c: -((x - c) ** 2).sum(-1),
}

CASES = list(itertools.product(["cosine", "inner_product", "euclidean"], ["mean", "sum"]))


def seed_for(*parts) -> int:
    """A seed for one parametrized case, the same in every run (``hash`` of strings is salted
    per process, so a seed from it changed every run)."""
    return zlib.crc32(repr(parts).encode()) % 1000


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """Every test starts from a seed of its own name, whatever ran before it."""
    torch.manual_seed(seed_for(request.node.name))


def test_seeds_are_the_same_in_every_run():
    assert [seed_for("cosine", "mean", 0), seed_for("euclidean", "sum", 7)] == [972, 547]


@pytest.mark.parametrize("similarity", ops.SIMILARITIES)
def test_the_reference_scores_are_the_textbook_similarities(similarity):
    """The independent check under the reference op: its scores, for a few lead shapes."""
    codebook = torch.randn(3, 7, 5)
    for lead in [(), (4,), (2, 6)]:
        x = torch.randn(*lead, 3, 5)
        got = ops.SIMILARITIES[similarity].scores(x, codebook)
        want = TEXTBOOK_SCORES[similarity](x.unsqueeze(-2), codebook)
        assert got.shape == (*lead, 3, 7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("similarity,combine", CASES)
@pytest.mark.parametrize("chunk_size", [0, 1, 7])
def test_matches_the_reference(similarity, combine, chunk_size):
    torch.manual_seed(seed_for(similarity, combine, chunk_size))
    x = torch.randn(3, 11, 4, 8)
    codebook = torch.randn(4, 50, 8)
    bias = torch.randn(4, 50) * 0.1
    scale = torch.rand(4, 50) + 0.5
    for b, s in [(None, None), (bias, scale)]:
        out, idx = topk_codebook(x, codebook, 5, b, s, similarity, combine, 1.0, chunk_size)
        ref_out, ref_idx = reference_topk_codebook(x, codebook, 5, b, s, similarity, combine)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_random_shapes_match_reference():
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        ndim = int(torch.randint(0, 3, (1,), generator=gen))
        lead = [int(n) for n in torch.randint(1, 6, (ndim,), generator=gen)]
        g, c, d = (int(v) for v in torch.randint(1, 9, (3,), generator=gen))
        c += 4
        k = int(torch.randint(1, c + 1, (1,), generator=gen))
        x = torch.randn(*lead, g, d, generator=gen)
        codebook = torch.randn(g, c, d, generator=gen)
        out, idx = topk_codebook(x, codebook, k, chunk_size=2)
        ref_out, ref_idx = reference_topk_codebook(x, codebook, k)
        assert out.shape == x.shape and idx.shape == (*lead, g, k)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(out, ref_out)


def test_mean_and_sum_differ_by_k():
    x, codebook = torch.randn(6, 2, 4), torch.randn(2, 10, 4)
    mean, _ = topk_codebook(x, codebook, 3, combine="mean")
    total, _ = topk_codebook(x, codebook, 3, combine="sum")
    torch.testing.assert_close(total, 3 * mean)


def test_output_is_exactly_the_selected_codes():
    x, codebook = torch.randn(5, 3, 6), torch.randn(3, 20, 6)
    out, idx = topk_codebook(x, codebook, 2, combine="sum")
    for t in range(5):
        for g in range(3):
            expected = codebook[g, idx[t, g, 0]] + codebook[g, idx[t, g, 1]]
            torch.testing.assert_close(out[t, g], expected)



@pytest.mark.parametrize("similarity", ops.SIMILARITIES)
def test_prepared_codebooks_are_reused_until_the_codebook_changes(similarity):
    """Inside ops.prepared_codebooks the op prepares a codebook once: the same results bit for bit
    while it is unchanged, and the new codebook's after an in-place write or a new tensor."""
    x, bias = torch.randn(7, 3, 8), torch.randn(3, 40)
    codebook = torch.nn.Parameter(torch.randn(3, 40, 8))

    def both(cb):
        return [topk_codebook(x, cb, 4, b, None, similarity, "sum") for b in (None, bias)]

    def same(got, want):
        return all(torch.equal(a, b) for pair_a, pair_b in zip(got, want, strict=True)
                   for a, b in zip(pair_a, pair_b, strict=True))

    with torch.no_grad():
        plain = both(codebook)
        with ops.prepared_codebooks() as kept:
            assert same(both(codebook), plain)
            assert same(both(codebook), plain)  # reused
            assert len(kept) == 1
            codebook.mul_(-1.5)  # in place: a new version
            flipped = both(codebook)
            assert same(flipped, both(codebook.detach().clone()))
            assert not same(flipped, plain)
            codebook.data = torch.randn(3, 40, 8)  # another tensor: a new data pointer
            assert same(both(codebook), both(codebook.detach().clone()))
        assert ops._PREPARED.get() is None  # outside the block: prepared on every call


@pytest.mark.parametrize("similarity,combine", CASES)
@pytest.mark.slow  # torch's own checks of the op: several seconds per case
def test_opcheck(similarity, combine):
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    codebook = torch.randn(3, 12, 4, requires_grad=True)
    kwargs = dict(bias=torch.randn(3, 12), scale=torch.rand(3, 12), similarity=similarity,
                  combine=combine, reconstruction_weight=0.5, chunk_size=3)
    result = opcheck(torch.ops.codebook.topk_codebook.default, (x, codebook, 3), kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("weight", [0.0, 1.0, 3.0])
def test_gradients(combine, weight):
    """Straight-through to the input; to the selected codes the output gradient plus the gradient
    of ``weight * mean((out - stopgrad(x))**2)``."""
    torch.manual_seed(1)
    x = torch.randn(4, 7, 3, 5, requires_grad=True)
    codebook = torch.randn(3, 200, 5, requires_grad=True)
    scale = torch.rand(3, 200) + 0.5
    upstream = torch.randn(4, 7, 3, 5)
    out, _ = topk_codebook(x, codebook, 4, None, scale, "cosine", combine, weight, 5)
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream)

    ref_cb = codebook.detach().clone().requires_grad_(True)
    ref_out, _ = reference_topk_codebook(x.detach(), ref_cb, 4, None, scale, "cosine", combine)
    loss = (ref_out * upstream).sum() + weight * ((ref_out - x.detach()) ** 2).mean()
    loss.backward()
    torch.testing.assert_close(codebook.grad, ref_cb.grad)
    unselected = ref_cb.grad.abs().sum(-1) == 0
    assert unselected.any(), "some codes are never chosen and must get no gradient"


def test_bias_forces_and_blocks_codes():
    torch.manual_seed(2)
    x, codebook = torch.randn(20, 2, 4), torch.randn(2, 30, 4)
    bias = torch.zeros(2, 30)
    bias[0, 17] = math.inf
    _, natural = topk_codebook(x, codebook, 3)
    blocked_code = int(natural[0, 1, 0])
    bias[1, blocked_code] = -math.inf
    out, idx = topk_codebook(x, codebook, 3, bias)
    assert (idx[:, 0, :] == 17).any(-1).all(), "a forced code is chosen at every token"
    assert not (idx[:, 1, :] == blocked_code).any(), "a blocked code is never chosen"


def test_blocking_all_but_one_code_replaces_all_k():
    x, codebook = torch.randn(6, 1, 4), torch.randn(1, 10, 4)
    bias = torch.full((1, 10), -math.inf)
    bias[0, 4] = math.inf
    out, idx = topk_codebook(x, codebook, 3, bias, combine="mean")
    assert (idx[..., 0] == 4).all()
    torch.testing.assert_close(out, codebook[0, 4].expand(6, 1, 4))
    strong, _ = topk_codebook(x, codebook, 3, bias, torch.full((1, 10), 2.0), combine="sum")
    torch.testing.assert_close(strong, 2 * codebook[0, 4].expand(6, 1, 4))


def test_bf16_inputs_keep_their_dtype():
    torch.manual_seed(4)
    x, codebook = torch.randn(8, 2, 16), torch.randn(2, 40, 16, requires_grad=True)
    out, _ = topk_codebook(x.bfloat16(), codebook, 4)
    assert out.dtype == torch.bfloat16
    ref, _ = topk_codebook(x, codebook, 4)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert codebook.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "x_shape,cb_shape,k,match",
    [
        ((4, 2, 8), (2, 10, 8), 11, "k must be between 1 and the number of codes"),
        ((4, 2, 8), (2, 10, 8), 0, "k must be between 1 and the number of codes"),
        ((4, 2, 6), (2, 10, 8), 2, r"activations must have shape \[\.\.\., 2, 8\]"),
        ((4, 3, 8), (2, 10, 8), 2, r"activations must have shape \[\.\.\., 2, 8\]"),
        ((4, 2, 8), (10, 8), 2, "codebook must have shape"),
    ],
)
def test_clear_errors(x_shape, cb_shape, k, match):
    with pytest.raises(ValueError, match=match):
        topk_codebook(torch.randn(*x_shape), torch.randn(*cb_shape), k)


def test_clear_errors_for_options():
    x, codebook = torch.randn(4, 2, 8), torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match="similarity must be one of"):
        topk_codebook(x, codebook, 2, similarity="dot")
    with pytest.raises(ValueError, match="combine must be one of"):
        topk_codebook(x, codebook, 2, combine="max")
    with pytest.raises(ValueError, match=r"bias must have shape \[2, 10\]"):
        topk_codebook(x, codebook, 2, torch.zeros(10))


@pytest.mark.parametrize("similarity,combine", CASES)
def test_many_codes_match_the_reference(similarity, combine):
    """Enough codes that the top-k goes through block maxima (see ``top_codes``)."""
    groups, num_codes, k = 2, 2048, 8
    assert ops._topk_block(num_codes, k, torch.device("cpu")), "the block path must be covered"
    torch.manual_seed(5)
    x, codebook = torch.randn(3, 40, groups, 16), torch.randn(groups, num_codes, 16)
    bias = torch.randn(groups, num_codes) * 0.1
    bias[0, 1500] = math.inf
    bias[1, :1000] = -math.inf
    scale = torch.rand(groups, num_codes) + 0.5
    for b, s in [(None, None), (bias, scale)]:
        out, idx = topk_codebook(x, codebook, k, b, s, similarity, combine, 1.0, 0)
        ref_out, ref_idx = reference_topk_codebook(x, codebook, k, b, s, similarity, combine)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_many_codes_blocking_all_but_one_code_replaces_all_k():
    num_codes = 4096
    x, codebook = torch.randn(6, 1, 4), torch.randn(1, num_codes, 4)
    bias = torch.full((1, num_codes), -math.inf)
    bias[0, 3001] = 0.0
    out, idx = topk_codebook(x, codebook, 8, bias, combine="mean")
    assert (idx[..., 0] == 3001).all()
    assert all(len(set(row.tolist())) == 8 for row in idx.reshape(-1, 8)), "distinct codes"
    torch.testing.assert_close(out, codebook[0, 3001].expand(6, 1, 4))


@pytest.mark.parametrize("block", [0, 4, 8, 12, 15])
def test_top_codes_is_exact_with_ties_and_any_sign(block):
    """Scores with many ties of both signs, signed zeros, rows with fewer than k non-negative
    scores, +-inf and NaN: ``top_codes`` (with or without blocks) picks the values torch.topk
    picks over the whole row, at distinct positions holding them."""
    gen = torch.Generator().manual_seed(block)
    scores = torch.randint(-3, 3, (2, 300, 120), generator=gen).float()
    scores[0, :50] = -math.inf  # every code blocked but one
    scores[0, :50, 7] = 1.0
    scores[0, 60:70, 5] = math.inf  # a forced code
    scores[1, :50, 100:] = -math.inf
    scores[1, 50:60, 3] = math.nan  # ranks first, as in torch.topk
    scores[1, 60:70] = 2.0  # all equal
    scores[1, 70:80] = -scores[1, 70:80].abs() - 1  # all negative
    scores[1, 80:90, :60] = -0.0
    want, _ = scores.topk(8, dim=-1)
    values, indices = top_codes(scores, 8, block)
    torch.testing.assert_close(values, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(scores.gather(-1, indices), values, rtol=0, atol=0,
                               equal_nan=True)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "each position chosen once"


class _RecordingDict(dict):
    """A dict that records every write to it."""

    def __init__(self, writes: list):
        super().__init__()
        self.writes = writes

    def __setitem__(self, key, value):
        self.writes.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.writes.append(key)
        super().__delitem__(key)


def test_concurrent_calls_during_an_export_leave_torch_state_alone(monkeypatch):
    """While a torch.export runs anywhere in the process, ``torch.compiler.is_exporting()`` is
    true in every thread. An op built with ``torch.library.custom_op`` then writes, on every eager
    call, to the process-wide ``torch.fx.traceback.current_meta`` without a lock: two threads
    calling it crashed (KeyError in ``annotate``) or left metadata behind for the exporter."""
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    writes = []
    monkeypatch.setattr(fx_traceback, "current_meta", _RecordingDict(writes))
    errors = []

    def work(seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 2, 8, generator=gen, requires_grad=True)
        codebook = torch.randn(2, 16, 8, generator=gen, requires_grad=True)
        try:
            for _ in range(300):
                topk_codebook(x, codebook, 3)[0].sum().backward()
        except Exception as err:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert writes == [], "eager calls must not write torch's process-wide FX metadata"
    assert dict(fx_traceback.current_meta) == {}


@pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning")
def test_a_serialized_graph_keeps_the_combine_it_was_traced_with(tmp_path):
    # Serialized graphs leave out arguments equal to the op schema's defaults, so those defaults
    # are frozen: a graph traced with combine="mean" must still compute the mean when loaded.
    gen = torch.Generator().manual_seed(6)
    x, codebook = torch.randn(5, 2, 4, generator=gen), torch.randn(2, 9, 4, generator=gen)
    for combine in ops.COMBINES:
        traced = torch.jit.trace(lambda x, cb, c=combine: topk_codebook(x, cb, 3, combine=c)[0],
                                 (x, codebook))
        traced.save(str(tmp_path / "graph.pt"))
        loaded = torch.jit.load(str(tmp_path / "graph.pt"))
        expected, _ = topk_codebook(x, codebook, 3, combine=combine)
        torch.testing.assert_close(loaded(x, codebook), expected, rtol=0, atol=0)
