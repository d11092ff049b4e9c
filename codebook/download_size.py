"""How much loading a model by name would fetch from the Hugging Face Hub, asked before anything
is downloaded.

:func:`download_size` counts the files the loaders would read (:data:`codebook.hub.HUB_PATTERNS`
of the model's repo, its ``pytorch_model*.bin`` when it has no safetensors weights, as an
original-library checkpoint may; and, for the paper's released models, the base model's config
and tokenizer files from :data:`codebook.original.KNOWN_ORIGINALS`). Sizes come from the Hub
(``HfApi.model_info(files_metadata=True)``); when the Hub cannot be asked (``HF_HUB_OFFLINE``, no
network, an API error) they are measured in the local cache instead, and a repo that is not cached
has an unknown size: not an error, since the load itself may still say more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from codebook import hub

_MB = 2**20

# repo id, revision, token → {file name: size in bytes, or None where the Hub does not say} and
# the commit those files are at; None when the Hub cannot be asked. Raises FileNotFoundError for a
# repo or revision the Hub does not have.
Lookup = Callable[[str, str | None, str | bool | None],
                  tuple[dict[str, int | None], str | None] | None]


@dataclasses.dataclass(frozen=True)
class RepoSize:
    """One repo's share: ``size`` bytes (``None``: unknown), ``cached`` of them already in the
    local cache; ``source`` is ``"hub"`` (the Hub's figures), ``"cache"`` (measured in the local
    cache, the Hub being unreachable) or ``"unknown"``; ``note`` says why, when unknown."""

    repo_id: str
    role: str  # "model" or "base"
    size: int | None
    cached: int = 0
    source: str = "hub"
    note: str = ""


@dataclasses.dataclass(frozen=True)
class DownloadSize:
    repos: tuple[RepoSize, ...]

    @property
    def total(self) -> int | None:
        """Bytes the load reads from the Hub or its cache (``None`` if any repo's is unknown)."""
        sizes = [r.size for r in self.repos]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def to_download(self) -> int | None:
        """Bytes not in the local cache yet (``None`` if unknown)."""
        total = self.total
        return None if total is None else total - sum(r.cached for r in self.repos)

    def describe(self) -> str:
        """One line, e.g. ``374.2 MB (model 370.9 MB + base roneneldan/… 3.3 MB), 3.3 MB of it
        already cached``."""
        parts = [f"{r.role if r.role == 'model' else f'base {r.repo_id}'} "
                 f"{_mb(r.size) if r.size is not None else 'size unknown'}" for r in self.repos]
        unknown = [r for r in self.repos if r.size is None]
        if unknown:
            reasons = "; ".join(f"{r.repo_id}: {r.note}" for r in unknown if r.note)
            return f"download size unknown ({reasons or ', '.join(parts)})"
        text = _mb(self.total)
        if len(self.repos) > 1:
            text += f" ({' + '.join(parts)})"
        if all(r.source == "cache" for r in self.repos):
            return f"{text}, read from the local cache (the Hub cannot be reached)"
        if self.to_download == 0:
            return f"{text}, all of it already in the local cache"
        cached = self.total - self.to_download
        return f"{text} to download" + (f", {_mb(cached)} of it already cached" if cached else "")


def _mb(size: int) -> str:
    return f"{size / _MB:.1f} MB"


def hub_file_sizes(repo_id: str, revision: str | None = None, token: str | bool | None = None):
    """What the Hub reports of ``repo_id`` at ``revision`` (see :data:`Lookup`)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except RepositoryNotFoundError:
        raise FileNotFoundError("not found on the Hub (or private)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"no revision {revision!r} on the Hub") from None
    except Exception:  # unreachable, timed out, an API error: the size is unknown, not an error
        return None
    return {s.rfilename: s.size for s in info.siblings or []}, info.sha


def cached_file_sizes(repo_id: str, revision: str | None = None) -> dict[str, int] | None:
    """``{file: size}`` of the cached snapshot of ``repo_id`` at ``revision``; ``None`` if the
    cache does not hold it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return hub.snapshot_file_sizes(folder)


def _is_cached(repo_id: str, filename: str, commit: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if commit is None:
        return False
    return isinstance(try_to_load_from_cache(repo_id, filename, revision=commit), str)


def _needed(files: list[str], patterns: list[str], original_weights: bool) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    needed = list(filter_repo_objects(files, allow_patterns=patterns))
    if original_weights and not any(f.endswith(".safetensors") for f in needed):
        needed += filter_repo_objects(files, allow_patterns=["pytorch_model*.bin"])
    return needed


def _repo_size(repo_id: str, revision: str | None, role: str, patterns: list[str],
               original_weights: bool, token, lookup: Lookup) -> RepoSize:
    try:
        found = lookup(repo_id, revision, token)
    except FileNotFoundError as err:
        return RepoSize(repo_id, role, None, source="unknown", note=str(err))
    if found is not None:
        sizes, commit = found
        needed = _needed(list(sizes), patterns, original_weights)
        unknown = [f for f in needed if sizes[f] is None]
        if unknown:
            return RepoSize(repo_id, role, None, source="unknown",
                            note=f"the Hub does not report the size of {unknown[0]}")
        cached = sum(sizes[f] for f in needed if _is_cached(repo_id, f, commit))
        return RepoSize(repo_id, role, sum(sizes[f] for f in needed), cached)
    sizes = cached_file_sizes(repo_id, revision)
    if sizes is None:
        return RepoSize(repo_id, role, None, source="unknown",
                        note="the Hub cannot be reached and it is not in the local cache")
    total = sum(sizes[f] for f in _needed(list(sizes), patterns, original_weights))
    return RepoSize(repo_id, role, total, total, source="cache")


def download_size(name: str, *, token: str | bool | None = None,
                  lookup: Lookup | None = None) -> DownloadSize:
    """What loading the Hub repo ``name`` (``owner/name[@revision]``) reads from the Hub: the
    model's files and, for one of the paper's released models, its base's (see the module
    docstring). ``lookup`` replaces :func:`hub_file_sizes` (tests)."""
    from codebook import original

    lookup = lookup or hub_file_sizes
    repo_id, revision = hub.split_revision(str(name).strip())
    repos = [_repo_size(repo_id, revision, "model", hub.HUB_PATTERNS, True, token, lookup)]
    known = original.known_original(name)
    if known is not None and known.base is not None:
        repos.append(_repo_size(known.base, known.base_revision, "base", original.BASE_PATTERNS,
                                False, token, lookup))
    return DownloadSize(tuple(repos))
