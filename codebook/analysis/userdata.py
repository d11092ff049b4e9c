"""Where the analysis commands keep what they make for a model: its code index
(``code_index.safetensors``) and its topic presets (``topics.json``).

They go beside the model when it is a directory of one's own, and never into

* a snapshot of the Hugging Face cache (a Hub model): its files are links to blobs that other
  snapshots share, so writing through one would silently change the Hub's copy;
* the installed package (the ``default`` model): its files are the release's.

For those two, the files go to the model's folder in the per-user data directory,
``$CODEBOOK_DATA_DIR``, else ``$XDG_DATA_HOME/codebook``, else ``~/.local/share/codebook``:
``hub/models--OWNER--NAME/COMMIT/`` for a Hub snapshot, ``default_model-HASH/`` for the default
model (``HASH`` of its weights, so that another release's model never reads this one's index).
Readers (:func:`analysis_file`) look there first, then beside the model, so the default model's
shipped index and presets (or those a Hub repo carries) are read until one's own replace them.
Writing into the package on purpose (a maintainer updating the shipped files) takes an explicit
``--output codebook/default_model``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

DATA_DIR_ENV = "CODEBOOK_DATA_DIR"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the codebook package
_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
# What makes a model the model it is; an index or presets made for it hold for these files only.
_MODEL_FILES = ("config.json", "codebook_config.json", "model.safetensors",
                "codebooks.safetensors", "tokenizer.json")


def data_root() -> Path:
    """The per-user data directory (see the module docstring)."""
    configured = os.environ.get(DATA_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "codebook"


def _hub_parts(path: Path) -> tuple[str, str, str] | None:
    """``(repo folder, "snapshots" or "blobs", name)`` when ``path`` lies in a Hugging Face cache
    repo's snapshots or blobs, as written or once links are followed."""
    for form in (Path(path).expanduser().absolute(), Path(path).expanduser().resolve()):
        parts = form.parts
        for i in range(len(parts) - 2):
            if parts[i].startswith(_HUB_REPO_PREFIXES) and parts[i + 1] in ("snapshots", "blobs"):
                return parts[i], parts[i + 1], parts[i + 2]
    return None


def analysis_dir(model_dir: str | Path) -> Path:
    """Where the analysis commands write ``model_dir``'s index and presets unless told."""
    model_dir = Path(model_dir)
    hub = _hub_parts(model_dir)
    if hub is not None and hub[1] == "snapshots":
        repo, _, commit = hub
        return data_root() / "hub" / repo / commit
    if model_dir.resolve().is_relative_to(_PACKAGE_DIR):
        return data_root() / f"{model_dir.name}-{_fingerprint(model_dir.resolve())}"
    return model_dir


def analysis_file(model_dir: str | Path, name: str) -> Path:
    """The file ``name`` of ``model_dir`` to read: one's own (in :func:`analysis_dir`) when there
    is one, else the one beside the model (which may not exist either)."""
    own = analysis_dir(model_dir) / name
    return own if own.is_file() else Path(model_dir) / name


def check_outside_hub_cache(path: str | Path) -> Path:
    """``path``, unless it lies inside a Hugging Face cache (``ValueError`` saying so)."""
    if _hub_parts(Path(path)) is not None:
        raise ValueError(f"{path} is inside the Hugging Face cache, whose files are the Hub's "
                         "(and shared between snapshots): write it elsewhere")
    return Path(path)


def replace_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` with ``write(temporary path)``, then rename the result over it: a link at
    ``path`` is replaced, never written through, and no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@functools.cache
def _fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _MODEL_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return digest.hexdigest()[:12]
