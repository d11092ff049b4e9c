"""Codebook features: sparse, discrete bottlenecks in Hugging Face causal LMs.

Tamkin, Taufeeque & Goodman, *Codebook Features: Sparse and Discrete Interpretability for Neural
Networks* (2023). Attach codebooks with :func:`attach_codebooks`, load with
:meth:`CodebookModel.from_pretrained`, steer with :class:`Steering`.
"""

from __future__ import annotations

import importlib

# Each public name and the module that defines it, imported on first use: the torch-free modules
# (codebook.steering_spec, which the exported models' runtime imports) must be importable without
# this package pulling in torch.
_EXPORTS = {
    "SITES": "codebook.configuration",
    "CodebookConfig": "codebook.configuration",
    "CodebookLayer": "codebook.layer",
    "CodebookModel": "codebook.modeling",
    "attach_codebooks": "codebook.modeling",
    "topk_codebook": "codebook.ops",
    "CodeRef": "codebook.steering_spec",
    "Steering": "codebook.steering_spec",
    "parse_codes": "codebook.steering_spec",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'codebook' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
