"""What a codebook model is: which sites of which layers carry codebooks, and how they snap."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from codebook.ops import COMBINES, DEFAULT_COMBINE, DEFAULT_SIMILARITY, SIMILARITIES

CONFIG_NAME = "codebook_config.json"

# Codes per codebook (C) and codes active at once (k), unless a config says otherwise; the
# training recipe's defaults too.
DEFAULT_NUM_CODES = 1024
DEFAULT_K = 8

# Where a codebook can sit in a transformer block.
#   attn_heads: each attention head's output, just before the attention output projection
#               (one codebook per head: the paper's main setting);
#   attn_out:   the attention output (after the output projection);
#   mlp_out:    the MLP output;
#   block_out:  the block's output (the residual stream).
SITES = ("attn_heads", "attn_out", "mlp_out", "block_out")


@dataclasses.dataclass(kw_only=True)
class CodebookOptions:
    """The codebook choices that a training recipe names too (``training.config.FinetuneConfig``
    has these fields, with these defaults, and makes its model's :class:`CodebookConfig` of
    them); see :class:`CodebookConfig` for their meaning."""

    sites: list[str] = dataclasses.field(default_factory=lambda: ["attn_heads"])
    layers: list[int] | None = None
    num_codes: int = DEFAULT_NUM_CODES
    k: int = DEFAULT_K
    similarity: str = DEFAULT_SIMILARITY
    combine: str = DEFAULT_COMBINE
    layer_norm: bool = False
    reconstruction_weight: float = 1.0

    def codebook_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(CodebookOptions)}


@dataclasses.dataclass(kw_only=True)
class CodebookConfig(CodebookOptions):
    """Codebook hyper-parameters, saved as ``codebook_config.json`` beside the base model.

    ``layers`` lists the transformer layers that get codebooks (``None``: every layer).
    ``num_codes`` is the number of codes per codebook (C) and ``k`` how many are active at once.
    ``layer_norm`` LayerNorms each group's input before snapping (as the original library does).
    ``reconstruction_weight`` is the paper's lambda for the term pulling codes toward inputs.
    ``per_site`` overrides ``num_codes`` and/or ``k`` at some sites (``{"mlp_out": {"num_codes":
    48, "k": 3}}``), as the original library allows; :meth:`num_codes_at` and :meth:`k_at` give
    a site's values. It is saved only when not empty.
    """

    chunk_size: int = 0
    per_site: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

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
        self._check_per_site()
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got "
                             f"{self.similarity!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")

    def _check_per_site(self) -> None:
        if not isinstance(self.per_site, dict):
            raise ValueError(f"per_site must map sites to {{'num_codes': C, 'k': k}}, got "
                             f"{self.per_site!r}")
        self.per_site = {site: dict(values) for site, values in self.per_site.items()}
        for site, values in self.per_site.items():
            if site not in self.sites:
                raise ValueError(f"per_site names {site!r}, which is not one of the sites "
                                 f"{self.sites}")
            unknown = sorted(set(values) - {"num_codes", "k"})
            if unknown:
                raise ValueError(f"per_site[{site!r}] has unknown keys {unknown}; known: "
                                 "['k', 'num_codes']")
            for key, value in values.items():
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"per_site[{site!r}][{key!r}] must be an integer, got "
                                     f"{value!r}")
            if self.num_codes_at(site) < 1:
                raise ValueError(f"num_codes at {site} must be positive, got "
                                 f"{self.num_codes_at(site)}")
            if not 1 <= self.k_at(site) <= self.num_codes_at(site):
                raise ValueError(f"k at {site} must be between 1 and its num_codes "
                                 f"({self.num_codes_at(site)}), got {self.k_at(site)}")

    def num_codes_at(self, site: str) -> int:
        """The number of codes per codebook at ``site``."""
        return self.per_site.get(site, {}).get("num_codes", self.num_codes)

    def k_at(self, site: str) -> int:
        """How many codes are active at once at ``site``."""
        return self.per_site.get(site, {}).get("k", self.k)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if not data["per_site"]:
            del data["per_site"]  # configs without it stay as they were
        return data

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
