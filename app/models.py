"""Which models a visitor may load, and the models loaded so far.

The model box accepts, from anyone who can reach the app:

* ``default``: the embedded model;
* a Hub repo id ``owner/name``, optionally ``@revision`` (a branch, tag or commit), fetched through
  ``huggingface_hub`` (its cache and ``HF_HUB_OFFLINE`` honoured); weights are only read from
  safetensors (or, for an original-library checkpoint, ``pytorch_model.bin`` with
  ``weights_only=True``) and no code is ever run (``trust_remote_code`` is never set);
* a local directory only if the server sets ``CODEBOOK_APP_MODEL_ROOTS`` and the directory, after
  resolving ``..`` and symlinks, lies inside one of those roots.

Everything else (other paths, ``..`` tricks, URLs, control characters, revisions that climb out of
the cache) is refused with a message saying why. Checkpoints of the paper's original library open
by name only if they are the paper's released models, whose base models come from the table in
:mod:`codebook.original`: a visitor's repo never chooses the base it runs on
(``base_model_name_or_path`` in its config is refused). :func:`download_note` says, before
anything is loaded, how much a name would fetch from the Hub.

Every Hub repo such a load reads (the model, and the base model the table gives) is at most
``CODEBOOK_APP_MAX_MODEL_MB``, counting every file that would be fetched (weights, configs,
tokenizer, card, analysis files), whether already cached or not; sizes are asked of the Hub before
anything is downloaded, a file of unknown size is refused, and when the Hub cannot give sizes
only the local cache is read (see :mod:`codebook.hub`). The model named by ``CODEBOOK_MODEL`` is
trusted: the operator chose it, and none of these checks applies to it.

Each session picks its own model (a visitor loading one does not switch anyone else's); loaded
models are shared and kept in a small LRU cache. A failed load raises :class:`ModelError` and
changes nothing, so the previous model keeps working.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
from pathlib import Path

import torch

from app import errors
from app.settings import Settings
from codebook import CodebookModel, hub, original
from codebook.analysis.topics import load_topics

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 200
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_REVISION = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")
_PATH_START = ("/", "./", "../", "~", ".\\", "..\\")


class ModelError(ValueError):
    """A model that cannot be loaded; the message is meant for the visitor."""


def display_name(name: str) -> str:
    """How a model is named to visitors: a Hub id or ``default`` as it is, a local directory by
    its own name only (where it lies on the server is nobody's business)."""
    if name.startswith(_PATH_START) or name in (".", "..") or Path(name).is_absolute():
        return Path(name).name or name.strip("/\\.") or "model"
    return name


def check_model_name(name: str, roots: tuple[Path, ...]) -> str:
    """The name to load (stripped) if a visitor may load it; else :class:`ModelError`."""
    if name is not None and not isinstance(name, str):
        raise ModelError(f"the model name must be text, got {name!r}")
    name = (name or "").strip()
    if not name:
        raise ModelError("the model box is empty: type 'default', a Hub repo id like "
                         "'owner/name' or 'owner/name@revision'")
    if len(name) > MAX_NAME_CHARS:
        raise ModelError(f"a model name is at most {MAX_NAME_CHARS} characters; this one has "
                         f"{len(name)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ModelError("the model name contains control characters")
    if name == hub.DEFAULT_MODEL_NAME:
        return name
    if name.startswith(_PATH_START) or name in (".", ".."):
        return _check_local(name, roots)
    if "://" in name or "\\" in name:
        raise ModelError(f"{name!r} is not a Hub repo id: write owner/name (no URL)")
    repo_id, _, revision = name.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ModelError(f"{name!r} is not a Hub repo id: write owner/name or owner/name@revision")
    if "@" in name and (not _REVISION.match(revision) or ".." in revision.split("/")):
        raise ModelError(f"{revision!r} is not a valid revision: give a branch, tag or commit")
    # codebook.hub prefers a local directory of the same name over the Hub: refuse rather than
    # let a visitor reach a directory beside the server through a repo-id-shaped name.
    if Path(repo_id).exists():
        raise ModelError(f"{repo_id!r} also names a local path on this server; refusing to guess")
    return name


def _check_local(name: str, roots: tuple[Path, ...]) -> str:
    if not roots:
        raise ModelError("loading local directories is disabled on this server (the operator "
                         "can allow folders with CODEBOOK_APP_MODEL_ROOTS); use a Hub repo id")
    path = Path(name).expanduser().resolve()
    if not any(path == root or root in path.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ModelError(f"{name!r} is outside the folders this server allows models from "
                         f"({allowed})")
    if not path.is_dir():
        raise ModelError(f"model directory not found: {name}")
    return str(path)


def download_note(name: str, settings: Settings) -> str:
    """What loading ``name`` would fetch from the Hub, told before loading (a Markdown line; empty
    for ``default`` and local directories). Never raises: a bad name gets its refusal, a size the
    Hub cannot give is said to be unknown."""
    from codebook.download_size import download_size

    try:
        name = check_model_name(name, settings.model_roots)
    except ModelError as err:
        return "" if not (name or "").strip() else f"**Cannot load**: {errors.public(str(err))}"
    if name == hub.DEFAULT_MODEL_NAME or display_name(name) != name:
        return ""
    known = original.known_original(name)
    what = (f"one of the paper's released models, on base {known.base_label}" if known
            else "a Hub repo")
    try:
        size = download_size(name)
    except Exception as err:  # noqa: BLE001 (a note, not an action: it must not fail)
        log.info("cannot size %r: %s: %s", name, type(err).__name__, err)
        return f"`{name}` ({what}): download size unknown"
    line = f"`{name}` ({what}): {size.describe()}"
    limit = settings.max_model_mb * 2**20
    if any(r.size is not None and r.size > limit for r in size.repos):
        line += (f". Over this server's limit of {settings.max_model_mb} MB per repo: it cannot be "
                 "loaded here")
    return errors.public(line)


def visitor_policy(settings: Settings) -> hub.Policy:
    """What :mod:`codebook.hub` may resolve for a visitor: every name (the one typed and a
    released model's base from the table) through :func:`check_model_name`, every Hub repo within
    the size limit."""
    return hub.Policy(check_name=lambda name: check_model_name(name, settings.model_roots),
                      max_bytes=settings.max_model_mb * 2**20)


class LoadedModel:
    """A model ready to serve, with what the tabs read beside it. Requests run it at the same
    time: steering and code capture hold per call (see :meth:`CodebookModel.steer`)."""

    def __init__(self, name: str, model: CodebookModel, directory: Path):
        self.name = name  # what loads it again (a local directory's full path)
        self.model = model
        self.directory = directory
        self.tokenizer = model.tokenizer
        try:
            self.topics = load_topics(directory)
        except ValueError as err:  # a broken topics.json must not make the model unusable
            log.warning("ignoring the topic presets of %s: %s", name, err)
            self.topics = {}
        self._lazy_lock = threading.Lock()
        self._surfaces: list[str] | None = None

    @property
    def label(self) -> str:
        """The name visitors see (:func:`display_name`)."""
        return display_name(self.name)

    @property
    def max_positions(self) -> int | None:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def surfaces(self) -> list[str]:
        """Each token's text (see :func:`codebook.text.token_surfaces`), computed once."""
        from codebook.text import token_surfaces

        with self._lazy_lock:
            if self._surfaces is None:
                self._surfaces = token_surfaces(self.tokenizer)
            return self._surfaces


def load(name: str, device: str | None = None, policy: hub.Policy | None = None) -> LoadedModel:
    """Load ``name`` (already checked) or raise :class:`ModelError` saying why not; ``policy``
    (a visitor's load: :func:`visitor_policy`) bounds what is read on its behalf."""
    try:
        directory = hub.resolve_model_dir(name, policy=policy)
        if original.is_original_checkpoint(directory):
            # Its base model is named inside it: resolved under the same policy.
            model = original.load_original(name, device=device, policy=policy)
        else:
            model = CodebookModel.from_pretrained(directory, device=device)
    except Exception as err:  # whatever went wrong, the visitor gets a message, the app lives
        log.info("cannot load model %r: %s: %s", name, type(err).__name__, err)
        raise ModelError(f"cannot load {name!r}: {err}") from None
    if model.tokenizer is None:
        raise ModelError(f"{name!r} has no tokenizer files, which the app needs to read text")
    errors.hide(directory)
    return LoadedModel(name, model, directory)


class ModelRegistry:
    """Loaded models by name: the start model always, plus the most recently used others."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.start_name = settings.model
        errors.hide(*settings.model_roots)
        if display_name(self.start_name) != self.start_name:  # a local directory
            errors.hide(Path(self.start_name).expanduser().resolve().parent)
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def start_model(self) -> LoadedModel:
        return self.get(self.start_name)

    def get(self, name: str, policy: hub.Policy | None = None) -> LoadedModel:
        """The loaded model ``name`` (the start model, trusted, or an already checked name, loaded
        under ``policy`` if not loaded yet)."""
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            name_lock = self._loading.setdefault(name, threading.Lock())
        with name_lock:  # one load per name, however many sessions ask at once
            with self._lock:
                if name in self._models:
                    return self._models[name]
            loaded = load(name, self.device, policy)
            with self._lock:
                self._models[name] = loaded
                self._evict()
            return loaded

    def load_for_visitor(self, name: str) -> LoadedModel:
        """Check what a visitor typed, then load it (see the module docstring). The start model
        also loads by the name it is shown under (a local directory's own name)."""
        if isinstance(name, str) and name.strip() == display_name(self.start_name):
            return self.start_model()
        name = check_model_name(name, self.settings.model_roots)
        if name == self.start_name:
            return self.get(name)
        return self.get(name, visitor_policy(self.settings))

    def _evict(self) -> None:
        others = [n for n in self._models if n != self.start_name]
        while len(self._models) > self.settings.max_models and others:
            # Sessions still holding the evicted model keep it alive until they finish.
            del self._models[others.pop(0)]
