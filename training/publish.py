"""Uploading a finished run's model directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

# Never uploaded: checkpoints (optimizer state, large) and temporary files.
IGNORE_PATTERNS = ["checkpoints/*", ".*", "*.tmp*"]


def check_push_target(repo_id: str, token: str | None = None) -> None:
    """Fail before training if ``repo_id`` is not a valid repo id or no Hub token is set."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--push-to-hub {repo_id!r} is not a valid Hub repo id: {err}") from None
    if "/" not in repo_id:
        raise ValueError(f"--push-to-hub needs OWNER/NAME, got {repo_id!r}")
    if not (token or get_token()):
        raise ValueError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set "
                         "HF_TOKEN")


def push_output(directory: Path, repo_id: str, token: str | None = None,
                private: bool | None = None) -> str:
    """Create (if needed) the model repo and upload the run's model, card, metrics and plots."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                             ignore_patterns=IGNORE_PATTERNS,
                             commit_message="Upload codebook model from training")
    return str(info)
