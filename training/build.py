"""``python -m training build-default``: the embedded default model, every stage from ``../shared``.

Stages, each skipped when its output exists (and the two training stages resumed from their
latest checkpoint when interrupted), all under ``--work``:

1. ``stories.txt``: the real TinyStories stories, the lower-cased file repaired
   (:mod:`training.corpus`);
2. ``synthetic.txt`` (only with ``--synthetic-stories N``): stories sampled from stories260K
   (:mod:`training.synthesize`);
3. ``tokenizer/``: a byte-level BPE learned on the training documents (:mod:`training.tokenizer`);
4. ``base/``: a base pretrained from scratch (:mod:`training.pretrain`);
5. ``baseline/``: that base finetuned like the codebook model but without codebooks, the
   reference for the codebook model's bits per byte;
6. ``codebook/``: the base finetuned with a codebook on every attention head;
7. ``codebook/word_topics.safetensors``: per-word topic statistics (topic search without data);
8. ``codebook/topics.json``: calibrated presets for the paper's seven topics;
9. ``codebook/code_index.safetensors``: a small index for the app's code browser;
10. ``--output``: the model's files copied there (the shipped ``codebook/default_model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from codebook.text import ENDOFTEXT
from training.config import FinetuneConfig
from training.pretrain import Architecture, initial_path, write_initial_base

SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                 "codebook_config.json", "codebooks.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "training_config.json",
                 "eval.json", "metrics.jsonl", "run_summary.json", "loss.png", "code_usage.png",
                 "README.md", "word_topics.safetensors", "topics.json", "steering.png",
                 "code_index.safetensors")
# The shipped card's metadata: the project's licence (MIT, like its code); no base model (the
# base is pretrained here from scratch); the TinyStories stories (CDLA-Sharing-1.0, in the card).
SHIPPED_CARD = {"license": "mit", "base_model": None, "datasets": ["roneneldan/TinyStories"]}


@dataclasses.dataclass
class BuildConfig:
    """What build-default makes; every field is a ``--option`` of the command."""

    work: str = "runs/default-build"
    output: str | None = "codebook/default_model"
    shared: str = "../shared"
    synthetic_stories: int = 0
    max_stories: int | None = None  # the first N real stories only (quick trials, tests)
    seed: int = 0
    threads: int | None = None
    # tokenizer and base
    vocab_size: int = 4096
    family: str = "llama"
    num_layers: int = 1
    hidden_size: int = 256
    num_heads: int = 8
    pretrain_epochs: float = 4.0
    pretrain_lr: float = 2e-3
    pretrain_steps: int | None = None
    # codebooks
    num_codes: int = 2048
    k: int = 8
    finetune_epochs: float = 1.0
    finetune_steps: int | None = None
    lr_base: float = 3e-4
    lr_codebook: float = 3e-3
    baseline: bool = True
    # analysis
    min_documents: int = 20
    topics: list[str] | None = None  # default: the paper's seven
    preset_num_codes: list[int] = dataclasses.field(default_factory=lambda: [8, 12, 16, 24])
    preset_strengths: list[float] = dataclasses.field(
        default_factory=lambda: [1.25, 1.5, 1.75, 2.0, 2.5])
    calibration_samples: int = 5
    samples_per_prompt: int = 10
    max_new_tokens: int = 200
    index_tokens: int = 40_000  # about 5 MiB: 64 code ids per token at 8 heads, k=8
    block_size: int = 256
    batch_size: int = 16
    progress: bool = True
    card_notes: str | None = "training/default_model_notes.md"  # appended to the shipped card

    @property
    def work_dir(self) -> Path:
        return Path(self.work)

    def data_files(self) -> list[str]:
        files = [str(self.work_dir / "stories.txt")]
        if self.synthetic_stories:
            files.append(str(self.work_dir / "synthetic.txt"))
        return files


def _stage(name: str, output: Path, run) -> None:
    if output.exists():
        print(f"[{name}] {output} exists: skipped", flush=True)
        return
    print(f"[{name}] making {output}", flush=True)
    started = time.perf_counter()
    run()
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s", flush=True)


def _write_stories(build: BuildConfig) -> None:
    from training.corpus import read_stories

    data = Path(build.shared) / "data" / "tinystories"
    cased = [data / "tinystories_v1_train_prefix_2MiB.txt",
             data / "tinystories_v2_train_prefix_10k_lines.txt"]
    lowercased = [data / "tinystories_v1_train_prefix_4MB_lowercased.txt"]
    missing = [str(p) for p in cased + lowercased if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"build-default reads {missing}: put the shared material in "
                                f"{build.shared} (--shared)")
    stories = read_stories([str(p) for p in cased], [str(p) for p in lowercased])
    stories = stories[:build.max_stories] if build.max_stories else stories
    _write_documents(build.work_dir / "stories.txt", stories)


def _write_documents(path: Path, documents: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{d}\n{ENDOFTEXT}\n" for d in documents), encoding="utf-8")
    tmp.rename(path)


def _synthesize(build: BuildConfig) -> None:
    from training.models import load_base
    from training.synthesize import synthesize

    teacher = f"llama2c:{build.shared}/models/stories260K/stories260K.bin"
    model, tokenizer = load_base(teacher)
    partial = build.work_dir / "synthetic.partial.txt"  # resumable; renamed when complete
    synthesize(model, tokenizer, build.synthetic_stories, partial, build.seed,
               progress=build.progress)
    partial.rename(build.work_dir / "synthetic.txt")


def _training_config(build: BuildConfig, **options) -> FinetuneConfig:
    return FinetuneConfig(data=build.data_files(), block_size=build.block_size,
                          batch_size=build.batch_size, seed=build.seed, threads=build.threads,
                          progress=build.progress, eval_every=100, checkpoint_every=100,
                          **options)


def _train(config: FinetuneConfig) -> None:
    from training.checkpoint import latest_checkpoint
    from training.trainer import finetune

    config.resume = latest_checkpoint(config.checkpoint_path) is not None
    finetune(config)


def _tokenizer(build: BuildConfig) -> None:
    from training.tokenizer import train_tokenizer
    from training.trainer import read_split

    # The documents pretraining will train on (its validation documents stay unseen).
    config = _training_config(build, base="-", output=str(build.work_dir / "base"))
    train, _ = read_split(config)
    tokenizer = train_tokenizer(train, build.vocab_size)
    tmp = build.work_dir / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(build.work_dir / "tokenizer")


def _pretrain(build: BuildConfig) -> None:
    output = build.work_dir / "base"
    config = _training_config(
        build, base=str(output / "checkpoints" / "initial"), output=str(output),
        codebooks=False, epochs=build.pretrain_epochs, max_steps=build.pretrain_steps,
        lr_base=build.pretrain_lr, warmup_steps=100, weight_decay=0.1)
    architecture = Architecture(build.family, build.num_layers, build.hidden_size,
                                build.num_heads, vocab_size=build.vocab_size)
    if not initial_path(config).is_dir():
        write_initial_base(config, architecture, str(build.work_dir / "tokenizer"))
    _train(config)


def _finetune(build: BuildConfig, name: str, codebooks: bool) -> None:
    config = _training_config(
        build, base=str(build.work_dir / "base"), output=str(build.work_dir / name),
        codebooks=codebooks, sites=["attn_heads"], num_codes=build.num_codes, k=build.k,
        epochs=build.finetune_epochs, max_steps=build.finetune_steps, lr_base=build.lr_base,
        lr_codebook=build.lr_codebook, warmup_steps=50)
    _train(config)


def _analysis(argv: list[str]) -> None:
    from codebook.__main__ import main as codebook_main

    if codebook_main(argv) != 0:
        raise RuntimeError(f"python -m codebook {' '.join(argv)} failed")


def build_default(build: BuildConfig) -> Path | None:
    """Run every stage that has not run yet; returns where the model was shipped (if it was)."""
    import torch

    from codebook.analysis.topics import PAPER_TOPICS

    work = build.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if build.threads:
        torch.set_num_threads(build.threads)
    (work / "build_config.json").write_text(json.dumps(dataclasses.asdict(build), indent=2))
    model = work / "codebook"
    common = ["--model", str(model), "--output", str(model)] + (
        [] if build.progress else ["--no-progress"])
    _stage("stories", work / "stories.txt", lambda: _write_stories(build))
    if build.synthetic_stories:
        _stage("synthesize", work / "synthetic.txt", lambda: _synthesize(build))
    _stage("tokenizer", work / "tokenizer", lambda: _tokenizer(build))
    _stage("pretrain", work / "base" / "model.safetensors", lambda: _pretrain(build))
    if build.baseline:
        _stage("baseline", work / "baseline" / "model.safetensors",
               lambda: _finetune(build, "baseline", codebooks=False))
    _stage("finetune", model / "codebooks.safetensors",
           lambda: _finetune(build, "codebook", codebooks=True))
    _stage("word topics", model / "word_topics.safetensors", lambda: _analysis(
        ["word-topics", *common, "--data", *build.data_files(),
         "--min-documents", str(build.min_documents)]))
    topics = build.topics or list(PAPER_TOPICS)
    _stage("presets", model / "topics.json", lambda: _analysis(
        ["presets", *common, "--topic", *topics, "--modes", "add", "--last-layers", "all",
         "--num-codes", *map(str, build.preset_num_codes),
         "--strengths", *map(str, build.preset_strengths),
         "--calibration-samples", str(build.calibration_samples),
         "--samples-per-prompt", str(build.samples_per_prompt),
         "--max-new-tokens", str(build.max_new_tokens),
         "--plot", str(model / "steering.png")]))
    _stage("index", model / "code_index.safetensors", lambda: _analysis(
        ["index", *common, "--data", *build.data_files(), "--max-tokens",
         str(build.index_tokens), "--topic-stories", "20"]))
    if not build.output:
        return None
    output = Path(build.output)
    output.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, output / name)
    if build.card_notes and Path(build.card_notes).is_file():
        from training.report import write_model_card

        write_model_card(output, build.card_notes, **SHIPPED_CARD)
    print(f"[ship] copied the model to {output}", flush=True)
    return output


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's default after its help (unless the help
    says it, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or action.default in (None, argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)".lstrip()


def add_parser(commands) -> None:
    """The ``build-default`` command: one option per :class:`BuildConfig` field of the same name,
    defaulting to the field's default."""
    parser = commands.add_parser(
        "build-default", help="build the embedded default model from ../shared, every stage",
        description=__doc__, formatter_class=_HelpFormatter)
    d = BuildConfig()
    flag = argparse.BooleanOptionalAction
    add = parser.add_argument
    add("--work", default=d.work, help="directory of every stage's output")
    add("--output", default=d.output, help="where the model is shipped ('': not shipped)")
    add("--shared", default=d.shared, help="the shared material: TinyStories, stories260K")
    add("--synthetic-stories", type=int, default=d.synthetic_stories,
        help="stories to sample from stories260K and add to the data (0: none)")
    add("--max-stories", type=int, default=d.max_stories,
        help="only the first N real stories (quick trials, tests)")
    add("--seed", type=int, default=d.seed, help="seed of every stage")
    add("--threads", type=int, default=d.threads, help="CPU threads (default: torch's)")
    base = parser.add_argument_group("tokenizer and base")
    base.add_argument("--vocab-size", type=int, default=d.vocab_size,
                      help="pieces of the tokenizer")
    base.add_argument("--family", default=d.family, help="architecture of the base")
    base.add_argument("--num-layers", type=int, default=d.num_layers, help="layers of the base")
    base.add_argument("--hidden-size", type=int, default=d.hidden_size, help="width of the base")
    base.add_argument("--num-heads", type=int, default=d.num_heads, help="attention heads")
    base.add_argument("--pretrain-epochs", type=float, default=d.pretrain_epochs,
                      help="passes of the pretraining over the training text")
    base.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr,
                      help="peak learning rate of the pretraining")
    base.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps,
                      help="optimizer steps of the pretraining (default: what its epochs need)")
    cb = parser.add_argument_group("codebooks")
    cb.add_argument("--num-codes", type=int, default=d.num_codes, help="codes per head")
    cb.add_argument("--k", type=int, default=d.k, help="codes active at once per head")
    cb.add_argument("--finetune-epochs", type=float, default=d.finetune_epochs,
                    help="passes of each finetuning over the training text")
    cb.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                    help="optimizer steps of each finetuning (default: what its epochs need)")
    cb.add_argument("--lr-base", type=float, default=d.lr_base,
                    help="peak learning rate of the base's weights when finetuning")
    cb.add_argument("--lr-codebook", type=float, default=d.lr_codebook,
                    help="peak learning rate of the codebooks")
    cb.add_argument("--baseline", action=flag, default=d.baseline,
                    help="also finetune without codebooks (the bits-per-byte reference)")
    analysis = parser.add_argument_group("analysis")
    analysis.add_argument("--min-documents", type=int, default=d.min_documents,
                          help="word topics: words of at least this many documents")
    analysis.add_argument("--topics", nargs="+", default=d.topics,
                          help="topics to calibrate presets for (default: the paper's seven)")
    analysis.add_argument("--preset-num-codes", nargs="+", type=int,
                          default=d.preset_num_codes, help="numbers of codes calibration tries")
    analysis.add_argument("--preset-strengths", nargs="+", type=float,
                          default=d.preset_strengths, help="strengths calibration tries")
    analysis.add_argument("--calibration-samples", type=int, default=d.calibration_samples,
                          help="samples per prompt of each calibration setting")
    analysis.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt,
                          help="samples per prompt of the steering evaluation")
    analysis.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                          help="tokens per sample")
    analysis.add_argument("--index-tokens", type=int, default=d.index_tokens,
                          help="tokens in the app's code index")
    add("--block-size", type=int, default=d.block_size,
        help="tokens per training sequence (pretraining and finetuning)")
    add("--batch-size", type=int, default=d.batch_size, help="sequences per training step")
    add("--progress", action=flag, default=d.progress, help="show progress bars")
    add("--card-notes", default=d.card_notes, help="Markdown appended to the shipped card")


def run(args: argparse.Namespace) -> None:
    names = {f.name for f in dataclasses.fields(BuildConfig)}
    build_default(BuildConfig(**{k: v for k, v in vars(args).items() if k in names}))
