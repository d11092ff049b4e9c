"""Finding a model directory: ``default`` (embedded), a local directory, or a Hub repo id."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

# Only what a codebook model needs: configs, safetensors weights, tokenizer files, the card, the
# analysis files beside it. Pickled weights and code are never downloaded by default (an original
# codebook-features checkpoint may fetch pytorch_model.bin, read with weights_only=True only).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.md", "*.npz", "*.png"]


def split_revision(name: str) -> tuple[str, str | None]:
    """``"owner/name@rev"`` → ``("owner/name", "rev")``."""
    if "@" in name:
        repo_id, revision = name.rsplit("@", 1)
        return repo_id, revision or None
    return name, None


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """The local directory holding the model, downloading it from the Hub if needed (only the
    files matching ``allow_patterns``, default :data:`HUB_PATTERNS`)."""
    name = str(name_or_path).strip()
    if not name:
        raise ValueError("no model given: pass 'default', a local directory or a Hub repo id")
    if name == DEFAULT_MODEL_NAME:
        if not (DEFAULT_MODEL_DIR / "codebook_config.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                "reproduce it with: python -m training finetune --preset default"
            )
        return DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"{name} is a file, not a model directory")
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    return download_snapshot(name, revision, token, allow_patterns or HUB_PATTERNS)


def download_snapshot(name: str, revision: str | None = None, token: str | bool | None = None,
                      allow_patterns: list[str] | None = None, repo_type: str = "model") -> Path:
    """The local snapshot folder of Hub repo ``name`` (``owner/name[@revision]``), fetching the
    files that match ``allow_patterns``; with ``HF_HUB_OFFLINE=1`` only the local cache is read.
    ``repo_type`` is ``"model"`` or ``"dataset"``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    repo_id, at_revision = split_revision(name)
    revision = revision or at_revision
    kind = "Hub repo" if repo_type == "model" else f"Hub {repo_type}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        what = "a local directory" if repo_type == "model" else "a local file"
        raise ValueError(f"{name!r} is neither {what} nor a valid Hub repo id ({err})") from None
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
            repo_type=repo_type,
        )
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{kind} {repo_id!r} not found (or private)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{kind} {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline mode or no network)"
        ) from None
    return Path(path)


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, or ``None`` when it has none."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
