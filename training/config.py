"""The recipe of a finetuning run: one dataclass, validated before any work starts.

Saved as ``training_config.json`` beside the model and in every checkpoint, so that ``--resume``
continues a run with exactly the recipe it started with.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from codebook.configuration import CodebookConfig, CodebookOptions
from codebook.text import FORMATS

CONFIG_NAME = "training_config.json"
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")

# Options that change how a run is executed or reported but not what it computes: they may
# differ between a run and its resumption.
RUNTIME_FIELDS = ("resume", "threads", "progress", "push_to_hub", "device", "log_every",
                  "eval_every", "eval_tokens", "checkpoint_every", "keep_checkpoints",
                  "card_notes", "license")


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig(CodebookOptions):
    """Everything a finetuning run depends on. Each field is the ``python -m training finetune``
    option of the same name (``--block-size`` is ``block_size``), described by that command's
    ``--help`` (:func:`training.__main__.add_finetune_options`). The codebook fields (``sites``,
    ``num_codes``, ``k``, ...) and their defaults are
    :class:`codebook.configuration.CodebookOptions`'s."""

    # base and data
    base: str
    data: list[str]
    output: str
    val_data: list[str] = dataclasses.field(default_factory=list)
    val_fraction: float = 0.05
    data_format: str = "auto"
    text_column: str = "text"
    block_size: int = 256

    # codebooks (besides CodebookOptions' fields)
    codebooks: bool = True
    kmeans_init: bool = True
    kmeans_tokens: int = 16384
    kmeans_iters: int = 15
    dead_code_steps: int = 50

    # optimisation
    lr_base: float = 3e-4
    lr_codebook: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    seed: int = 0
    reinit_base: bool = False

    # running and reporting (all but precision are RUNTIME_FIELDS)
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 200
    eval_tokens: int = 32768
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    push_to_hub: str | None = None
    card_notes: str | None = None
    license: str | None = None

    def __post_init__(self):
        self.data = list(self.data)
        self.val_data = list(self.val_data)
        self.sites = list(self.sites)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if not self.base:
            raise ValueError("no base model given: pass --base (Hub id, directory or llama2c:PATH)")
        if not self.output:
            raise ValueError("no output directory given: pass --output DIR")
        if self.data_format not in FORMATS:
            raise ValueError(f"--data-format must be one of {FORMATS}, got {self.data_format!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        positive = ("block_size", "batch_size", "grad_accum", "kmeans_tokens", "kmeans_iters",
                    "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        non_negative = ("dead_code_steps", "warmup_steps", "eval_every", "checkpoint_every",
                        "weight_decay", "grad_clip", "lr_base", "lr_codebook",
                        "reconstruction_weight")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, "
                                 f"got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if not self.val_data and not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.codebooks:
            self.codebook_config()  # validates sites, k, similarity, combine

    def codebook_config(self) -> CodebookConfig:
        return CodebookConfig(**self.codebook_options())

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir or Path(self.output) / "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe_differences(self, other: FinetuneConfig) -> list[str]:
        """Names of the fields (other than runtime ones) whose values differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [name for name in mine if name not in RUNTIME_FIELDS and mine[name] != theirs[name]]

    def command_line(self) -> str:
        """The ``python -m training finetune`` command that runs this recipe."""
        parts = ["python", "-m", "training", "finetune"]
        # The required options (--base, --data, --output) first, the rest in field order.
        required_first = sorted(dataclasses.fields(self), key=lambda f: (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING))
        for f in required_first:
            value = getattr(self, f.name)
            if f.name in RUNTIME_FIELDS or (f.default is not dataclasses.MISSING
                                            and value == f.default):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, list):
                if value != (f.default_factory() if f.default_factory is not dataclasses.MISSING
                             else None):
                    parts += [flag, *map(str, value)]
            elif value is not None:
                parts += [flag, str(value)]
        return shlex.join(parts)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> FinetuneConfig:
        return cls(**json.loads((Path(directory) / CONFIG_NAME).read_text()))
