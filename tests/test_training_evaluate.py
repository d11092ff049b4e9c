"""``python -m training evaluate`` and the figures behind it (training/evaluate.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_training_support import generated_stories, make_tiny_base, write_stories

from codebook import attach_codebooks
from training.__main__ import main
from training.evaluate import evaluate
from training.models import load_base

DOCS = ["Lily had a red cat.", "Ben said \u201chi\u201d to the dog! The end."]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("base"))


def test_bits_per_byte_and_accuracy_equal_a_hand_computation(tiny_base):
    model, tokenizer = load_base(str(tiny_base))
    result = evaluate(model, tokenizer, DOCS, block_size=128)

    bos = tokenizer.bos_token_id
    ids = [token for doc in DOCS for token in [bos, *tokenizer.encode(doc,
                                                                      add_special_tokens=False)]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
    targets = torch.tensor(ids[1:])
    nll = F.cross_entropy(logits, targets, reduction="sum").item()
    num_bytes = sum(len(doc.encode("utf-8")) for doc in DOCS)
    assert num_bytes == result["bytes"] == 57  # 53 characters; curly quotes take 3 bytes
    assert result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-6)
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    assert result["accuracy"] == pytest.approx(accuracy)
    # short blocks still predict every token exactly once
    assert evaluate(model, tokenizer, DOCS, block_size=5)["tokens"] == len(ids) - 1


def test_site_figures_for_a_codebook_whose_output_is_zero(tiny_base):
    model, tokenizer = load_base(str(tiny_base))
    cb_model = attach_codebooks(model, sites=["attn_heads"], layers=[0], num_codes=2, k=2,
                                combine="sum")
    layer = cb_model.codebook_layers()[(0, "attn_heads")]
    with torch.no_grad():
        layer.codebook[:, 1] = -layer.codebook[:, 0]  # both codes always chosen: output 0
    result = evaluate(cb_model, tokenizer, DOCS, block_size=128)

    recorded = []  # the site's input, by hand: the input of layer 0's o_proj in the base model
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: recorded.append(args[0]))
    with cb_model.codebooks_disabled():
        without = evaluate(cb_model, tokenizer, DOCS, block_size=128)
    handle.remove()
    h = torch.cat(recorded).reshape(-1, 4, 8).double()
    site = result["sites"]["0:attn_heads"]
    assert site["mse"] == pytest.approx(h.pow(2).mean().item(), rel=1e-5)
    variance = (h - h.mean(0)).pow(2).sum()
    assert site["fvu"] == pytest.approx((h.pow(2).sum() / variance).item(), rel=1e-5)
    assert site["dead_fraction"] == site["dead_fraction_max"] == 0.0
    assert site["usage_entropy_bits"] == pytest.approx(1.0)  # two codes, used equally
    assert result["without_codebooks"]["loss"] == pytest.approx(without["loss"])
    assert result["loss"] != pytest.approx(without["loss"])


def test_evaluate_command_prints_json_for_a_saved_codebook_model(tiny_base, tmp_path, capsys):
    model, tokenizer = load_base(str(tiny_base))
    cb_model = attach_codebooks(model, tokenizer=tokenizer, sites=["attn_heads", "mlp_out"],
                                num_codes=8, k=8, combine="mean")
    cb_model.save_pretrained(tmp_path / "model")
    data = write_stories(tmp_path / "text.txt", 20)
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data),
                 "--block-size", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 20
    assert result["bytes"] == sum(len(s.encode()) for s in generated_stories(20))
    assert set(result["sites"]) == {"0:attn_heads", "0:mlp_out", "1:attn_heads", "1:mlp_out"}
    for site in result["sites"].values():  # k = all codes: every code used equally
        assert site["dead_fraction"] == 0.0
        assert site["usage_entropy_bits"] == pytest.approx(3.0)
    assert {"loss", "bits_per_byte", "accuracy"} <= set(result["without_codebooks"])
