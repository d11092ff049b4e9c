"""Forcing and blocking codes during generation."""

from __future__ import annotations

import math

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
