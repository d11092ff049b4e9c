"""Codebook features: sparse, discrete bottlenecks in Hugging Face causal LMs.

Tamkin, Taufeeque & Goodman, *Codebook Features: Sparse and Discrete Interpretability for Neural
Networks* (2023). Attach codebooks with :func:`attach_codebooks`, load with
:meth:`CodebookModel.from_pretrained`, steer with :class:`Steering`.
"""

from codebook.configuration import SITES, CodebookConfig
from codebook.layer import CodebookLayer
from codebook.modeling import CodebookModel, attach_codebooks
from codebook.ops import topk_codebook
from codebook.steering import CodeRef, Steering, parse_codes

__all__ = [
    "SITES",
    "CodeRef",
    "CodebookConfig",
    "CodebookLayer",
    "CodebookModel",
    "Steering",
    "attach_codebooks",
    "parse_codes",
    "topk_codebook",
]
