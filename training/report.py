"""What a run leaves for people: metrics (JSONL), plots (PNG) and the model card (README.md).

The plots need matplotlib, which only the ``app`` extra installs: without it a run finishes
without them (the plot functions return ``False``, and the card lists only the plots present).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from codebook import hub
from training.config import RUNTIME_FIELDS, FinetuneConfig
from training.data import HUB_PREFIX, parse_hub_source

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
USAGE_PLOT = "code_usage.png"
EVAL_FILE = "eval.json"
SUMMARY_FILE = "run_summary.json"
CARD_FILE = hub.CARD_NAME
LIBRARY_NAME = "codebook-features-studio"


class MetricsLog:
    """Append-only JSONL of training records; on resume, records after the checkpoint's step
    are dropped so that the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


NO_MATPLOTLIB_NOTE = ("note: matplotlib is not installed, so the run has no plots ({plots}); "
                      "pip install matplotlib to draw them")


def _pyplot():
    """matplotlib.pyplot (non-interactive), or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(records: list[dict], path: Path) -> bool:
    """Training and validation loss; reconstruction MSE per site when there are codebooks.
    Returns whether the plot was drawn (``False``: no matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return False
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    sites = sorted({name for r in train for name in r.get("reconstruction_mse", {})})
    fig, axes = plt.subplots(1, 2 if sites else 1, figsize=(12 if sites else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1,
            label="train (mean over each log interval)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="language-model loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if sites:
        ax = axes[0, 1]
        for name in sites:
            points = [(r["step"], r["reconstruction_mse"][name]) for r in train
                      if name in r.get("reconstruction_mse", {})]
            ax.plot(*zip(*points, strict=True), label=name, lw=1)
        ax.set(xlabel="step", ylabel="MSE", yscale="log", title="codebook reconstruction error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_code_usage(counts: dict[str, torch.Tensor], path: Path) -> bool:
    """Per site, a histogram over all its codes of how often each was chosen in training.
    Returns whether the plot was drawn (``False``: no matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return False
    cols = min(len(counts), 4)
    rows = math.ceil(len(counts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, site_counts) in zip(axes.flat, counts.items(), strict=False):
        flat = site_counts.flatten().double()
        dead = float((flat == 0).double().mean())
        ax.hist(torch.log10(flat + 1).numpy(), bins=40, color="tab:blue")
        ax.set_title(f"{name} (dead {dead:.1%})", fontsize=9)
        ax.set_xlabel("log10(times chosen + 1)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(counts):]:
        ax.axis("off")
    fig.suptitle("code usage in training, per site (all codebooks of the site)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} minutes" if seconds >= 60 else f"{seconds:.1f} s"


def _lm_row(label: str, m: dict) -> str:
    return f"| {label} | {m['loss']:.4f} | {m['bits_per_byte']:.4f} | {m['accuracy']:.4f} |"


def write_model_card(directory: Path, notes_file: str | None = None, **metadata) -> None:
    """(Re)write ``README.md`` of a finished run from its saved recipe, summary and evaluation,
    with the Markdown of ``notes_file`` (e.g. measurements made after training) appended.

    The front matter is :func:`card_metadata`'s, its licence, when the recipe names none, the
    base model's (:func:`base_license`); ``metadata`` (``ModelCardData`` fields) replaces any of
    it, e.g. the shipped default model's licence and data set."""
    config = FinetuneConfig.load(directory)
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    evaluation = json.loads((directory / EVAL_FILE).read_text())
    notes = Path(notes_file).read_text() if notes_file else ""
    plots = [name for name in (LOSS_PLOT, USAGE_PLOT) if (directory / name).is_file()]
    front = card_metadata(config)
    if front["license"] is None and not config.reinit_base and "license" not in metadata:
        front["license"] = base_license(config.base)
    (directory / CARD_FILE).write_text(model_card(config, summary, evaluation, notes, plots,
                                                  front | metadata))


def card_metadata(config: FinetuneConfig) -> dict:
    """The card's front matter, as ``huggingface_hub.ModelCardData`` fields: ``license`` from
    ``--license`` (else ``None``), ``base_model`` the base's Hub repo id (``None`` for a local or
    llama2.c base, and for one re-initialised: trained from scratch), ``datasets`` the Hub data
    sets of ``--data`` and ``--val-data``, and the tags."""
    tags = ["codebook-features", "interpretability"]
    if any("tinystories" in d.lower() for d in config.data):
        tags.append("tinystories")
    datasets = [hub.split_revision(parse_hub_source(d[len(HUB_PREFIX):])[0])[0]
                for d in (*config.data, *config.val_data) if d.startswith(HUB_PREFIX)]
    return {"license": config.license,
            "base_model": None if config.reinit_base else hub.hub_repo_id(config.base),
            "datasets": list(dict.fromkeys(datasets)) or None, "library_name": LIBRARY_NAME,
            "tags": tags, "pipeline_tag": "text-generation"}


def base_license(base: str) -> str | None:
    """The licence in the card of the base model: a local directory's ``README.md``, or a Hub
    repo's (fetched alone; with ``HF_HUB_OFFLINE=1`` only from the cache). ``None`` when there
    is no card, it names no licence, or the Hub cannot be reached."""
    path = Path(base).expanduser()
    if path.is_dir():
        return hub.card_metadata(path).get("license")
    repo_id = hub.hub_repo_id(base)
    if repo_id is None:
        return None
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        card = hf_hub_download(repo_id, hub.CARD_NAME, revision=hub.split_revision(base)[1])
        return ModelCard.load(card, ignore_metadata_errors=True).data.license
    except Exception:  # no card, no network, no access: the card names no licence
        return None


def model_card(config: FinetuneConfig, summary: dict, evaluation: dict, notes: str = "",
               plots: list[str] | None = None, metadata: dict | None = None) -> str:
    """The README.md of a trained model: base, data, recipe, metrics, how to reproduce.
    ``plots``: the plot files to list (default: the loss plot, and code usage with codebooks);
    ``metadata``: the front matter (default: :func:`card_metadata`)."""
    has_codebooks = "sites" in evaluation
    if metadata is None:
        metadata = card_metadata(config)
    title = "Codebook model" if has_codebooks else "Finetuned model (no codebooks)"
    lines = [f"# {title}: {Path(config.output).name}", ""]
    if has_codebooks:
        lines += [
            "A causal language model with **codebook features** (Tamkin, Taufeeque & Goodman "
            "2023): at each codebook site every activation is replaced by the "
            f"{config.combine} of its top-{config.k} most {config.similarity}-similar codes out "
            f"of {config.num_codes} per codebook. Load it with "
            "`CodebookModel.from_pretrained(...)`.", ""]
    data = summary["data"]
    lines += [
        "## Base model", "",
        f"`{config.base}`" + (" re-initialised (trained from scratch)" if config.reinit_base
                               else ""),
        f"({summary['base_parameters']:,} parameters).", "",
        "## Data", "",
        "Training: " + ", ".join(f"`{d}`" for d in config.data) + ".",
        (f"Validation: {', '.join(f'`{d}`' for d in config.val_data)}." if config.val_data else
         f"Validation: {config.val_fraction:.0%} of the documents, held out whole (chosen by a "
         f"seeded hash of their text; seed {config.seed})."),
        f"{data['train_documents']:,} training documents ({data['train_tokens']:,} tokens, "
        f"{data['train_blocks']:,} blocks of {config.block_size}); {data['val_documents']:,} "
        f"validation documents ({data['val_tokens']:,} tokens, {data['val_bytes']:,} bytes). "
        "Exact duplicates are removed before the split.", "",
        "## Recipe", "",
        f"{summary['steps']} optimizer steps of {summary['tokens_per_step']:,} tokens "
        f"({summary['epochs']:.2f} epochs) in {_duration(summary['train_seconds'])} "
        f"on {summary['device']} ({summary['processes']} process(es), "
        f"{summary['tokens_per_second']:,.0f} tokens/s).", "",
        "| option | value |", "|---|---|",
    ]
    skip = {"base", "data", "val_data", "output", "checkpoint_dir", *RUNTIME_FIELDS}
    lines += [f"| `{k}` | `{v}` |" for k, v in config.to_dict().items() if k not in skip]
    lines += ["", "Reproduce:", "", "```", summary["command"], "```", "",
              "## Evaluation on the held-out validation text", "",
              "| | loss (nats/token) | bits per byte | next-token accuracy |", "|---|---|---|---|"]
    if has_codebooks:
        lines.append(_lm_row("with codebooks", evaluation))
        lines.append(_lm_row("codebooks switched off", evaluation["without_codebooks"]))
    else:
        lines.append(_lm_row("model", evaluation))
    if has_codebooks:
        lines += ["", "| site | MSE | FVU | dead codes (mean / worst codebook) | "
                      "usage entropy (bits) |", "|---|---|---|---|---|"]
        for name, s in evaluation["sites"].items():
            lines.append(f"| {name} | {s['mse']:.4g} | {s['fvu']:.3f} | "
                         f"{s['dead_fraction']:.1%} / {s['dead_fraction_max']:.1%} | "
                         f"{s['usage_entropy_bits']:.2f} of {s['max_entropy_bits']:.0f} |")
        lines += ["", "Dead codes: never chosen on the validation text. FVU: fraction of the "
                  "site input's variance the codebook output leaves unexplained."]
    lines += ["", f"Evaluated with blocks of {evaluation['block_size']} tokens. Bits per byte "
              "= summed loss in bits / UTF-8 bytes of the documents.", ""]
    if notes:
        lines += [notes.strip(), ""]
    if plots is None:
        plots = [LOSS_PLOT, USAGE_PLOT] if has_codebooks else [LOSS_PLOT]
    files = [f"`{METRICS_FILE}` (training log)", f"`{EVAL_FILE}` (the evaluation above)",
             *(f"`{name}`" for name in plots), "`training_config.json` (the recipe)",
             f"`{SUMMARY_FILE}`"]
    lines += ["## Files", "", ", ".join(files) + ".", ""]
    return hub.model_card("\n".join(lines), **metadata)
