"""One record per model family: every path it names exists on a tiny model of that family, and the
families added after the paper (Mistral, Qwen2) work end to end."""

from __future__ import annotations

import pytest
import torch

from codebook import CodebookModel, CodeRef, Steering
from codebook import original as original_module
from codebook.analysis.promote import promoted_tokens, residual_vector
from codebook.architectures import ARCHITECTURES, get_module, num_heads
from tests.test_model import ALL_SITES, tiny_model
from tests.tiny_models import CONFIGS, FAMILIES, VOCAB, tiny_base

NEW_FAMILIES = ("mistral", "qwen2")


def test_every_family_has_a_tiny_config_and_is_tested():
    assert set(CONFIGS) == set(ARCHITECTURES)
    assert set(NEW_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_the_records_paths_exist_on_the_model(family):
    arch = ARCHITECTURES[family]
    base = tiny_base(family)
    assert base.config.model_type == family
    blocks = get_module(base, arch.layers)
    assert len(blocks) == base.config.num_hidden_layers == 2
    for block in blocks:
        get_module(block, arch.attn_out_proj)
        get_module(block, arch.mlp)
    assert num_heads(base.config, arch) == 4
    # The final norm is the last thing before the unembedding: its output is the last hidden state.
    seen = {}
    handle = get_module(base, arch.final_norm).register_forward_hook(
        lambda module, args, output: seen.update(out=output))
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        out = base(ids, output_hidden_states=True)
    handle.remove()
    assert torch.equal(seen["out"], out.hidden_states[-1])
    if arch.original is not None:
        for block in blocks:
            attention = get_module(block, arch.original.attention)
            assert get_module(block, arch.attn_out_proj) in set(attention.modules())
            get_module(block, arch.original.mlp)


def test_original_library_families_come_from_the_records():
    assert original_module.FAMILIES == {
        "GPT2CodebookModel": "gpt2",
        "GPTNeoCodebookModel": "gpt_neo",
        "GPTNeoXCodebookModel": "gpt_neox",
    }


# -- Mistral and Qwen2 end to end -----------------------------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_codebooks_at_every_site_and_off_gives_the_base_exactly(family):
    reference = tiny_base(family)
    model = tiny_model(family)
    assert set(model.codebook_layers()) == {(i, s) for i in range(2) for s in ALL_SITES}
    heads = model.codebook_layers()[(0, "attn_heads")]
    assert (heads.groups, heads.dim) == (4, 8)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = reference(ids).logits
        snapped = model(ids).logits
        with model.codebooks_disabled():
            assert torch.equal(model(ids).logits, expected)
    assert not torch.allclose(snapped, expected)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_steering_changes_the_output(family):
    model = tiny_model(family, sites=["attn_heads", "mlp_out"], num_codes=32, k=3)
    ids = torch.tensor([[5, 17, 33, 8, 61, 2]])
    steering = Steering(codes=[CodeRef(1, "attn_heads", h, 7) for h in range(4)], strength=4.0)
    with torch.no_grad():
        plain = model(ids).logits
        with model.steer(steering):
            steered = model(ids).logits
        plain_text = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        steered_text = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                      steering=steering)
    assert not torch.allclose(plain, steered)
    assert not torch.equal(plain_text, steered_text)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    model = tiny_model(family, layer_norm=True)
    model.save_pretrained(tmp_path)
    loaded = CodebookModel.from_pretrained(tmp_path)
    assert loaded.architecture == ARCHITECTURES[family]
    assert loaded.codebook_config == model.codebook_config
    own, other = model.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys()
    for name in own:
        assert torch.equal(own[name], other[name]), name
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("site", ["attn_heads", "mlp_out"])
def test_promoted_tokens_read_through_the_final_norm(family, site):
    model = tiny_model(family, sites=[site])
    norm = model.base.model.norm
    norm.weight.data.uniform_(0.5, 1.5)  # a gain that is not all ones, so skipping it shows
    ref = CodeRef(1, site, 2 if site == "attn_heads" else 0, 7)
    vector = model.codebook_layers()[(1, site)].codebook.data[ref.head, ref.code]
    if site == "attn_heads":
        proj = model.base.model.layers[1].self_attn.o_proj
        vector = proj.weight[:, 2 * 8:3 * 8] @ vector
    torch.testing.assert_close(residual_vector(model, ref), vector)
    logits = model.base.lm_head.weight @ (norm.weight * vector)
    top = promoted_tokens(model, ref, top=5)
    assert [t["id"] for t in top] == logits.topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor([t["logit"] for t in top]), logits.topk(5).values)
