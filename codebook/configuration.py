"""What a codebook model is: which sites of which layers carry codebooks, and how they snap."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from codebook.ops import COMBINES, SIMILARITIES

CONFIG_NAME = "codebook_config.json"

# Where a codebook can sit in a transformer block.
#   attn_heads: each attention head's output, just before the attention output projection
#               (one codebook per head: the paper's main setting);
#   attn_out:   the attention output (after the output projection);
#   mlp_out:    the MLP output;
#   block_out:  the block's output (the residual stream).
SITES = ("attn_heads", "attn_out", "mlp_out", "block_out")


@dataclasses.dataclass
class CodebookConfig:
    """Codebook hyper-parameters, saved as ``codebook_config.json`` beside the base model.

    ``layers`` lists the transformer layers that get codebooks (``None``: every layer).
    ``num_codes`` is the number of codes per codebook (C) and ``k`` how many are active at once.
    ``layer_norm`` LayerNorms each group's input before snapping (as the original library does).
    ``reconstruction_weight`` is the paper's lambda for the term pulling codes toward inputs.
    """

    sites: list[str] = dataclasses.field(default_factory=lambda: ["attn_heads"])
    layers: list[int] | None = None
    num_codes: int = 1024
    k: int = 8
    similarity: str = "cosine"
    combine: str = "sum"
    layer_norm: bool = False
    reconstruction_weight: float = 1.0
    chunk_size: int = 0

    def __post_init__(self):
        self.sites = list(self.sites)
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise ValueError(
                f"unknown codebook site(s) {unknown or self.sites}; choose from {SITES}"
            )
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
        if self.num_codes < 1:
            raise ValueError(f"num_codes must be positive, got {self.num_codes}")
        if not 1 <= self.k <= self.num_codes:
            raise ValueError(
                f"k must be between 1 and num_codes ({self.num_codes}), got {self.k}"
            )
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CodebookConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown codebook config keys {unknown}; known: {sorted(fields)}")
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> CodebookConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{directory} is not a codebook model: it has no {CONFIG_NAME}"
            ) from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)
