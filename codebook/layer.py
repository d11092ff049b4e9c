"""``CodebookLayer``: the codebooks of one site (one per group, e.g. per attention head)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codebook.ops import DEFAULT_COMBINE, DEFAULT_SIMILARITY, topk_codebook
from codebook.steering_spec import steers


@dataclasses.dataclass
class LayerSteering:
    """Steering of one site: score ``bias`` and output ``scale`` per code (``[g, C]``; no
    ``scale``: all ones), and which token positions they apply to (``"all"``, ``"prompt"`` or
    ``"generated"``, see :class:`TokenPositions`)."""

    bias: Tensor
    scale: Tensor | None = None
    positions: str = "all"


@dataclasses.dataclass
class TokenPositions:
    """Where the tokens of a model's current forward call sit, for position-dependent steering:
    ``current``, their absolute positions ``[seq]``, and ``prompt_length`` (positions before it
    are the prompt; ``None`` until the first call, whose tokens are then the prompt). One per
    steering block, shared by its model's layers and updated by the model before every call."""

    prompt_length: int | None = None
    current: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class SiteRun:
    """What one codebook layer does in the forward calls of one context (a thread, an asyncio
    task): ``steering`` for every batch row, or a tuple with one per row (``None``: not steered);
    the ``tokens`` that position-dependent steering reads; ``capture``, a list that every forward
    appends its chosen code ids ``[..., groups, k]`` to."""

    steering: LayerSteering | tuple[LayerSteering | None, ...] | None = None
    tokens: TokenPositions | None = None
    capture: list[Tensor] | None = None


# The runs of the current context, by layer. Steering and capture live here rather than on the
# layers, so that threads running one model at the same time each see only their own.
_RUNS: contextvars.ContextVar[Mapping[CodebookLayer, SiteRun]] = contextvars.ContextVar(
    "codebook_runs", default=MappingProxyType({}))


def current_runs() -> Mapping[CodebookLayer, SiteRun]:
    """The :class:`SiteRun` of every layer that has one in the current context."""
    return _RUNS.get()


@contextlib.contextmanager
def running(runs: Mapping[CodebookLayer, SiteRun]) -> Iterator[None]:
    """Run the layers of ``runs`` so inside the block, in the current context only (other threads
    are unaffected); the layers' previous runs return afterwards. The block must end in the
    context it began in (not across a generator's ``yield``s driven from different threads)."""
    token = _RUNS.set(MappingProxyType({**_RUNS.get(), **runs}))
    try:
        yield
    finally:
        _RUNS.reset(token)


class CodebookLayer(nn.Module):
    """Snaps ``[..., groups * dim]`` activations to the top-``k`` codes of each group's codebook.

    Holds, besides the codebook parameter ``[groups, num_codes, dim]``: an optional per-group input
    LayerNorm and code-usage counters (``code_counts``, updated in training mode or when
    ``track_usage`` is set). Steering and code capture are not held here but per call: the
    forward reads this layer's :class:`SiteRun` in the current context (see :func:`running`).
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
        run = _RUNS.get().get(self)
        out, indices = self.snap(h) if run is None else self._snap_run(h, run)
        if self.training or self.track_usage:
            self._count(indices)
        if run is not None and run.capture is not None:
            run.capture.append(indices.detach())
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

    def _snap_run(self, h: Tensor, run: SiteRun):
        if isinstance(run.steering, tuple):
            return self._snap_rows(h, run.steering, run.tokens)
        return self._snap_steered(h, run.steering, run.tokens)

    def _snap_rows(self, h: Tensor, rows: tuple[LayerSteering | None, ...],
                   tokens: TokenPositions | None):
        """Each row of the ``[batch, seq, g, d]`` input with its own steering: the rows that share
        one are snapped together, and the results are put back in row order."""
        if len(rows) != h.shape[0]:
            raise ValueError(f"{len(rows)} per-row steerings for a batch of {h.shape[0]} rows")
        rows_of: dict[int, list[int]] = {}
        for row, steering in enumerate(rows):
            rows_of.setdefault(id(steering), []).append(row)
        if len(rows_of) == 1:
            return self._snap_steered(h, rows[0], tokens)
        outs, ids, order = [], [], []
        for members in rows_of.values():
            index = torch.tensor(members, device=h.device)
            out, indices = self._snap_steered(h.index_select(0, index), rows[members[0]], tokens)
            outs.append(out)
            ids.append(indices)
            order.append(index)
        back = torch.argsort(torch.cat(order))
        return torch.cat(outs).index_select(0, back), torch.cat(ids).index_select(0, back)

    def _snap_steered(self, h: Tensor, steering: LayerSteering | None,
                      tokens: TokenPositions | None):
        if steering is None:
            return self.snap(h)
        mask = self._steered_positions(steering, tokens, h.shape[-3])
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

    @staticmethod
    def _steered_positions(steering: LayerSteering, tokens: TokenPositions | None,
                           seq_len: int) -> Tensor | None:
        """A ``[seq]`` bool mask of steered positions, or ``None`` when all of them are."""
        if steering.positions == "all":
            return None
        if tokens is None or tokens.current is None or tokens.prompt_length is None:
            raise RuntimeError(
                f"steering positions={steering.positions!r} needs the prompt length and token "
                "positions; steer through CodebookModel.generate or CodebookModel.steer"
            )
        in_prompt = tokens.current[-seq_len:] < tokens.prompt_length
        mask = in_prompt if steers(steering.positions, in_prompt=True) else ~in_prompt
        return None if bool(mask.all()) else mask

    @torch.no_grad()
    def _count(self, indices: Tensor) -> None:
        offsets = torch.arange(self.groups, device=indices.device)[:, None] * self.num_codes
        flat = (indices.reshape(-1, self.groups, self.k) + offsets).reshape(-1)
        self.code_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
