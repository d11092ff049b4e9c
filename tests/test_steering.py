"""Forcing and blocking codes during generation."""

from __future__ import annotations

import copy
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from codebook import CodeRef, Steering, parse_codes
from tests.test_model import tiny_model
from tests.tiny_models import FAMILIES, VOCAB

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 2]])
SITE = (1, "attn_heads")


def generate_captured(model, steering=None, use_cache=True, new_tokens=10, ids=PROMPT):
    with torch.no_grad(), model.capture_codes() as captured:
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=use_cache, steering=steering)
    # One [batch, seq, groups, k] tensor per forward call: concatenate along the sequence when
    # cached; without cache, the last call saw every position.
    calls = captured[SITE]
    codes = torch.cat(calls, dim=1) if use_cache else calls[-1]
    return out, codes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["add", "replace"])
def test_forced_code_is_active_at_every_position_and_changes_the_text(family, mode):
    model = tiny_model(family, sites=["attn_heads"], num_codes=32, k=3)
    plain, plain_codes = generate_captured(model)
    steering = Steering(codes=[CodeRef(1, "attn_heads", h, 7) for h in range(4)], mode=mode,
                        strength=4.0)
    steered, codes = generate_captured(model, steering)
    assert (codes[..., 0] == 7).all() if mode == "replace" else (codes == 7).any(-1).all()
    assert not torch.equal(plain, steered), "steering must change the generated text"
    assert not (plain_codes == 7).any(-1).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_generation_same_with_and_without_cache(family, positions):
    model = tiny_model(family, sites=["attn_heads", "mlp_out"], num_codes=32, k=3)
    steering = Steering(codes=["1:attn_heads:0:7", "0:mlp_out:0:3"], positions=positions,
                        strength=3.0)
    cached, cached_codes = generate_captured(model, steering, use_cache=True)
    uncached, uncached_codes = generate_captured(model, steering, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached_codes, uncached_codes)
    n_prompt = PROMPT.shape[1]
    forced = (cached_codes[0, :, 0, :] == 7).any(-1)
    if positions in ("all", "prompt"):
        assert forced[:n_prompt].all()
    if positions in ("all", "generated"):
        assert forced[n_prompt:].all()


def test_prompt_only_steering_leaves_generated_positions_unforced():
    model = tiny_model("llama", sites=["attn_heads"], num_codes=32, k=3)
    _, codes = generate_captured(model, Steering(codes=["1:attn_heads:2:9"], positions="prompt"))
    n_prompt = PROMPT.shape[1]
    assert (codes[0, :n_prompt, 2] == 9).any(-1).all()
    assert not (codes[0, n_prompt:, 2] == 9).any(-1).all()


def test_blocking_removes_a_code():
    model = tiny_model("gpt2", sites=["attn_heads"], num_codes=32, k=3)
    _, codes = generate_captured(model)
    head = 1
    favourite = int(torch.mode(codes[0, :, head].reshape(-1)).values)
    assert (codes[0, :, head] == favourite).any()
    _, blocked_codes = generate_captured(
        model, Steering(block=[CodeRef(1, "attn_heads", head, favourite)])
    )
    assert not (blocked_codes[0, :, head] == favourite).any()


def test_steering_context_manager_and_restore():
    model = tiny_model("llama", sites=["mlp_out"], num_codes=16, k=2)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        with model.steer(Steering(codes=["0:mlp_out:0:5"], mode="replace")):
            steered = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, steered)


def test_steering_batches_generate_the_same_as_single_rows():
    model = tiny_model("gpt_neox", sites=["attn_heads"], num_codes=32, k=3)
    steering = Steering(codes=["1:attn_heads:3:11"], positions="generated")
    batch = torch.randint(2, VOCAB, (3, 6))
    with torch.no_grad():
        together = model.generate(batch, max_new_tokens=6, do_sample=False, steering=steering)
        for row in range(3):
            alone = model.generate(batch[row : row + 1], max_new_tokens=6, do_sample=False,
                                   steering=steering)
            assert torch.equal(together[row], alone[0])


def test_steering_json_round_trip():
    steering = Steering(codes=["L1.attn_heads.H2.C117", "0:mlp_out:0:9"], strength=2.5,
                        mode="replace", positions="generated", block=[{"layer": 3,
                        "site": "attn_heads", "head": 0, "code": 4}])
    again = Steering.from_json(steering.to_json())
    assert again == steering
    assert again.codes[0] == CodeRef(1, "attn_heads", 2, 117)
    assert str(again.codes[0]) == "1:attn_heads:2:117"
    assert parse_codes("1:attn_heads:2:117, 0:mlp_out:0:9") == steering.codes


@pytest.mark.parametrize(
    "steering,match",
    [
        (dict(codes=["1:attn_heads:0:99"]), r"code id must be in \[0, 32\), got 99"),
        (dict(codes=["1:attn_heads:4:1"]), r"head must be in \[0, 4\), got 4"),
        (dict(codes=["7:attn_heads:0:1"]), r"no codebook at layer 7 site 'attn_heads'"),
        (dict(codes=["0:mlp_out:0:1"]), r"no codebook at layer 0 site 'mlp_out'"),
        (dict(codes=[f"1:attn_heads:0:{c}" for c in range(4)]), "only k=3 can be active"),
    ],
)
def test_bad_codes_are_clear_errors(steering, match):
    model = tiny_model("llama", sites=["attn_heads"], num_codes=32, k=3)
    with pytest.raises(ValueError, match=match), model.steer(Steering(**steering)):
        pass


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(codes=["1-attn-0-3"]), "cannot parse code '1-attn-0-3'"),
        (dict(codes=["1:attn_heads:0:3"], strength=math.nan), "strength must be finite"),
        (dict(codes=["1:attn_heads:0:3"], strength=math.inf), "strength must be finite"),
        (dict(codes=["1:attn_heads:0:3"], strength="big"), "strength must be a number"),
        (dict(mode="swap"), "steering mode must be one of"),
        (dict(positions="middle"), "steering positions must be one of"),
        (dict(codes=["1:attn_heads:0:3"], block=["1:attn_heads:0:3"]), "both forced and blocked"),
    ],
)
def test_bad_steering_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Steering(**kwargs)


def test_bad_steering_json_is_a_clear_error():
    with pytest.raises(ValueError, match="steering JSON is not valid"):
        Steering.from_json("{codes: [")
    with pytest.raises(ValueError, match=r"unknown steering keys \['colour'\]"):
        Steering.from_json('{"colour": "red"}')


# -- steering and capture per call: threads, batch rows ------------------------------------------

STEER_A = Steering(codes=["0:attn_heads:0:7", "0:attn_heads:2:9"], strength=3.0,
                   positions="prompt")
STEER_B = Steering(codes=["0:mlp_out:0:3"], mode="replace", positions="generated")


def steered_generation(model, ids, steering, new_tokens=6):
    """Greedy tokens and the codes chosen at the steered attention site, all calls joined."""
    with torch.no_grad(), model.capture_codes() as captured:
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, steering=steering)
    return out, torch.cat(captured[SITE], dim=1), len(captured[SITE])


def test_threads_steer_one_model_differently_at_the_same_time():
    model = tiny_model("llama", sites=["attn_heads", "mlp_out"], num_codes=32, k=3)
    steerings = [STEER_A, None, STEER_B]
    alone = [steered_generation(model, PROMPT, s) for s in steerings]
    assert not torch.equal(alone[0][0], alone[1][0])
    assert not torch.equal(alone[2][0], alone[1][0])
    # Every forward call of every thread waits for the others in the middle of the model, so the
    # three steering blocks are open at once during every call.
    barrier = threading.Barrier(len(steerings), timeout=60)

    def meet(module, args):
        barrier.wait()

    handle = model.codebook_layers()[SITE].register_forward_pre_hook(meet)
    try:
        with ThreadPoolExecutor(len(steerings)) as pool:
            together = list(pool.map(lambda s: steered_generation(model, PROMPT, s), steerings))
    finally:
        handle.remove()
    for (tokens, codes, calls), (want_tokens, want_codes, want_calls) in zip(
            together, alone, strict=True):
        assert calls == want_calls == 6  # each capture saw its own thread's calls only
        assert torch.equal(tokens, want_tokens)
        assert torch.equal(codes, want_codes)


def test_each_batch_row_is_steered_by_its_own_steering():
    model = tiny_model("llama", sites=["attn_heads", "mlp_out"], num_codes=32, k=3)
    batch = torch.randint(2, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
    # Rows 0 and 3 share a steering, so the rows are snapped out of order and put back.
    rows = [STEER_A, None, STEER_B, STEER_A]
    together, codes, _ = steered_generation(model, batch, rows)
    plain, _, _ = steered_generation(model, batch, None)
    for row, steering in enumerate(rows):
        alone, alone_codes, _ = steered_generation(model, batch[row:row + 1], steering)
        assert torch.equal(together[row], alone[0])
        assert torch.equal(codes[row], alone_codes[0])
        assert torch.equal(alone[0], plain[row]) == (steering is None)


def test_rows_with_equal_steerings_are_snapped_together():
    model = tiny_model("llama", sites=["attn_heads"], num_codes=32, k=3)
    ids = torch.randint(2, VOCAB, (2, 5))
    calls = []
    original = model.codebook_layers()[SITE].snap
    model.codebook_layers()[SITE].snap = lambda h, *a: calls.append(h.shape[0]) or original(h, *a)
    steering = Steering(codes=["1:attn_heads:0:7"])
    twin = Steering.from_json(steering.to_json())  # equal, not the same object
    with torch.no_grad(), model.steer([steering, twin]):
        model(ids)
    assert calls == [2]


def test_a_per_row_steering_must_have_one_entry_per_row():
    model = tiny_model("llama", sites=["attn_heads"], num_codes=32, k=3)
    with torch.no_grad(), model.steer([STEER_A, None]), pytest.raises(
            ValueError, match="2 per-row steerings for a batch of 3 rows"):
        model(torch.randint(2, VOCAB, (3, 5)))


def test_capture_inside_a_steering_block_records_the_steered_codes_and_keeps_it():
    model = tiny_model("llama", sites=["attn_heads"], num_codes=32, k=3)
    forced = Steering(codes=["1:attn_heads:1:4"], mode="replace")
    with torch.no_grad(), model.steer(forced):
        with model.capture_codes() as captured:
            model(PROMPT)
        with model.capture_codes() as after:
            model(PROMPT)
    assert (captured[SITE][0][0, :, 1, 0] == 4).all()
    assert torch.equal(after[SITE][0], captured[SITE][0])  # the steering outlived the capture


def test_steering_a_model_leaves_its_copy_unsteered():
    model = tiny_model("llama", sites=["mlp_out"], num_codes=16, k=2)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        plain = twin(ids).logits
        with model.steer(Steering(codes=["0:mlp_out:0:5"], mode="replace")):
            assert torch.equal(twin(ids).logits, plain)
            assert not torch.allclose(model(ids).logits, plain)
