"""The recipe of a finetuning run: one dataclass, validated before any work starts.

Saved as ``training_config.json`` beside the model and in every checkpoint, so that ``--resume``
continues a run with exactly the recipe it started with.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from codebook import SITES, CodebookConfig
from codebook.configuration import DEFAULT_K, DEFAULT_NUM_CODES
from codebook.ops import COMBINES, DEFAULT_COMBINE, DEFAULT_SIMILARITY, SIMILARITIES
from codebook.text import FORMATS

CONFIG_NAME = "training_config.json"
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")

# Options that change how a run is executed or reported but not what it computes: they may
# differ between a run and its resumption.
RUNTIME_FIELDS = ("resume", "threads", "progress", "push_to_hub", "device", "log_every",
                  "eval_every", "eval_tokens", "checkpoint_every", "keep_checkpoints",
                  "card_notes", "license")


def option(default=dataclasses.MISSING, help: str = "", factory: bool = False):
    """A config field whose ``help`` is also its command-line help."""
    if factory:
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class FinetuneConfig:
    """Everything a finetuning run depends on (each field's help is its CLI help)."""

    base: str = option(help="base model: Hub repo id, local HF directory or llama2c:PATH.bin")
    data: list[str] = option(help="text files, folders of .txt files, or Hub datasets: "
                             "hf:OWNER/NAME[@REV][:SPLIT or FILE-GLOB]")
    output: str = option(help="directory for the final model, card, metrics and plots")
    val_data: list[str] = option(list, "validation text (default: held out from --data)",
                                 factory=True)
    val_fraction: float = option(0.05, "fraction of the documents held out for validation")
    data_format: str = option("auto", f"how files split into documents: {', '.join(FORMATS)}")
    text_column: str = option("text", "text column of a Hub dataset")
    block_size: int = option(256, "tokens per training sequence")

    codebooks: bool = option(True, "attach codebooks (--no-codebooks: finetune the plain base, "
                                   "the baseline)")
    sites: list[str] = option(lambda: ["attn_heads"], f"codebook sites: {', '.join(SITES)}",
                              factory=True)
    layers: list[int] | None = option(None, "layers with codebooks (default: all)")
    num_codes: int = option(DEFAULT_NUM_CODES, "codes per codebook")
    k: int = option(DEFAULT_K, "codes active at once per codebook")
    similarity: str = option(DEFAULT_SIMILARITY, f"code similarity: {', '.join(SIMILARITIES)}")
    combine: str = option(DEFAULT_COMBINE, f"how the k codes combine: {', '.join(COMBINES)}")
    layer_norm: bool = option(False, "LayerNorm each codebook's input")
    reconstruction_weight: float = option(1.0, "lambda of the term pulling codes to inputs")
    kmeans_init: bool = option(True, "initialise codes by k-means of the base's activations")
    kmeans_tokens: int = option(16384, "training tokens the k-means sees")
    kmeans_iters: int = option(15, "k-means iterations")
    dead_code_steps: int = option(50, "re-seed codes unused for this many steps (0: never)")

    lr_base: float = option(3e-4, "peak learning rate of the base model's weights")
    lr_codebook: float = option(1e-3, "peak learning rate of the codebooks")
    weight_decay: float = option(0.01, "AdamW weight decay of base matrices (not codes, norms)")
    warmup_steps: int = option(50, "linear warmup steps")
    schedule: str = option("cosine", f"decay after warmup: {', '.join(SCHEDULES)}")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    grad_clip: float = option(1.0, "gradient-norm clipping (0: none)")
    batch_size: int = option(16, "sequences per process per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    max_steps: int | None = option(None, "optimizer steps (default: what --epochs needs)")
    epochs: float = option(1.0, "passes over the training blocks (if --max-steps is not given)")
    seed: int = option(0, "seed of the split, data order, initialisation and dropout")
    reinit_base: bool = option(False, "start from random weights of the base's architecture")

    precision: str = option("auto", "auto: bf16 autocast on CUDA and CPUs with native bf16")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda")
    threads: int | None = option(None, "CPU threads per process (default: cores / processes)")
    log_every: int = option(10, "steps between log records")
    eval_every: int = option(200, "steps between validation losses (0: only at the end)")
    eval_tokens: int = option(32768, "validation tokens of a periodic evaluation")
    checkpoint_every: int = option(200, "steps between checkpoints (0: none)")
    keep_checkpoints: int = option(2, "checkpoints kept")
    checkpoint_dir: str | None = option(None, "where checkpoints go (default: OUTPUT/checkpoints)")
    resume: bool = option(False, "continue the run in --output from its latest checkpoint")
    progress: bool = option(True, "show a progress bar")
    push_to_hub: str | None = option(None, "Hub repo id to upload the final model to")
    card_notes: str | None = option(None, "a Markdown file appended to the model card")
    license: str | None = option(None, "licence in the model card's metadata, e.g. mit "
                                       "(default: the base model card's)")

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
        return CodebookConfig(
            sites=self.sites, layers=self.layers, num_codes=self.num_codes, k=self.k,
            similarity=self.similarity, combine=self.combine, layer_norm=self.layer_norm,
            reconstruction_weight=self.reconstruction_weight,
        )

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
        for f in dataclasses.fields(self):
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
