"""What a bundle holds and how its parts are named: the one place both the exporter (torch) and the
runtime (no torch) read. Nothing here may import torch or ``codebook``.

A bundle is a directory::

    bundle.json          this manifest: model shape, codebook sites, tensor names, files
    model.onnx           decoder with KV cache, steering inputs, code outputs (format "onnx")
    model.torchscript.pt traced decoder (format "torchscript")
    codebook_op.py       registers codebook::topk_codebook with plain torch, for the TorchScript
    tokenizer.json       the tokenizer (Hugging Face ``tokenizers`` format)
    topics.json          topic presets, when the model has them
    README.md            model card with usage
    verification.json    how the exported files compare with torch eager
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "bundle.json"
FORMAT_VERSION = 1
FORMATS = ("onnx", "torchscript")
FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "torchscript_op": "codebook_op.py",
    "tokenizer": "tokenizer.json",
    "topics": "topics.json",
    "card": "README.md",
    "verification": "verification.json",
}
# The files each format needs besides the manifest, tokenizer, card and report.
FORMAT_FILES = {"onnx": ("onnx",), "torchscript": ("torchscript", "torchscript_op")}


class BundleError(ValueError):
    """A bundle that cannot be used: missing or malformed files."""


# -- tensor names of the exported decoder ------------------------------------------------------
# The KV names follow the convention of Hugging Face Optimum / onnxruntime-genai exports.

def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def steer_name(layer: int, site: str, kind: str) -> str:
    """``kind`` is ``bias`` (added to the code scores) or ``scale`` (multiplies code vectors)."""
    return f"steer.{layer}.{site}.{kind}"


def input_names(num_layers: int, sites: list[tuple[int, str]]) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    names += [past_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    names += [steer_name(layer, site, kind) for layer, site in sites for kind in ("bias", "scale")]
    return names


def codes_name(layer: int, site: str) -> str:
    """The codes a site selected: int64 ``[batch, seq, groups, k]``, best first."""
    return f"codes.{layer}.{site}"


def output_names(num_layers: int, sites: list[tuple[int, str]]) -> list[str]:
    names = ["logits"]
    names += [present_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]
    names += [codes_name(layer, site) for layer, site in sites]
    return names


# -- reading a bundle ---------------------------------------------------------------------------

def read_manifest(bundle: str | Path, need: tuple[str, ...] = ()) -> dict:
    """The manifest of ``bundle``, after checking that it and the files of the formats in
    ``need`` (plus the tokenizer) are present. Raises :class:`BundleError` naming what is wrong."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle directory not found: {bundle}")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not a codebook bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path} is not a version-{FORMAT_VERSION} bundle manifest")
    for fmt in need:
        if fmt not in manifest.get("formats", []):
            raise BundleError(f"bundle {bundle} was exported without the {fmt} format "
                              f"(it has: {', '.join(manifest.get('formats', [])) or 'none'})")
    wanted = ["tokenizer"] + [key for fmt in need for key in FORMAT_FILES[fmt]]
    if manifest.get("topics"):
        wanted.append("topics")
    missing = [FILES[key] for key in wanted if not (bundle / FILES[key]).is_file()]
    if missing:
        raise BundleError(f"bundle {bundle} is incomplete: missing {', '.join(missing)}")
    return manifest
