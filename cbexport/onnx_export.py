"""ONNX export with torch's exporter (``torch.onnx.export(..., dynamo=True)``).

The codebook op is translated to one opaque ``codebook::TopKCodebook`` node per site, and the op's
definition is attached to the model afterwards as a model-local function
(:mod:`cbexport.onnx_function`). Translating the op straight into an onnxscript function would
have the exporter inline its body, losing the node a native kernel could claim.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import onnx
import onnxscript
import torch
from torch.export import Dim

from cbexport import onnx_function
from cbexport.decoder import Decoder, capture_mode, check_exportable, decoder_shape, example_inputs
from codebook.modeling import CodebookModel

OPSET = 20


def _translation_table() -> dict:
    opset = onnxscript.values.Opset(onnx_function.DOMAIN, onnx_function.DOMAIN_VERSION)
    node = onnxscript.values.Op(opset, onnx_function.OP_TYPE, onnx_function.op_schema())

    def topk_codebook(x, codebook, k, bias=None, scale=None, similarity="cosine",
                      combine="mean", reconstruction_weight=1.0, chunk_size=0):
        # reconstruction_weight only shapes gradients and chunk_size only bounds eager memory.
        if bias is None or scale is None:
            raise ValueError("the exported decoder always feeds steering bias and scale")
        return node(x, codebook, bias, scale, k=k, similarity=similarity, combine=combine)

    return {torch.ops.codebook.topk_codebook.default: topk_codebook}


def _dynamic_shapes(num_layers: int, num_sites: int) -> tuple:
    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    kv = [{0: batch, 2: past} for _ in range(2 * num_layers)]
    steer = [None] * (2 * num_sites)
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple(kv + steer))


def export_onnx(model: CodebookModel, path: str | Path, optimize: bool = True) -> dict:
    """Write ``model`` as an ONNX decoder to ``path``; returns facts for the manifest."""
    check_exportable(model)
    config = model.codebook_config
    shape = decoder_shape(model)
    start = time.perf_counter()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": irrelevant here
    try:
        with capture_mode(model), warnings.catch_warnings():
            # Noise from inside the exporter: Dim names it merges, a deprecated pytree check.
            warnings.filterwarnings("ignore", message="# The axis name")
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            program = torch.onnx.export(
                Decoder(model, shape).eval(),
                example_inputs(model, shape),
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=_translation_table(),
                dynamic_shapes=_dynamic_shapes(shape.num_layers, len(shape.sites)),
                input_names=shape.input_names(),
                output_names=shape.output_names(),
                optimize=optimize,
                verbose=False,
            )
    finally:
        registry_log.setLevel(level)
    proto = program.model_proto
    nodes = len(onnx_function.codebook_nodes(proto))
    if nodes != len(shape.sites):
        raise RuntimeError(f"the exported graph has {nodes} {onnx_function.OP_TYPE} nodes for "
                           f"{len(shape.sites)} codebook sites")
    onnx_function.attach_function(proto, config.similarity, config.combine)
    onnx.save(proto, str(path))
    # The full check also runs shape inference through the function body.
    onnx.checker.check_model(str(path), full_check=True)
    return {
        "opset": onnx_function.default_opset(proto),
        "custom_op": f"{onnx_function.DOMAIN}::{onnx_function.OP_TYPE}",
        "codebook_nodes": nodes,
        "inputs": shape.input_names(),
        "outputs": shape.output_names(),
        "export_seconds": round(time.perf_counter() - start, 2),
    }
