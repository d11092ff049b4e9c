"""Attaching codebooks to every supported family and site; switching them off; saving/loading."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from codebook import CodebookConfig, CodebookModel, attach_codebooks
from codebook.architectures import get_module
from codebook.ops import combine_codes
from tests.tiny_models import FAMILIES, VOCAB, tiny_base

ALL_SITES = ["attn_heads", "attn_out", "mlp_out", "block_out"]


def tiny_model(family="llama", sites=ALL_SITES, seed=0, **options) -> CodebookModel:
    options = {"num_codes": 24, "k": 3, **options}
    model = attach_codebooks(tiny_base(family, seed), sites=sites, **options)
    torch.manual_seed(seed + 1)
    for layer in model.codebook_layers().values():
        layer.codebook.data.normal_()
    return model.eval()


def site_module(model: CodebookModel, layer: int, site: str):
    block = get_module(model.base, model.architecture.layers)[layer]
    if site in ("attn_heads", "attn_out"):
        return get_module(block, model.architecture.attn_out_proj)
    if site == "mlp_out":
        return get_module(block, model.architecture.mlp)
    return block


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ALL_SITES)
@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_site_output_is_the_combination_of_selected_codes(family, site, combine):
    model = tiny_model(family, sites=[site], combine=combine)
    seen = {}
    module = site_module(model, 1, site)
    # Registered after the codebook's own hook, so it sees what the codebook produced.
    if site == "attn_heads":
        handle = module.register_forward_pre_hook(lambda m, args: seen.update(value=args[0]))
    else:
        def record(m, args, output):
            seen["value"] = output[0] if isinstance(output, tuple) else output
        handle = module.register_forward_hook(record)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad(), model.capture_codes() as captured:
        model(ids)
    handle.remove()
    layer = model.codebook_layers()[(1, site)]
    indices = captured[(1, site)][0]
    assert indices.shape == (2, 9, layer.groups, 3)
    flat = indices.reshape(-1, layer.groups, 3)
    valid = torch.ones_like(flat, dtype=torch.bool)
    expected = combine_codes(layer.codebook, flat, valid, None, combine)
    torch.testing.assert_close(seen["value"].reshape(-1, layer.groups, layer.dim), expected)
    if site == "attn_heads":
        assert layer.groups == 4 and layer.dim == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_codebooks_give_base_logits_exactly(family):
    reference = tiny_base(family)
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = reference(ids).logits
        snapped = model(ids).logits
        with model.codebooks_disabled():
            off = model(ids).logits
        again = model(ids).logits
    assert torch.equal(off, expected)
    assert not torch.allclose(snapped, expected)
    assert torch.equal(again, snapped), "leaving the context switches codebooks back on"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family):
    model = tiny_model(family)
    ids = torch.randint(2, VOCAB, (1, 6))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape[1] > ids.shape[1]
    assert torch.equal(cached, uncached)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model("gpt2", sites=["attn_heads", "mlp_out"], layer_norm=True, layers=[1])
    for layer in model.codebook_layers().values():
        layer.ln_weight.data.uniform_(0.5, 1.5)
        layer.code_counts.random_(0, 100)
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "codebook_config.json",
            "codebooks.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded = CodebookModel.from_pretrained(tmp_path)
    assert loaded.codebook_config == model.codebook_config
    own, other = model.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys()
    for name in own:
        assert torch.equal(own[name], other[name]), name
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_load_keeps_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "once", "upon", "a", "time"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    model = attach_codebooks(tiny_base("llama"), tokenizer=tokenizer, num_codes=8, k=2)
    model.save_pretrained(tmp_path)
    loaded = CodebookModel.from_pretrained(tmp_path)
    assert loaded.tokenizer("once upon a time")["input_ids"] == [2, 3, 4, 5]


def test_every_parameter_is_registered_once():
    model = tiny_model("llama", sites=["attn_heads", "mlp_out"])
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    codebook_params = [n for n in names if n.startswith("codebooks.")]
    assert len(codebook_params) == 4  # 2 layers x 2 sites
    base_params = {n for n, _ in tiny_base("llama").named_parameters()}
    assert {n.removeprefix("base.") for n in names if n.startswith("base.")} == base_params


def test_code_counts_follow_training_mode():
    model = tiny_model("gpt_neox", sites=["attn_heads"])
    ids = torch.randint(0, VOCAB, (2, 5))
    layer = model.codebook_layers()[(0, "attn_heads")]
    model.eval()
    model(ids)
    assert layer.code_counts.sum() == 0
    model.train()
    model(ids)
    assert layer.code_counts.sum() == 2 * 5 * layer.groups * 3
    assert (layer.code_counts.sum(-1) == 2 * 5 * 3).all()


def test_training_step_updates_base_and_codebooks():
    model = tiny_model("gpt2", sites=["attn_heads", "mlp_out"]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters()
                 if torch.equal(p, before[n]) and "wpe" not in n]
    assert not unchanged, unchanged


def test_unsupported_architecture_lists_supported_ones():
    config = transformers.OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                    ffn_dim=32, vocab_size=50, word_embed_proj_dim=16)
    base = transformers.OPTForCausalLM(config)
    with pytest.raises(ValueError, match=r"unsupported architecture 'opt'.*GPT-2.*Llama"):
        attach_codebooks(base, num_codes=8, k=2)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_codes": 8, "k": 9}, r"k must be between 1 and num_codes \(8\)"),
        ({"sites": ["attention"]}, r"unknown codebook site\(s\) \['attention'\]"),
        ({"layers": [5]}, r"layers \[5\] out of range: the model has 2 layers"),
        ({"similarity": "dot"}, "similarity must be one of"),
    ],
)
def test_bad_config_is_a_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        attach_codebooks(tiny_base("llama"), **{"num_codes": 8, "k": 2, **options})


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        CodebookModel.from_pretrained(str(tmp_path / "missing"))
    tiny_base("gpt2").save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="is not a codebook model"):
        CodebookModel.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repo id"):
        CodebookModel.from_pretrained("not a//repo")
    model = tiny_model("gpt2", sites=["mlp_out"])
    model.save_pretrained(tmp_path / "cb")
    other = CodebookConfig(sites=["mlp_out"], num_codes=12, k=3)
    other.save(tmp_path / "cb")
    shape_error = r"codebooks.safetensors: 0.mlp_out.\w+ has shape \(1, 24\), the config expects"
    with pytest.raises(ValueError, match=shape_error):
        CodebookModel.from_pretrained(tmp_path / "cb")


def test_copy_keeps_hooks_independent():
    model = tiny_model("llama", sites=["mlp_out"])
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        twin.set_codebooks_enabled(False)
        assert not torch.equal(model(ids).logits, twin(ids).logits)


def base_hook_count(base) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_attach_is_refused_and_detach_gives_back_the_bare_base(family):
    reference, base = tiny_base(family), tiny_base(family)
    ids = torch.randint(0, VOCAB, (2, 7))
    model = attach_codebooks(base, sites=ALL_SITES, num_codes=24, k=3)
    hooks = base_hook_count(base)
    with pytest.raises(ValueError, match=r"already has codebooks attached.*detach\(\)"):
        attach_codebooks(base, sites=["mlp_out"], num_codes=8, k=2)
    with pytest.raises(ValueError, match="already has codebooks attached"):
        CodebookModel(base, CodebookConfig(sites=["block_out"], num_codes=8, k=2))
    assert base_hook_count(base) == hooks, "a refused attach leaves no hook behind"
    with torch.no_grad():
        expected = reference(ids).logits
        with model.codebooks_disabled():
            assert torch.equal(model(ids).logits, expected)
        assert model.detach() is base
        assert base_hook_count(base) == 0
        assert torch.equal(base(ids).logits, expected)
        assert torch.equal(model(ids).logits, expected), "a detached model runs the bare base"
        model.detach()  # twice is harmless
        again = attach_codebooks(base, sites=["mlp_out"], num_codes=8, k=2)
        with again.codebooks_disabled():
            assert torch.equal(again(ids).logits, expected)


def test_a_failed_attach_leaves_no_hook_behind():
    base = tiny_base("gpt2")
    config = CodebookConfig(sites=["mlp_out", "attn_heads"], num_codes=8, k=2)
    base.config.n_head = 5  # 32 is not divisible by 5: the second site fails
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        CodebookModel(base, config)
    assert base_hook_count(base) == 0


def test_detaching_a_copy_leaves_the_original_attached():
    model = tiny_model("llama", sites=["mlp_out"])
    twin = copy.deepcopy(model)
    hooks = base_hook_count(model.base)
    twin.detach()
    assert base_hook_count(twin.base) == 0 and base_hook_count(model.base) == hooks > 0


def test_the_op_the_layer_the_config_and_training_share_one_default_each():
    import inspect

    from codebook.layer import CodebookLayer
    from codebook.ops import topk_codebook
    from training.config import FinetuneConfig

    op = inspect.signature(topk_codebook).parameters
    layer = inspect.signature(CodebookLayer).parameters
    config = CodebookConfig()
    training = FinetuneConfig(base="base", data=["text.txt"], output="out")
    for name in ("similarity", "combine"):
        assert op[name].default == layer[name].default == getattr(config, name) == getattr(
            training, name), name
    assert config.combine == "sum"  # as the paper writes it
    assert (training.num_codes, training.k) == (config.num_codes, config.k)
