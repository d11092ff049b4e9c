"""``CodebookLayer``: the codebooks of one site (one per group, e.g. per attention head)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codebook.ops import DEFAULT_COMBINE, DEFAULT_SIMILARITY, topk_codebook

POSITIONS = ("all", "prompt", "generated")


@dataclasses.dataclass
class LayerSteering:
    """Steering of one site: score ``bias`` and output ``scale`` per code (``[g, C]``), and which
    token positions they apply to (``"prompt"``: positions before ``prompt_length``)."""

    bias: Tensor
    scale: Tensor | None = None
    positions: str = "all"
    prompt_length: int | None = None


class CodebookLayer(nn.Module):
    """Snaps ``[..., groups * dim]`` activations to the top-``k`` codes of each group's codebook.

    Holds, besides the codebook parameter ``[groups, num_codes, dim]``: an optional per-group input
    LayerNorm, code-usage counters (``code_counts``, updated in training mode or when
    ``track_usage`` is set), the steering applied at this site, and an optional capture of the
    chosen codes (``capture``: a list that every forward appends its ``[..., groups, k]`` ids to).
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        num_codes: int,
        k: int,
        similarity: str = DEFAULT_SIMILARITY,
        combine: str = DEFAULT_COMBINE,
        layer_norm: bool = False,
        reconstruction_weight: float = 1.0,
        chunk_size: int = 0,
    ):
        super().__init__()
        if not 1 <= k <= num_codes:
            raise ValueError(f"k must be between 1 and num_codes ({num_codes}), got {k}")
        self.groups, self.dim, self.num_codes, self.k = groups, dim, num_codes, k
        self.similarity, self.combine = similarity, combine
        self.reconstruction_weight = reconstruction_weight
        self.chunk_size = chunk_size
        self.codebook = nn.Parameter(torch.randn(groups, num_codes, dim) / math.sqrt(dim))
        if layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(groups, dim))
            self.ln_bias = nn.Parameter(torch.zeros(groups, dim))
        else:
            self.ln_weight = self.ln_bias = None
        self.register_buffer("code_counts", torch.zeros(groups, num_codes, dtype=torch.long))
        self.enabled = True
        self.track_usage = False
        self.steering: LayerSteering | None = None
        self.capture: list[Tensor] | None = None
        # Absolute positions of the tokens in the current forward call, set by the model.
        self.positions: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, dim={self.dim}, num_codes={self.num_codes}, k={self.k}, "
            f"similarity={self.similarity}, combine={self.combine}, "
            f"layer_norm={self.ln_weight is not None}"
        )

    def normalize(self, h: Tensor) -> Tensor:
        """The input LayerNorm (identity when the layer has none); ``h`` is ``[..., g, d]``."""
        if self.ln_weight is None:
            return h
        return F.layer_norm(h, (self.dim,)) * self.ln_weight + self.ln_bias

    def snap(self, h: Tensor, bias: Tensor | None = None, scale: Tensor | None = None):
        """The op on already-normalised ``[..., g, d]`` input: returns ``(out, indices)``."""
        return topk_codebook(
            h, self.codebook, self.k, bias, scale, self.similarity, self.combine,
            self.reconstruction_weight, self.chunk_size,
        )

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = self.normalize(x.reshape(*shape[:-1], self.groups, self.dim))
        out, indices = self._snap_steered(h)
        if self.training or self.track_usage:
            self._count(indices)
        if self.capture is not None:
            self.capture.append(indices.detach())
        return out.reshape(shape)

    # Hooks on the base model's modules. Bound methods (not closures), so that a deep copy of
    # the model hooks into its own copies of the codebook layers.
    def input_hook(self, module: nn.Module, args: tuple):
        if not self.enabled:
            return None
        return (self(args[0]),) + tuple(args[1:])

    def output_hook(self, module: nn.Module, args: tuple, output):
        if not self.enabled:
            return None
        if isinstance(output, tuple):
            return (self(output[0]),) + tuple(output[1:])
        return self(output)

    def _snap_steered(self, h: Tensor):
        steering = self.steering
        if steering is None:
            return self.snap(h)
        mask = self._steered_positions(steering, h.shape[-3])
        if mask is None:
            return self.snap(h, steering.bias, steering.scale)
        if not mask.any():
            return self.snap(h)
        # Some positions of this call are steered and some are not (a whole sequence processed
        # at once, without KV cache): snap both ways and pick per position.
        out_s, idx_s = self.snap(h, steering.bias, steering.scale)
        out_u, idx_u = self.snap(h)
        token_mask = mask.view(-1, 1, 1)
        return torch.where(token_mask, out_s, out_u), torch.where(token_mask, idx_s, idx_u)

    def _steered_positions(self, steering: LayerSteering, seq_len: int) -> Tensor | None:
        """A ``[seq]`` bool mask of steered positions, or ``None`` when all of them are."""
        if steering.positions == "all":
            return None
        if self.positions is None or steering.prompt_length is None:
            raise RuntimeError(
                f"steering positions={steering.positions!r} needs the prompt length and token "
                "positions; steer through CodebookModel.generate or CodebookModel.steer"
            )
        in_prompt = self.positions[-seq_len:] < steering.prompt_length
        mask = in_prompt if steering.positions == "prompt" else ~in_prompt
        return None if bool(mask.all()) else mask

    @torch.no_grad()
    def _count(self, indices: Tensor) -> None:
        offsets = torch.arange(self.groups, device=indices.device)[:, None] * self.num_codes
        flat = (indices.reshape(-1, self.groups, self.k) + offsets).reshape(-1)
        self.code_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
