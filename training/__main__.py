"""Command line: ``python -m training finetune | pretrain | synthesize | evaluate | ...``.

Multi-process (DDP) finetuning runs under torchrun, e.g.
``torchrun --nproc_per_node 4 -m training finetune --base gpt2 --data stories.txt --output out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from training import build
from training.config import CONFIG_NAME, FinetuneConfig
from training.presets import PRESETS, preset
from training.pretrain import FAMILIES, Architecture


def add_finetune_options(parser: argparse.ArgumentParser, codebooks: bool = True) -> None:
    """The options of a recipe, one per :class:`~training.config.FinetuneConfig` field of the same
    name. They have no defaults here: an option not given stays absent from the namespace, so that
    a preset, a saved recipe (``--resume``) and then the config's own defaults supply it.
    ``codebooks=False`` (pretrain) leaves out the base and codebook options."""
    from codebook import SITES
    from codebook.ops import COMBINES, SIMILARITIES
    from codebook.text import FORMATS
    from training.config import SCHEDULES

    def group(title: str):
        return parser.add_argument_group(title, argument_default=argparse.SUPPRESS)

    flag = argparse.BooleanOptionalAction
    data = group("base and data")
    if codebooks:
        data.add_argument("--base",
                          help="base model: Hub repo id, local HF directory or llama2c:PATH.bin")
    data.add_argument("--data", nargs="+", help="text files, folders of .txt files, or Hub "
                      "datasets: hf:OWNER/NAME[@REV][:SPLIT or FILE-GLOB]")
    data.add_argument("--output", help="directory for the final model, card, metrics and plots")
    data.add_argument("--val-data", nargs="+",
                      help="validation text (default: held out from --data)")
    data.add_argument("--val-fraction", type=float,
                      help="fraction of the documents held out for validation")
    data.add_argument("--data-format",
                      help=f"how files split into documents: {', '.join(FORMATS)}")
    data.add_argument("--text-column", help="text column of a Hub dataset")
    data.add_argument("--block-size", type=int, help="tokens per training sequence")

    if codebooks:
        cb = group("codebooks")
        cb.add_argument("--codebooks", action=flag, help="attach codebooks (--no-codebooks: "
                        "finetune the plain base, the baseline)")
        cb.add_argument("--sites", nargs="+", help=f"codebook sites: {', '.join(SITES)}")
        cb.add_argument("--layers", nargs="+", type=int,
                        help="layers with codebooks (default: all)")
        cb.add_argument("--num-codes", type=int, help="codes per codebook")
        cb.add_argument("--k", type=int, help="codes active at once per codebook")
        cb.add_argument("--similarity", help=f"code similarity: {', '.join(SIMILARITIES)}")
        cb.add_argument("--combine", help=f"how the k codes combine: {', '.join(COMBINES)}")
        cb.add_argument("--layer-norm", action=flag, help="LayerNorm each codebook's input")
        cb.add_argument("--reconstruction-weight", type=float,
                        help="lambda of the term pulling codes to inputs")
        cb.add_argument("--kmeans-init", action=flag,
                        help="initialise codes by k-means of the base's activations")
        cb.add_argument("--kmeans-tokens", type=int, help="training tokens the k-means sees")
        cb.add_argument("--kmeans-iters", type=int, help="k-means iterations")
        cb.add_argument("--dead-code-steps", type=int,
                        help="re-seed codes unused for this many steps (0: never)")

    opt = group("optimisation")
    opt.add_argument("--lr-base", type=float,
                     help="peak learning rate of the base model's weights")
    if codebooks:
        opt.add_argument("--lr-codebook", type=float,
                         help="peak learning rate of the codebooks")
    opt.add_argument("--weight-decay", type=float,
                     help="AdamW weight decay of base matrices (not codes, norms)")
    opt.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    opt.add_argument("--schedule", help=f"decay after warmup: {', '.join(SCHEDULES)}")
    opt.add_argument("--min-lr-ratio", type=float,
                     help="final learning rate as a fraction of the peak")
    opt.add_argument("--grad-clip", type=float, help="gradient-norm clipping (0: none)")
    opt.add_argument("--batch-size", type=int, help="sequences per process per micro-step")
    opt.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    opt.add_argument("--max-steps", type=int,
                     help="optimizer steps (default: what --epochs needs)")
    opt.add_argument("--epochs", type=float,
                     help="passes over the training blocks (if --max-steps is not given)")
    opt.add_argument("--seed", type=int,
                     help="seed of the split, data order, initialisation and dropout")
    if codebooks:
        opt.add_argument("--reinit-base", action=flag,
                         help="start from random weights of the base's architecture")

    run = group("running and reporting")
    run.add_argument("--precision",
                     help="auto: bf16 autocast on CUDA and CPUs with native bf16")
    run.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    run.add_argument("--threads", type=int,
                     help="CPU threads per process (default: cores / processes)")
    run.add_argument("--log-every", type=int, help="steps between log records")
    run.add_argument("--eval-every", type=int,
                     help="steps between validation losses (0: only at the end)")
    run.add_argument("--eval-tokens", type=int,
                     help="validation tokens of a periodic evaluation")
    run.add_argument("--checkpoint-every", type=int,
                     help="steps between checkpoints (0: none)")
    run.add_argument("--keep-checkpoints", type=int, help="checkpoints kept")
    run.add_argument("--checkpoint-dir",
                     help="where checkpoints go (default: OUTPUT/checkpoints)")
    run.add_argument("--resume", action=flag,
                     help="continue the run in --output from its latest checkpoint")
    run.add_argument("--progress", action=flag, help="show a progress bar")
    run.add_argument("--push-to-hub", help="Hub repo id to upload the final model to")
    run.add_argument("--card-notes", help="a Markdown file appended to the model card")
    run.add_argument("--license", help="licence in the model card's metadata, e.g. mit "
                     "(default: the base model card's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    finetune = commands.add_parser(
        "finetune", help="finetune a base model with codebooks",
        description="Finetune a base model with codebooks. Options not given come from "
                    "--preset, or with --resume from the run's saved recipe, or defaults.")
    finetune.add_argument("--preset", choices=sorted(PRESETS),
                          help="a named recipe (stories260k: the first releases' default model)")
    add_finetune_options(finetune)

    pretrain = commands.add_parser(
        "pretrain", help="train a base model from scratch (no codebooks)",
        description="Train a freshly initialised base of a standard Hugging Face family on "
                    "--data with the finetuning trainer (see training/pretrain.py). The "
                    "tokenizer is --tokenizer or a byte-level BPE of --vocab-size pieces learned "
                    "on the training documents.")
    architecture = pretrain.add_argument_group("architecture")
    architecture.add_argument("--family", default="llama", choices=FAMILIES)
    architecture.add_argument("--num-layers", type=int, default=1)
    architecture.add_argument("--hidden-size", type=int, default=256)
    architecture.add_argument("--num-heads", type=int, default=8)
    architecture.add_argument("--intermediate-size", type=int,
                              help="MLP width (default: 3x hidden for llama, else 4x)")
    architecture.add_argument("--vocab-size", type=int, default=4096,
                              help="pieces of the tokenizer learned when --tokenizer is absent")
    architecture.add_argument("--tokenizer", help="a model directory or Hub id whose tokenizer "
                                                  "to use")
    add_finetune_options(pretrain, codebooks=False)

    synthesize = commands.add_parser(
        "synthesize", help="sample TinyStories-style text from a teacher model",
        description="Sample stories from --teacher (batched, KV cache, seeded per batch) and "
                    "append the unique finished ones to --out until it holds --stories; "
                    "running again resumes (see training/synthesize.py).")
    synthesize.add_argument("--teacher", required=True,
                            help="llama2c:PATH.bin, a model directory or a Hub id")
    synthesize.add_argument("--stories", type=int, required=True, help="unique stories wanted")
    synthesize.add_argument("--seed", type=int, default=0)
    synthesize.add_argument("--out", required=True, help="text file (<|endoftext|> separated)")
    synthesize.add_argument("--batch-size", type=int, default=128)
    synthesize.add_argument("--max-new-tokens", type=int, default=480)
    synthesize.add_argument("--temperature", type=float, default=1.0)
    synthesize.add_argument("--top-p", type=float, default=0.95)
    synthesize.add_argument("--threads", type=int, help="CPU threads")

    build.add_parser(commands)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a model on a text file",
        description="Loss, bits per byte and accuracy (with and without codebooks) and, per "
                    "codebook site, MSE, FVU, dead codes and usage entropy.")
    evaluate.add_argument("--model", required=True,
                          help="'default', a model directory, a Hub repo id or llama2c:PATH.bin")
    evaluate.add_argument("--data", required=True, nargs="+", help="text file(s) to evaluate on")
    evaluate.add_argument("--data-format", default="auto",
                          help="auto, endoftext, blank-lines or lines")
    evaluate.add_argument("--block-size", type=int, default=256, help="tokens per block")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--threads", type=int, help="CPU threads")
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    widen = commands.add_parser(
        "widen-vocab", help="give a base model a larger vocabulary, learned on the training text",
        description="Continue the base tokenizer's BPE on the training documents of --data "
                    "(the validation documents that finetune would hold out with the same "
                    "--val-fraction and --seed are left out) up to --vocab-size pieces; new "
                    "pieces start from the mean embedding of their old pieces (see "
                    "training/vocabulary.py). Writes a model directory for finetune --base.")
    widen.add_argument("--base", required=True,
                       help="Hub repo id, local HF directory or llama2c:PATH.bin")
    widen.add_argument("--data", required=True, nargs="+", help="text files")
    widen.add_argument("--data-format", default="auto",
                       help="auto, endoftext, blank-lines or lines")
    widen.add_argument("--vocab-size", required=True, type=int, help="pieces after widening")
    widen.add_argument("--val-fraction", type=float, default=0.05)
    widen.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    widen.add_argument("--output", required=True, help="directory to write")
    return parser


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults < preset < saved recipe (with --resume) < command-line options."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "preset")}
    options = preset(args.preset) if args.preset else {}
    if given.get("resume"):
        output = given.get("output", options.get("output"))
        saved = Path(output) / CONFIG_NAME if output else None
        if saved is None or not saved.is_file():
            raise FileNotFoundError(f"--resume: no {CONFIG_NAME} in --output {output!r}")
        options |= json.loads(saved.read_text())
    options |= given
    missing = [f"--{name}" for name in ("base", "data", "output") if name not in options]
    if missing:
        raise ValueError(f"finetune needs {', '.join(missing)} (or a --preset)")
    return FinetuneConfig(**options)


ARCHITECTURE_OPTIONS = ("family", "num_layers", "hidden_size", "num_heads", "intermediate_size",
                        "vocab_size")


def run_pretrain(args: argparse.Namespace, argv: list[str]) -> None:
    from training.pretrain import initial_path, write_initial_base
    from training.trainer import finetune

    architecture = Architecture(**{k: getattr(args, k) for k in ARCHITECTURE_OPTIONS})
    options = {k: v for k, v in vars(args).items()
               if k not in (*ARCHITECTURE_OPTIONS, "command", "tokenizer")}
    if options.get("resume") and "output" in options:
        saved = Path(options["output"]) / CONFIG_NAME
        if saved.is_file():
            options = json.loads(saved.read_text()) | options
    # The base is the run's own initial model; validation of the rest happens in the config.
    output, checkpoints = options.get("output"), options.get("checkpoint_dir")
    if not output:
        raise ValueError("pretrain needs --output")
    options["base"] = str(Path(checkpoints or Path(output) / "checkpoints") / "initial")
    options["codebooks"] = False
    config = FinetuneConfig(**options)
    architecture.validate()
    if not config.resume or not initial_path(config).is_dir():
        write_initial_base(config, architecture, args.tokenizer)
    finetune(config, command=shlex.join(["python", "-m", "training", *argv]))


def run_synthesize(args: argparse.Namespace) -> None:
    import torch

    from training.models import load_base
    from training.synthesize import synthesize

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base(args.teacher)
    summary = synthesize(model, tokenizer, args.stories, args.out, args.seed, args.batch_size,
                         args.max_new_tokens, args.temperature, args.top_p)
    print(f"{args.out}: {summary['stories']:,} stories, {summary['words']:,} words "
          f"({summary['duplicates']} duplicates and {summary['unfinished']} unfinished samples "
          f"dropped; {summary['batches']} batches in {summary['seconds']:.0f} s)")


def run_evaluate(args: argparse.Namespace) -> None:
    import torch

    from training.data import read_documents
    from training.evaluate import evaluate, format_report
    from training.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    documents = read_documents(args.data, args.data_format)  # fails early on a missing file
    model, tokenizer = load_model(args.model)
    result = evaluate(model, tokenizer, documents, args.block_size, args.batch_size,
                      progress=not args.json)
    result["model"] = args.model
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def run_widen_vocab(args: argparse.Namespace) -> None:
    from training.data import read_documents, split_validation
    from training.models import load_base
    from training.vocabulary import widen_vocabulary

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {output} exists and is not empty")
    train, _ = split_validation(read_documents(args.data, args.data_format), args.val_fraction,
                                args.seed)
    model, tokenizer = load_base(args.base)
    old = len(tokenizer)
    model, tokenizer = widen_vocabulary(model, tokenizer, train, args.vocab_size)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"{args.base}: {old} -> {len(tokenizer)} pieces, learned on {len(train)} training "
          f"documents; written to {output}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finetune":
            from training.trainer import finetune

            config = finetune_config(args)
            finetune(config, command=shlex.join(["python", "-m", "training", *argv]))
        elif args.command == "pretrain":
            run_pretrain(args, argv)
        elif args.command == "synthesize":
            run_synthesize(args)
        elif args.command == "build-default":
            build.run(args)
        elif args.command == "evaluate":
            run_evaluate(args)
        else:
            run_widen_vocab(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
