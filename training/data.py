"""Training text: read documents, hold out validation documents, tokenise, pack into blocks.

A *document* is one story (or paragraph, or line, depending on the file's format). Documents are
the unit of the train/validation split, so no validation text is ever seen in training, not even
the other half of a story. Tokenised documents are joined into one stream, each preceded by the
tokenizer's BOS token (llama2.c's convention; GPT-2-style tokenizers whose only special token is
``<|endoftext|>`` get that, which makes it the separator GPT-2 was trained with). The stream is
cut into blocks of ``block_size + 1`` tokens that overlap by one token, so that every token after
the first is predicted exactly once: the basis of an exact bits-per-byte figure.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import hashlib
import json
import re
from pathlib import Path

import torch

from codebook.text import deduplicate, separator_id, source_documents, split_text

HUB_PREFIX = "hf:"


@dataclasses.dataclass
class TokenStream:
    """Documents tokenised into one stream (``tokens``), with what bits per byte needs."""

    tokens: torch.Tensor  # int64 [n]
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the documents' text (separators not counted)


def check_sources(sources: list[str]) -> None:
    """Fail early, naming the problem, if a data source cannot be read."""
    if not sources:
        raise ValueError("no training data given: pass --data FILE (or hf:DATASET)")
    for source in sources:
        if source.startswith(HUB_PREFIX):
            if not parse_hub_source(source[len(HUB_PREFIX):])[0]:
                raise ValueError(f"{source!r} names no dataset: write hf:OWNER/NAME[:SPLIT]")
            continue
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"data file not found: {source} (for a Hub dataset write hf:OWNER/NAME)"
            )
        if path.is_dir() and not sorted(path.glob("*.txt")):
            raise ValueError(f"data directory {source} holds no .txt files")


def read_documents(sources: list[str], fmt: str = "auto", text_column: str = "text") -> list[str]:
    """Documents from text files, folders of ``.txt`` files and Hub datasets
    (``hf:OWNER/NAME[@REVISION][:SPLIT or FILE]``), with exact duplicates (after whitespace
    normalisation) removed, first occurrence kept."""
    check_sources(sources)
    documents: list[str] = []
    for source in sources:
        if source.startswith(HUB_PREFIX):
            documents += _hub_documents(source[len(HUB_PREFIX):], fmt, text_column)
            continue
        documents += source_documents(source, fmt)
    deduplicated = deduplicate(documents)
    if not deduplicated:
        raise ValueError(f"the training data {sources} holds no text")
    return deduplicated


# Data files of a Hub dataset repo, in order of preference: when a split has files in several
# formats (TinyStories ships the same stories as .txt and .parquet), one format is read.
HUB_DATA_FORMATS = (".parquet", ".jsonl", ".json", ".csv", ".txt")
# Split names as the Hub's data-file conventions spell them in file and folder names.
SPLIT_KEYWORDS = {"train": ("train", "training"),
                  "validation": ("validation", "valid", "val", "dev"),
                  "test": ("test", "testing", "eval", "evaluation")}


def parse_hub_source(spec: str) -> tuple[str, str, str]:
    """``OWNER/NAME[@REVISION][:SPLIT or FILE]`` → ``(repo with revision, selector, kind)``: the
    selector is a split name (default ``train``, ``kind == "split"``) or, when it holds a ``.``,
    ``/`` or ``*``, a file path or glob inside the repo (``kind == "files"``)."""
    repo, _, selector = spec.strip().partition(":")
    selector = selector.strip() or "train"
    kind = "files" if any(c in selector for c in "./*") else "split"
    return repo.strip(), selector, kind


def _in_split(path: str, split: str) -> bool:
    keywords = SPLIT_KEYWORDS.get(split, (split,))
    name = path.lower()
    return any(re.search(rf"(^|[-._ 0-9/]){re.escape(word)}($|[-._ 0-9/])", name)
               for word in keywords)


def choose_data_files(files: list[str], selector: str, kind: str) -> list[str]:
    """The repo files to read for a split (one format, see :data:`HUB_DATA_FORMATS`) or a glob.
    A repo whose file names mark no split at all is all ``train``."""
    data = sorted(f for f in files if f.lower().endswith(HUB_DATA_FORMATS)
                  and not Path(f).name.startswith(("dataset_info", ".")))
    if kind == "files":
        return [f for f in data if fnmatch.fnmatch(f, selector)]
    chosen = [f for f in data if _in_split(f, selector)]
    if not chosen and selector == "train" and not any(
            _in_split(f, other) for f in data for other in SPLIT_KEYWORDS):
        chosen = data
    for ext in HUB_DATA_FORMATS:
        in_format = [f for f in chosen if f.lower().endswith(ext)]
        if in_format:
            return in_format
    return []


def _hub_documents(spec: str, fmt: str, text_column: str) -> list[str]:
    """The documents of one split (or file glob) of a Hugging Face dataset repo, fetched with
    ``huggingface_hub`` (so ``HF_HUB_OFFLINE=1`` reads the local cache alone)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError

    from codebook.hub import download_snapshot, split_revision

    repo, selector, kind = parse_hub_source(spec)
    patterns = [f"*{ext}" for ext in HUB_DATA_FORMATS]
    repo_id, revision = split_revision(repo)
    try:  # list the repo's files without downloading them
        listing = snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                    allow_patterns=patterns, dry_run=True)
        files = [info.filename for info in listing]
    except DryRunError:  # offline: the cached snapshot is the listing
        folder = download_snapshot(repo, allow_patterns=patterns, repo_type="dataset")
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    chosen = choose_data_files(files, selector, kind)
    if not chosen:
        what = f"split {selector!r}" if kind == "split" else f"files matching {selector!r}"
        shown = ", ".join(sorted(f for f in files if f.lower().endswith(HUB_DATA_FORMATS))[:20])
        raise ValueError(f"Hub dataset {repo_id!r} has no data files for the {what}; "
                         f"its data files: {shown or 'none'} (write hf:{repo_id}:SPLIT or "
                         f"hf:{repo_id}:FILE)")
    folder = download_snapshot(repo, allow_patterns=chosen, repo_type="dataset")
    documents: list[str] = []
    for name in chosen:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{name} of Hub dataset {repo_id!r} is not in the local "
                                    "cache and the Hub cannot be reached")
        documents += _file_documents(path, fmt, text_column, f"{name} of Hub dataset {repo_id!r}")
    return documents


def _file_documents(path: Path, fmt: str, text_column: str, label: str) -> list[str]:
    """Documents of one data file: plain text is split by ``fmt``; JSON lines, JSON, CSV and
    Parquet give one document per row's ``text_column``."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return split_text(path.read_text(encoding="utf-8"), fmt)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {label} needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        columns = table.column_names
        rows = table.column(text_column).to_pylist() if text_column in columns else None
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = [row[text_column] for row in reader] if text_column in columns else None
    else:
        text = path.read_text(encoding="utf-8")
        try:
            records = ([json.loads(line) for line in text.splitlines() if line.strip()]
                       if suffix == ".jsonl" else json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"{label} is not valid JSON: {err}") from None
        if isinstance(records, dict):  # {"column": [values...]}
            records = [dict(zip(records, values, strict=True))
                       for values in zip(*records.values(), strict=True)]
        columns = sorted({key for record in records if isinstance(record, dict)
                          for key in record})
        rows = ([record.get(text_column) for record in records if isinstance(record, dict)]
                if text_column in columns else None)
    if rows is None:
        raise ValueError(f"{label} has no column {text_column!r}; its columns are {columns} "
                         "(choose one with --text-column)")
    return [row.strip() for row in rows if isinstance(row, str) and row.strip()]


def split_validation(
    documents: list[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Hold out ``fraction`` of the documents (at least one), chosen by a seeded hash of each
    document's text: the split does not depend on file order and is stable across runs."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
    if len(documents) < 2:
        raise ValueError(
            f"the data holds {len(documents)} document(s): at least 2 are needed to hold one out "
            "for validation (or pass separate validation data)"
        )

    salt = seed.to_bytes(8, "little", signed=True)

    def rank(doc: str) -> bytes:
        return hashlib.blake2b(doc.encode(), digest_size=8, salt=salt).digest()

    num_val = min(len(documents) - 1, max(1, round(fraction * len(documents))))
    held_out = set(sorted(range(len(documents)), key=lambda i: rank(documents[i]))[:num_val])
    train = [d for i, d in enumerate(documents) if i not in held_out]
    val = [d for i, d in enumerate(documents) if i in held_out]
    return train, val


def tokenize(documents: list[str], tokenizer) -> TokenStream:
    """Tokenise ``documents`` (no special tokens added by the tokenizer) into one stream."""
    separator = separator_id(tokenizer)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    stream = []
    for ids in encoded:
        stream.append(separator)
        stream.extend(ids)
    return TokenStream(
        tokens=torch.tensor(stream, dtype=torch.long),
        num_documents=len(documents),
        num_bytes=sum(len(doc.encode("utf-8")) for doc in documents),
    )


def pack_blocks(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Full blocks ``[n, block_size + 1]`` of the stream, consecutive blocks sharing one token
    (a block's inputs are ``[:-1]``, its targets ``[1:]``); a shorter tail is left out."""
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    if tokens.numel() < block_size + 1:
        return tokens.new_empty(0, block_size + 1)
    return tokens.unfold(0, block_size + 1, block_size)


def eval_blocks(tokens: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """All of the stream as blocks: the full ones, then the shorter tail (if it predicts
    anything), so that every token after the first is a target exactly once."""
    blocks = list(pack_blocks(tokens, block_size))
    covered = len(blocks) * block_size  # tokens predicted by the full blocks
    if tokens.numel() - 1 > covered:
        blocks.append(tokens[covered:])
    return blocks


def sample_indices(
    step: int, micro_step: int, rank: int, world_size: int, micro_batch: int,
    grad_accum: int, num_blocks: int, seed: int,
) -> torch.Tensor:
    """Which blocks one process reads at one micro-step: a pure function of the step, so that
    a resumed run reads exactly what an uninterrupted one would.

    The global sample sequence walks through a fresh seeded permutation of the blocks each
    epoch; step ``t`` consumes samples ``[t * G, (t + 1) * G)`` with ``G = world * micro *
    accum``, split by micro-step, then by rank. One process with ``accum = 2`` therefore reads
    what two processes with ``accum = 1`` read together.
    """
    global_batch = world_size * micro_batch * grad_accum
    first = step * global_batch + (micro_step * world_size + rank) * micro_batch
    positions = torch.arange(first, first + micro_batch)
    epochs = positions // num_blocks
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + epoch))
        mask = epochs == epoch
        out[mask] = order[positions[mask] % num_blocks]
    return out
