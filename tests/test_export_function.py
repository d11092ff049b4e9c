"""The ONNX function of ``codebook::TopKCodebook`` against the eager op, in stock onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from cbexport import onnx_function
from codebook.ops import topk_codebook

G, C, D, K = 3, 16, 8, 4
OPSET = 20


def single_op_model(similarity: str, combine: str, opset: int = OPSET) -> onnx.ModelProto:
    node = helper.make_node(onnx_function.OP_TYPE, ["x", "codebook", "bias", "scale"],
                            ["out", "indices"], domain=onnx_function.DOMAIN, k=K,
                            similarity=similarity, combine=combine)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "one_codebook",
        [value("x", TensorProto.FLOAT, ["batch", "seq", G, D]),
         value("codebook", TensorProto.FLOAT, [G, C, D]),
         value("bias", TensorProto.FLOAT, [G, C]),
         value("scale", TensorProto.FLOAT, [G, C])],
        [value("out", TensorProto.FLOAT, ["batch", "seq", G, D]),
         value("indices", TensorProto.INT64, ["batch", "seq", G, K])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)  # what torch's exporter writes
    onnx_function.attach_function(model, similarity, combine)
    return model


def steering_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Group 0: one forced code with strength 2.5; group 1: everything blocked but one forced
    code (so k-1 selected slots are blocked); group 2: one blocked code."""
    bias = torch.zeros(G, C)
    bias[0, 3] = math.inf
    bias[1, :] = -math.inf
    bias[1, 7] = math.inf
    bias[2, 5] = -math.inf
    scale = torch.ones(G, C)
    scale[0, 3] = 2.5
    return bias, scale


@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("steered", [False, True])
def test_function_matches_the_eager_op(similarity, combine, steered):
    model = single_op_model(similarity, combine)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(2, 5, G, D, generator=gen), torch.randn(G, C, D, generator=gen)
    bias, scale = steering_tensors() if steered else (torch.zeros(G, C), torch.ones(G, C))
    want_out, want_idx = topk_codebook(x, codebook, K, bias if steered else None,
                                       scale if steered else None, similarity, combine)
    out, idx = session.run(None, {"x": x.numpy(), "codebook": codebook.numpy(),
                                  "bias": bias.numpy(), "scale": scale.numpy()})
    np.testing.assert_allclose(out, want_out.numpy(), atol=1e-5, rtol=0)
    assert idx.shape == (2, 5, G, K)
    if not steered:
        np.testing.assert_array_equal(idx, want_idx.numpy())
    else:
        # Compare the selected codes that count: blocked slots (score -inf) tie in any order.
        blocked = np.isneginf(bias.numpy())
        want = want_idx.numpy()
        for pos in np.ndindex(*idx.shape[:-1]):
            group = pos[-1]
            assert ({int(i) for i in idx[pos] if not blocked[group, i]}
                    == {int(i) for i in want[pos] if not blocked[group, i]})
        assert (idx[..., 0, :] == 3).any(-1).all()  # the forced code is always selected
        assert not (idx[..., 2, :] == 5).any()  # the blocked code never is


def test_function_imports_the_model_opset_and_declares_the_domain():
    model = single_op_model("cosine", "sum", opset=19)
    (function,) = model.functions
    assert (function.domain, function.name) == (onnx_function.DOMAIN, onnx_function.OP_TYPE)
    assert [(o.domain, o.version) for o in function.opset_import] == [("", 19)]
    assert list(function.attribute) == ["k", "similarity", "combine"]
    assert {(o.domain, o.version) for o in model.opset_import} == {
        ("", 19), (onnx_function.DOMAIN, onnx_function.DOMAIN_VERSION)}
    # The body uses standard ops only, so any ONNX runtime can inline it.
    assert {n.domain for n in function.node} == {""}


def test_function_refuses_nodes_of_another_variant():
    model = single_op_model("cosine", "sum")
    with pytest.raises(ValueError, match="uses \\('cosine', 'sum'\\)"):
        onnx_function.attach_function(model, "euclidean", "sum")


def test_a_native_kernel_overrides_the_function():
    """A runtime with a kernel for codebook::TopKCodebook runs it instead of the body (shown with
    onnxruntime-extensions' Python kernels; skipped where that package is not installed)."""
    ortx = pytest.importorskip("onnxruntime_extensions")
    calls = []
    dtype = ortx.PyCustomOpDef

    @ortx.onnx_op(op_type=f"{onnx_function.DOMAIN}::{onnx_function.OP_TYPE}",
                  inputs=[dtype.dt_float] * 4, outputs=[dtype.dt_float, dtype.dt_int64],
                  attrs={"k": dtype.dt_int64, "similarity": dtype.dt_string,
                         "combine": dtype.dt_string})
    def native(x, codebook, bias, scale, **attrs):
        calls.append(attrs)
        return np.full_like(x, 7.0), np.zeros((*x.shape[:-1], attrs["k"]), np.int64)

    options = ort.SessionOptions()
    options.register_custom_ops_library(ortx.get_library_path())
    session = ort.InferenceSession(single_op_model("cosine", "sum").SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 2, G, D)).astype(np.float32)
    out, _ = session.run(None, {"x": x, "codebook": np.ones((G, C, D), np.float32),
                                "bias": np.zeros((G, C), np.float32),
                                "scale": np.ones((G, C), np.float32)})
    assert (out == 7.0).all()
    assert calls == [{"k": K, "similarity": "cosine", "combine": "sum"}]
