"""Finding a model directory: ``default`` (embedded), a local directory, or a Hub repo id.

By default every name is resolved as its owner asks (this is the library and the CLI, run by
whoever owns the machine): a local directory wins over a Hub repo of the same name, and Hub
downloads have no size limit. A caller serving names from people it does not trust (the app)
passes a :class:`Policy`, applied to **every** name resolved on its behalf, including the base
model that :mod:`codebook.original`'s table gives one of the paper's released models (with a
policy, a base named inside a checkpoint, ``base_model_name_or_path``, is never followed):

* ``check_name`` vets each name before anything is read (the app's: Hub ids, or local directories
  inside ``CODEBOOK_APP_MODEL_ROOTS``), so a repo cannot reach a directory its visitor could not;
* ``max_bytes`` bounds each Hub repo: the files it would use (every file matching the download
  patterns, weights, configs, tokenizer, card, analysis files alike, already cached or not) must
  total at most ``max_bytes``. Their sizes are asked of the Hub before anything is downloaded
  (``snapshot_download(dry_run=True)``), and the download is pinned to the commit that was
  measured. A file whose size the Hub does not report is refused. When the Hub cannot say (offline
  mode, no network, an API error), nothing is downloaded: only the local cache is read, and the
  cached files are measured instead, so a model too large to fetch is also too large to load from
  the cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

# Only what a codebook model needs: configs, safetensors weights, tokenizer files, the card, the
# analysis files beside it. Pickled weights and code are never downloaded by default (an original
# codebook-features checkpoint may fetch pytorch_model.bin, read with weights_only=True only).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.md", "*.npz", "*.png"]

_MB = 2**20


@dataclasses.dataclass(frozen=True)
class Policy:
    """What may be resolved for someone untrusted (see the module docstring).

    ``check_name(name)`` returns the name to resolve or raises (a ``ValueError`` whose message is
    meant for that person); ``max_bytes`` bounds each Hub repo's files (``None``: no bound)."""

    check_name: Callable[[str], str] | None = None
    max_bytes: int | None = None


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
    *,
    policy: Policy | None = None,
) -> Path:
    """The local directory holding the model, downloading it from the Hub if needed (only the
    files matching ``allow_patterns``, default :data:`HUB_PATTERNS`), within ``policy``."""
    name = str(name_or_path).strip()
    if not name:
        raise ValueError("no model given: pass 'default', a local directory or a Hub repo id")
    if policy is not None and policy.check_name is not None:
        name = policy.check_name(name)
    if name == DEFAULT_MODEL_NAME:
        if not (DEFAULT_MODEL_DIR / "codebook_config.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                "reproduce it with: python -m training build-default"
            )
        return DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"{name} is a file, not a model directory")
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    return download_snapshot(name, revision, token, allow_patterns or HUB_PATTERNS,
                             max_bytes=policy.max_bytes if policy is not None else None)


def download_snapshot(name: str, revision: str | None = None, token: str | bool | None = None,
                      allow_patterns: list[str] | None = None, repo_type: str = "model",
                      max_bytes: int | None = None) -> Path:
    """The local snapshot folder of Hub repo ``name`` (``owner/name[@revision]``), fetching the
    files that match ``allow_patterns``; with ``HF_HUB_OFFLINE=1`` only the local cache is read.
    ``repo_type`` is ``"model"`` or ``"dataset"``. With ``max_bytes``, the matching files must
    total at most that many bytes (see the module docstring), else ``ValueError``."""
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
        if max_bytes is None:
            path = snapshot_download(
                repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
                repo_type=repo_type,
            )
        else:
            path = _bounded_download(repo_id, revision, token, allow_patterns, repo_type,
                                     max_bytes, f"{kind} {repo_id!r}")
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


def _bounded_download(repo_id: str, revision: str | None, token, allow_patterns, repo_type: str,
                      max_bytes: int, what: str) -> str:
    """``snapshot_download`` of at most ``max_bytes`` (the module docstring says how)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    options = dict(allow_patterns=allow_patterns, token=token, repo_type=repo_type)
    plan = None
    if not constants.HF_HUB_OFFLINE:
        try:
            plan = snapshot_download(repo_id, revision=revision, dry_run=True, **options)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except Exception as err:  # DryRunError (Hub unreachable, API error), a failed HEAD call
            if isinstance(err.__cause__, RepositoryNotFoundError | RevisionNotFoundError):
                raise err.__cause__ from None
            plan = None
    if plan is None:  # the Hub cannot say what it would send: read the cache only
        path = snapshot_download(repo_id, revision=revision, local_files_only=True, **options)
    else:
        unknown = sorted(f.filename for f in plan if f.file_size is None)
        if unknown:
            raise ValueError(f"{what}: the Hub does not report the size of "
                             f"{', '.join(unknown[:3])}; refusing to download files of unknown "
                             "size")
        _check_size({f.filename: f.file_size for f in plan}, max_bytes, what)
        commits = {f.commit_hash for f in plan}
        # Download exactly the commit that was measured (a push in between changes nothing).
        pinned = commits.pop() if len(commits) == 1 else revision
        path = snapshot_download(repo_id, revision=pinned, **options)
    _check_size(snapshot_file_sizes(Path(path), allow_patterns), max_bytes, what)
    return path


def snapshot_file_sizes(folder: Path, allow_patterns=None) -> dict[str, int]:
    """``{relative path: size}`` of the files in a snapshot folder matching ``allow_patterns``
    (all of them by default; snapshot files are links into the cache's blobs: their targets'
    sizes)."""
    from huggingface_hub.utils import filter_repo_objects

    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return {name: files[name].stat().st_size
            for name in filter_repo_objects(list(files), allow_patterns=allow_patterns)}


def _check_size(sizes: dict[str, int], max_bytes: int, what: str) -> None:
    total = sum(sizes.values())
    if total <= max_bytes:
        return
    largest = max(sizes, key=sizes.__getitem__)
    limit = f"{max_bytes // _MB}" if max_bytes % _MB == 0 else f"{max_bytes / _MB:.2f}"
    raise ValueError(f"{what}: its files come to {total / _MB:.1f} MB (largest: {largest} "
                     f"{sizes[largest] / _MB:.1f} MB), over the limit of {limit} MB")


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``, or ``None`` when it has none."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


# -- model cards -------------------------------------------------------------------------------

CARD_NAME = "README.md"


def hub_repo_id(name: str | os.PathLike) -> str | None:
    """The Hub repo id ``name`` names (its ``@revision`` dropped), as a card's ``base_model``;
    ``None`` for the embedded default model, an existing local path, or anything that is not a
    valid repo id (a ``llama2c:`` file, a path of three parts). Asks nothing of the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = str(name).strip()
    if (not name or name == DEFAULT_MODEL_NAME or name.startswith((".", "/", "~"))
            or Path(name).expanduser().exists()):
        return None
    repo_id, _ = split_revision(name)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id


def model_card(text: str, **metadata) -> str:
    """A model card (``README.md``): the Markdown ``text`` under the YAML front matter of
    ``huggingface_hub.ModelCardData(**metadata)`` (e.g. ``license``, ``base_model``, ``tags``,
    ``datasets``, ``library_name``, ``pipeline_tag``; fields that are ``None`` are left out)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**metadata)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.lstrip()}"))


def card_metadata(directory: str | os.PathLike) -> dict:
    """The front matter of the model card in ``directory`` (``{}`` when it has none)."""
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
