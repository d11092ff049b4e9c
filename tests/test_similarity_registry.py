"""A similarity is one entry of ``codebook.ops.SIMILARITIES``: a toy one (negative L1 distance),
registered by a test only, works in the op, in training and in the ONNX export as the built-ins
do, with nothing else changed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cbexport.bundle import ExportError, export_bundle
from cbexport.runtime import CodebookRuntime
from codebook import CodebookModel, ops
from codebook.ops import reference_topk_codebook, topk_codebook
from tests.test_export import eager_logits, onnx_logits, tiny_codebook_model
from tests.test_export_function import C, D, G, K, single_op_model, steering_tensors
from tests.test_training_finetune import tiny_config
from tests.test_training_support import make_material
from tests.tiny_models import VOCAB
from training.trainer import finetune

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def neg_l1_scores(x, codebook):
    return -(x.unsqueeze(-2) - codebook).abs().sum(-1)  # [..., g, C, d] differences: a toy


def l1_distance(points, centre):
    return (points - centre[:, None]).abs().sum(-1)


def onnx_neg_l1_scores(body, x, codebook):
    x_b = body.op("Unsqueeze", [x, body.ints("axis2", [2])], "x_b")  # [g, N, 1, d]
    codebook_b = body.op("Unsqueeze", [codebook, body.ints("axis1", [1])], "cb_b")  # [g, 1, C, d]
    diff = body.op("Abs", [body.op("Sub", [x_b, codebook_b], "diff")], "abs_diff")
    total = body.op("ReduceSum", [diff, body.ints("last_axis", [-1])], "l1", keepdims=0)
    return body.op("Neg", [total], "scores")  # names the body already uses: it renames them


NEG_L1 = ops.Similarity("neg_l1", neg_l1_scores, l1_distance, onnx_neg_l1_scores,
                        scale_invariant=False)


@pytest.fixture
def neg_l1():
    """The toy similarity, registered for one test: the next test sees the built-ins only."""
    ops.register_similarity(NEG_L1)
    try:
        yield NEG_L1.name
    finally:
        del ops.SIMILARITIES[NEG_L1.name]


def test_a_name_is_registered_once(neg_l1):
    with pytest.raises(ValueError, match="'neg_l1' is already registered"):
        ops.register_similarity(NEG_L1)
    with pytest.raises(ValueError, match="already registered"):
        ops.register_similarity(ops.SIMILARITIES["cosine"])


# -- the op -------------------------------------------------------------------------------------

@pytest.mark.parametrize("combine", ops.COMBINES)
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_the_op_matches_the_reference_forward_and_backward(neg_l1, combine, chunk_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 6, generator=gen, requires_grad=True)
    codebook = torch.randn(3, 20, 6, generator=gen, requires_grad=True)
    bias = torch.randn(3, 20, generator=gen) * 0.1
    bias[0, 4], bias[1, :15] = float("inf"), -float("inf")
    scale = torch.rand(3, 20, generator=gen) + 0.5
    upstream = torch.randn(2, 7, 3, 6, generator=gen)
    weight = 2.0
    for b, s in [(None, None), (bias, scale)]:
        x.grad = codebook.grad = None
        out, idx = topk_codebook(x, codebook, 4, b, s, neg_l1, combine, weight, chunk_size)
        (out * upstream).sum().backward()
        ref_cb = codebook.detach().clone().requires_grad_(True)
        ref_out, ref_idx = reference_topk_codebook(x.detach(), ref_cb, 4, b, s, neg_l1, combine)
        loss = (ref_out * upstream).sum() + weight * ((ref_out - x.detach()) ** 2).mean()
        loss.backward()
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(x.grad, upstream)  # straight through
        torch.testing.assert_close(codebook.grad, ref_cb.grad)
    # The toy really decides: its choices are not those of the squared distance.
    _, toy_idx = topk_codebook(x, codebook, 4, similarity=neg_l1)
    _, euclidean_idx = topk_codebook(x, codebook, 4, similarity="euclidean")
    assert not torch.equal(toy_idx, euclidean_idx)


# -- training -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("material"))


def test_finetuning_with_it_learns_and_saves_a_model_that_loads(neg_l1, material, tmp_path):
    """k-means initialisation (its distance and scores), the straight-through training steps
    and the saved config all go through the registry."""
    snapshots = {}

    def on_step(step, model):
        if step in (0, 1):
            snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = finetune(tiny_config(material, tmp_path / "run", similarity=neg_l1, max_steps=12,
                               eval_every=0), on_step=on_step)
    unchanged = [n for n in snapshots[0] if torch.equal(snapshots[0][n], snapshots[1][n])]
    assert unchanged == [], "every parameter, base and codebook, gets a gradient"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    model = CodebookModel.from_pretrained(out)
    assert model.codebook_config.similarity == neg_l1
    layer = model.codebook_layers()[(0, "attn_heads")]
    assert layer.similarity == neg_l1 and layer.code_counts.sum() > 0


# -- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("steered", [False, True])
def test_the_onnx_function_matches_the_eager_op(neg_l1, steered):
    model = single_op_model(neg_l1, "sum")
    onnx.checker.check_model(model, full_check=True)
    (function,) = model.functions
    assert {"Abs", "Neg"} <= {n.op_type for n in function.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    x, codebook = torch.randn(2, 5, G, D, generator=gen), torch.randn(G, C, D, generator=gen)
    bias, scale = steering_tensors() if steered else (torch.zeros(G, C), torch.ones(G, C))
    want_out, want_idx = topk_codebook(x, codebook, K, bias, scale, neg_l1, "sum")
    out, idx = session.run(None, {"x": x.numpy(), "codebook": codebook.numpy(),
                                  "bias": bias.numpy(), "scale": scale.numpy()})
    np.testing.assert_allclose(out, want_out.numpy(), atol=1e-5, rtol=0)
    counted = ~np.isneginf(bias.numpy()[np.arange(G)[:, None], want_idx.numpy()])
    np.testing.assert_array_equal(np.where(counted, idx, -1), np.where(counted, want_idx, -1))


@pytest.mark.slow  # exports a whole decoder (about 20 s)
def test_an_exported_model_matches_torch_in_onnxruntime(neg_l1, tmp_path):
    model = tiny_codebook_model("llama", sites=["attn_heads", "mlp_out"], num_codes=16, k=2,
                                similarity=neg_l1)
    manifest = export_bundle(model, tmp_path / "bundle", formats="onnx", optimize=False)
    assert manifest["codebook"]["similarity"] == neg_l1
    runtime = CodebookRuntime(tmp_path / "bundle", provider="cpu")
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    mask = np.ones_like(ids)
    got, want = onnx_logits(runtime, ids, mask), eager_logits(model, ids, mask)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=0)
    for key, codes in got[2].items():
        np.testing.assert_array_equal(codes, want[2][key])


def test_torchscript_refuses_it_since_the_bundles_op_module_cannot_define_it(neg_l1, tmp_path):
    model = tiny_codebook_model("llama", num_codes=16, k=2, similarity=neg_l1)
    with pytest.raises(ExportError, match="op module knows the built-in similarities only, not "
                                          "the registered 'neg_l1': export the onnx format"):
        export_bundle(model, tmp_path / "bundle", formats="torchscript")
    assert not (tmp_path / "bundle").exists()


def test_the_toy_is_gone_after_its_tests():
    assert list(ops.SIMILARITIES) == ["cosine", "inner_product", "euclidean"]
