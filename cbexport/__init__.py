"""Export codebook models to ONNX and TorchScript bundles, and run them without torch.

* ``python -m cbexport --model default --out bundle/ [--verify]`` or :func:`export_bundle`
  (:mod:`cbexport.bundle`) writes a bundle; :mod:`cbexport.manifest` describes its layout.
* ``python -m cbexport.run --bundle bundle/ --prompt ...`` or :class:`CodebookRuntime`
  (:mod:`cbexport.runtime`) generates and steers with onnxruntime, numpy and tokenizers only.

This package's ``__init__`` imports nothing: the runtime must stay importable without torch, and
the exporter needs it. The two entry points are resolved on first use.
"""

from __future__ import annotations

__all__ = ["CodebookRuntime", "export_bundle"]


def __getattr__(name: str):
    if name == "export_bundle":
        from cbexport.bundle import export_bundle

        return export_bundle
    if name == "CodebookRuntime":
        from cbexport.runtime import CodebookRuntime

        return CodebookRuntime
    raise AttributeError(f"module 'cbexport' has no attribute {name!r}")
