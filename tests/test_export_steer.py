"""The runtime's numpy steering (cbexport.steer) builds exactly the tensors of codebook.steering."""

from __future__ import annotations

import numpy as np
import pytest

from cbexport.steer import SteerSpec, parse_codes, steering_arrays, topic_spec
from codebook import CodebookLayer, Steering

LAYERS = {
    (0, "attn_heads"): CodebookLayer(groups=4, dim=8, num_codes=16, k=3),
    (1, "mlp_out"): CodebookLayer(groups=1, dim=32, num_codes=16, k=3),
}
SITES = [{"layer": layer, "site": site, "groups": cb.groups, "num_codes": cb.num_codes, "k": cb.k}
         for (layer, site), cb in LAYERS.items()]


@pytest.mark.parametrize("options", [
    {"codes": "0:attn_heads:1:5"},
    {"codes": "L0.attn_heads.H1.C5, 1:mlp_out:0:2", "strength": 3.0},
    {"codes": ["0:attn_heads:1:5", "0:attn_heads:1:6"], "mode": "replace"},
    {"codes": '[{"layer": 1, "site": "mlp_out", "head": 0, "code": 9}]',
     "block": ["0:attn_heads:3:0", "1:mlp_out:0:1"], "strength": 0.5, "mode": "replace"},
])
def test_numpy_steering_equals_the_torch_steering(options):
    want = Steering(**options).layer_steerings(LAYERS)
    got = steering_arrays(SITES, SteerSpec(**options))
    assert set(got) == set(want)
    for key, (bias, scale) in got.items():
        np.testing.assert_array_equal(bias, want[key].bias.numpy())
        torch_scale = want[key].scale
        expected = np.ones_like(scale) if torch_scale is None else torch_scale.numpy()
        np.testing.assert_array_equal(scale, expected)


@pytest.mark.parametrize(("options", "message"), [
    ({"codes": "5:attn_heads:0:1"}, "no codebook at layer 5"),
    ({"codes": "0:attn_heads:4:1"}, "head must be in \\[0, 4\\)"),
    ({"codes": "0:attn_heads:0:16"}, "code id must be in \\[0, 16\\)"),
    ({"codes": [f"0:attn_heads:0:{i}" for i in range(4)]}, "only k=3"),
])
def test_numpy_steering_rejects_what_torch_rejects(options, message):
    with pytest.raises(ValueError, match=message):
        Steering(**options).layer_steerings(LAYERS)
    with pytest.raises(ValueError, match=message):
        steering_arrays(SITES, SteerSpec(**options))


def test_spec_validation():
    assert [str(c) for c in parse_codes("L0.attn_heads.H1.C5,1/mlp_out/0/2")] == [
        "0:attn_heads:1:5", "1:mlp_out:0:2"]
    with pytest.raises(ValueError, match="LAYER:SITE:HEAD:CODE"):
        parse_codes("attn_heads:1")
    with pytest.raises(ValueError, match="mode"):
        SteerSpec(codes="0:attn_heads:1:5", mode="multiply")
    with pytest.raises(ValueError, match="both forced and blocked"):
        SteerSpec(codes="0:attn_heads:1:5", block="0:attn_heads:1:5")


def test_topic_presets_take_overrides_and_ignore_descriptions():
    topics = {"dragons": {"codes": [{"layer": 0, "site": "attn_heads", "head": 2, "code": 7}],
                          "strength": 2.0, "description": "fire and wings"}}
    spec = topic_spec(topics, "dragons")
    assert (spec.strength, [str(c) for c in spec.codes]) == (2.0, ["0:attn_heads:2:7"])
    assert topic_spec(topics, "dragons", strength=4.0, mode=None).strength == 4.0
    with pytest.raises(ValueError, match="unknown topic 'cats'; this bundle's topics: dragons"):
        topic_spec(topics, "cats")
