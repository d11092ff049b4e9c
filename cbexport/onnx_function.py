"""``codebook::TopKCodebook``: the codebook op as an ONNX custom-domain op that carries its own
definition.

Every codebook of an exported model is one node of this op. Its body travels inside the ``.onnx``
file as a model-local ``FunctionProto`` built from standard ONNX ops only, so any runtime that
understands ONNX functions (stock onnxruntime on CPU and CUDA) runs it by inlining the body, while
a runtime that has a native kernel registered for ``codebook::TopKCodebook`` may run that instead.

Signature (mirrors ``torch.ops.codebook.topk_codebook``; see ``codebook/ops.py``)::

    out, indices = codebook.TopKCodebook<k, similarity, combine>(x, codebook, bias, scale)

    x        [..., g, d]  activations (already through the site's LayerNorm, if any)
    codebook [g, C, d]
    bias     [g, C]       added to the similarity scores (0: none, +inf: force, -inf: block)
    scale    [g, C]       multiplies each selected code's vector (1: none)
    out      [..., g, d]  the combination of the k selected codes
    indices  [..., g, k]  int64, the selected codes, best first

``bias`` and ``scale`` are required inputs (the exporter feeds the model's steering inputs), which
keeps the body free of optional-input branches. ``similarity`` and ``combine`` are recorded on
every node for native kernels; the body is generated for the one combination a model uses (a
codebook model has a single :class:`~codebook.configuration.CodebookConfig`), and
:func:`check_nodes_match` refuses a graph whose nodes disagree with it. The scores come from the
similarity's own ONNX emitter (``onnx_scores`` of its entry in ``codebook.ops.SIMILARITIES``).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from codebook.ops import COMBINES, SIMILARITIES

DOMAIN = "codebook"
OP_TYPE = "TopKCodebook"
DOMAIN_VERSION = 1
INPUTS = ("x", "codebook", "bias", "scale")
OUTPUTS = ("out", "indices")
ATTRIBUTES = ("k", "similarity", "combine")


def op_schema() -> OpSchema:
    """The op's schema, for building nodes (the exporter needs one to emit a call). It is not
    registered globally: a model file must stay valid without it, through its function."""
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[param(name, "T") for name in INPUTS],
        outputs=[param("out", "T"), param("indices", "tensor(int64)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[
            attr("k", OpSchema.AttrType.INT, "number of codes selected per group"),
            attr("similarity", OpSchema.AttrType.STRING, "a similarity of codebook.ops"),
            attr("combine", OpSchema.AttrType.STRING, " | ".join(COMBINES)),
        ],
    )


class _Body:
    """Accumulates the function's nodes. Every intermediate gets a unique readable name: the one
    asked for, numbered if already taken (similarity emitters choose names without knowing the
    rest of the body); the function's inputs and outputs keep theirs."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._names = set(INPUTS) | set(OUTPUTS)

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        return self.node(op_type, inputs, [self.fresh(output)], **attrs)[0]

    def node(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        """A node writing ``outputs`` under exactly those names."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs

    def fresh(self, name: str) -> str:
        fresh, number = name, 1
        while fresh in self._names:
            number += 1
            fresh = f"{name}_{number}"
        self._names.add(fresh)
        return fresh

    def ints(self, name: str, values: list[int]) -> str:
        value = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        return self.op("Constant", [], name, value=value)

    def scalar_like(self, name: str, value: float, like: str) -> str:
        """A float constant cast to the element type of ``like`` (the function is type-generic)."""
        raw = self.op("Constant", [], name + "_f32",
                      value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
        return self.op("CastLike", [raw, like], name)


def build_function(opset: int, similarity: str, combine: str) -> onnx.FunctionProto:
    """The function body for one (similarity, combine) pair. ``opset`` must be the model's
    default-domain opset (a model-local function has to import the same version)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}")
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}")
    b = _Body()
    k_scalar = b.op("Constant", [], "k_scalar")
    b.nodes[-1].attribute.append(
        helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name="k")
    )
    k = b.op("Reshape", [k_scalar, b.ints("one_dim", [1])], "k_1d")

    # [..., g, d] -> [g, N, d]: one batched matmul scores every token of every group.
    x_shape = b.op("Shape", ["x"], "x_shape")
    group_dims = b.op("Shape", ["x"], "group_dims", start=-2)
    flat = b.op("Reshape", ["x", b.op("Concat", [b.ints("minus_one", [-1]), group_dims],
                                      "flat_shape", axis=0)], "flat")
    xg = b.op("Transpose", [flat], "xg", perm=[1, 0, 2])
    scores = SIMILARITIES[similarity].onnx_scores(b, xg, "codebook")  # [g, N, C]
    bias_b = b.op("Unsqueeze", ["bias", b.ints("bias_axis", [1])], "bias_b")  # [g, 1, C]
    scores = b.op("Add", [scores, bias_b], "scores")
    top_scores, top_idx = b.node("TopK", [scores, k], [b.fresh("top_scores"), b.fresh("top_idx")],
                                 axis=-1, largest=1, sorted=1)

    # Weight of each selected code: 0 when blocked (score -inf), 1/valid-count for mean, times
    # its scale. Scattered into a dense [g, N, C] matrix, the combination is one more matmul.
    neg_inf = b.scalar_like("neg_inf", float("-inf"), "x")
    valid = b.op("CastLike", [b.op("Greater", [top_scores, neg_inf], "is_valid"), "x"], "valid")
    weights = valid
    if combine == "mean":
        count = b.op("ReduceSum", [valid, b.ints("k_axis", [-1])], "valid_count", keepdims=1)
        weights = b.op("Div", [valid, b.op("Max", [count, b.scalar_like("one", 1.0, "x")],
                                           "count_clamped")], "mean_weights")
    zeros = b.op("ConstantOfShape", [b.op("Shape", [scores], "scores_shape")], "zeros_f32")
    dense = b.op("ScatterElements", [b.op("CastLike", [zeros, "x"], "zeros"), top_idx, weights],
                 "dense_weights", axis=-1)
    dense = b.op("Mul", [dense, b.op("Unsqueeze", ["scale", b.ints("scale_axis", [1])],
                                     "scale_b")], "scaled_weights")
    combined = b.op("MatMul", [dense, "codebook"], "combined")  # [g, N, d]
    b.node("Reshape", [b.op("Transpose", [combined], "combined_t", perm=[1, 0, 2]), x_shape],
           ["out"])

    lead = b.op("Shape", ["x"], "lead_shape", end=-1)  # [..., g]
    idx_shape = b.op("Concat", [lead, k], "indices_shape", axis=0)
    b.node("Reshape", [b.op("Transpose", [top_idx], "top_idx_t", perm=[1, 0, 2]), idx_shape],
           ["indices"])

    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(INPUTS),
        list(OUTPUTS),
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
        doc_string=(
            f"Top-k codebook bottleneck ({similarity} similarity, {combine} of the selected "
            "codes); see codebook/ops.py of the codebook-features project."
        ),
    )


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the model imports no default-domain opset")


def codebook_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def check_nodes_match(model: onnx.ModelProto, similarity: str, combine: str) -> None:
    """Every ``TopKCodebook`` node must use the (similarity, combine) the function implements."""
    for node in codebook_nodes(model):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        got = (attrs["similarity"].decode(), attrs["combine"].decode())
        if got != (similarity, combine):
            raise ValueError(f"node {node.name} uses {got}, but the function implements "
                             f"{(similarity, combine)}")


def attach_function(model: onnx.ModelProto, similarity: str, combine: str) -> None:
    """Add (or replace) the op's definition in ``model`` and declare the custom domain."""
    check_nodes_match(model, similarity, combine)
    function = build_function(default_opset(model), similarity, combine)
    kept = [f for f in model.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept + [function])
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
