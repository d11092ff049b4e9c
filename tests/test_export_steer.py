"""One steering spec (codebook.steering_spec) for eager models and the torch-free runtime: the
numpy arrays hold the values the modes promise, the torch tensors are those arrays, and importing
the spec (as cbexport.steer does) does not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbexport.steer import topic_spec
from codebook import CodebookLayer
from codebook.steering import layer_steerings, site_shapes
from codebook.steering_spec import Steering, parse_codes, steering_arrays

LAYERS = {
    (0, "attn_heads"): CodebookLayer(groups=4, dim=8, num_codes=16, k=3),
    (1, "mlp_out"): CodebookLayer(groups=1, dim=32, num_codes=16, k=3),
}
SITES = site_shapes(LAYERS)


def test_site_shapes_are_what_a_bundle_manifest_lists():
    assert SITES == [{"layer": 0, "site": "attn_heads", "groups": 4, "num_codes": 16, "k": 3},
                     {"layer": 1, "site": "mlp_out", "groups": 1, "num_codes": 16, "k": 3}]


def test_add_forces_the_codes_and_scales_them_by_the_strength():
    arrays = steering_arrays(SITES, Steering(codes="0:attn_heads:1:5, 1:mlp_out:0:2",
                                             strength=3.0, block="0:attn_heads:3:0"))
    bias, scale = arrays[(0, "attn_heads")]
    want_bias = np.zeros((4, 16), np.float32)
    want_bias[1, 5], want_bias[3, 0] = np.inf, -np.inf
    want_scale = np.ones((4, 16), np.float32)
    want_scale[1, 5] = 3.0
    np.testing.assert_array_equal(bias, want_bias)
    np.testing.assert_array_equal(scale, want_scale)
    bias, scale = arrays[(1, "mlp_out")]
    assert np.isposinf(bias[0, 2]) and np.count_nonzero(bias) == 1
    assert scale[0, 2] == 3.0 and np.count_nonzero(scale != 1) == 1


def test_a_code_may_have_a_strength_of_its_own():
    steering = Steering(codes="0:attn_heads:1:5, 0:attn_heads:2:7, 1:mlp_out:0:2", strength=3.0,
                        code_strengths={"0:attn_heads:2:7": 0.5, "L1.mlp_out.H0.C2": -1.0})
    arrays = steering_arrays(SITES, steering)
    scale = arrays[(0, "attn_heads")][1]
    assert (scale[1, 5], scale[2, 7]) == (3.0, 0.5)  # the set's strength, and its own
    assert np.count_nonzero(scale != 1) == 2
    assert arrays[(1, "mlp_out")][1][0, 2] == -1.0
    # JSON keeps them; a set without any writes no key (older files read the same).
    assert Steering.from_json(steering.to_json()) == steering
    assert steering.to_dict()["code_strengths"] == {"0:attn_heads:2:7": 0.5,
                                                    "1:mlp_out:0:2": -1.0}
    assert "code_strengths" not in Steering(codes="0:attn_heads:1:5").to_dict()
    with pytest.raises(ValueError, match="names 0:attn_heads:3:1, which is not a forced code"):
        Steering(codes="0:attn_heads:1:5", code_strengths={"0:attn_heads:3:1": 2.0})
    with pytest.raises(ValueError, match="the strength of 0:attn_heads:1:5 must be finite"):
        Steering(codes="0:attn_heads:1:5", code_strengths={"0:attn_heads:1:5": float("nan")})
    with pytest.raises(ValueError, match="code_strengths must map codes to strengths"):
        Steering(codes="0:attn_heads:1:5", code_strengths=[2.0])


def test_replace_blocks_every_other_code_of_the_steered_head_only():
    arrays = steering_arrays(SITES, Steering(codes=["0:attn_heads:1:5", "0:attn_heads:1:6"],
                                             mode="replace"))
    assert list(arrays) == [(0, "attn_heads")]
    bias, scale = arrays[(0, "attn_heads")]
    assert np.isposinf(bias[1, [5, 6]]).all()
    assert np.isneginf(np.delete(bias[1], [5, 6])).all()
    assert not bias[[0, 2, 3]].any()
    assert (scale == 1).all()


@pytest.mark.parametrize("options", [
    {"codes": "0:attn_heads:1:5"},
    {"codes": "L0.attn_heads.H1.C5, 1:mlp_out:0:2", "strength": 3.0},
    {"codes": '[{"layer": 1, "site": "mlp_out", "head": 0, "code": 9}]',
     "block": ["0:attn_heads:3:0", "1:mlp_out:0:1"], "strength": 0.5, "mode": "replace"},
    {"codes": "0:attn_heads:1:5, 1:mlp_out:0:2", "code_strengths": {"1:mlp_out:0:2": -2.0}},
])
def test_the_torch_tensors_are_the_numpy_arrays(options):
    steering = Steering(**options)
    arrays = steering_arrays(SITES, steering)
    tensors = layer_steerings(steering, LAYERS)
    assert set(tensors) == set(arrays)
    for key, (bias, scale) in arrays.items():
        np.testing.assert_array_equal(tensors[key].bias.numpy(), bias)
        # No scale tensor stands for all ones (the op's unscaled path).
        if tensors[key].scale is None:
            assert (scale == 1).all()
        else:
            np.testing.assert_array_equal(tensors[key].scale.numpy(), scale)
        assert tensors[key].positions == steering.positions


@pytest.mark.parametrize(("options", "message"), [
    ({"codes": "5:attn_heads:0:1"}, "no codebook at layer 5"),
    ({"codes": "0:attn_heads:4:1"}, "head must be in \\[0, 4\\)"),
    ({"codes": "0:attn_heads:0:16"}, "code id must be in \\[0, 16\\)"),
    ({"codes": [f"0:attn_heads:0:{i}" for i in range(4)]}, "only k=3"),
])
def test_codes_that_do_not_fit_the_codebooks_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        steering_arrays(SITES, Steering(**options))


def test_spec_validation():
    assert [str(c) for c in parse_codes("L0.attn_heads.H1.C5,1/mlp_out/0/2")] == [
        "0:attn_heads:1:5", "1:mlp_out:0:2"]
    with pytest.raises(ValueError, match="LAYER:SITE:HEAD:CODE"):
        parse_codes("attn_heads:1")
    with pytest.raises(ValueError, match="codes JSON is not valid"):
        parse_codes("[{layer: 1")
    with pytest.raises(ValueError, match="mode"):
        Steering(codes="0:attn_heads:1:5", mode="multiply")
    with pytest.raises(ValueError, match="both forced and blocked"):
        Steering(codes="0:attn_heads:1:5", block="0:attn_heads:1:5")


def test_topic_presets_take_overrides_and_ignore_descriptions():
    topics = {"dragons": {"codes": [{"layer": 0, "site": "attn_heads", "head": 2, "code": 7}],
                          "strength": 2.0, "description": "fire and wings"},
              "broken": {"strength": 2.0}}
    spec = topic_spec(topics, "dragons")
    assert (spec.strength, [str(c) for c in spec.codes]) == (2.0, ["0:attn_heads:2:7"])
    assert topic_spec(topics, "dragons", strength=4.0, mode=None).strength == 4.0
    with pytest.raises(ValueError, match="unknown topic 'cats'; this bundle's topics: broken"):
        topic_spec(topics, "cats")
    with pytest.raises(ValueError, match="topic 'broken': .* with a 'codes' list"):
        topic_spec(topics, "broken")


def test_the_spec_and_the_runtimes_steering_import_no_torch():
    code = ("import sys; import cbexport.steer, codebook.steering_spec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'codebook')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[1])
    assert result.stdout.split() == ["['codebook',", "'codebook.steering_spec']"]


def test_which_tokens_each_positions_value_steers():
    from codebook.steering_spec import POSITIONS, steers

    assert {p: (steers(p, in_prompt=True), steers(p, in_prompt=False)) for p in POSITIONS} == {
        "all": (True, True), "prompt": (True, False), "generated": (False, True)}
