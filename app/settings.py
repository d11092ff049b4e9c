"""What the environment configures. Every setting has a safe default for a public Space.

``CODEBOOK_MODEL``             model loaded at start: ``default`` (embedded), a Hub repo id
                               (``owner/name[@revision]``) or a local directory (trusted: it is set
                               by whoever runs the server).
``CODEBOOK_APP_MODEL_ROOTS``   directories (``os.pathsep``-separated) under which visitors may load
                               local model directories from the model box; unset: none, visitors
                               can only load ``default`` and Hub repo ids.
``CODEBOOK_APP_MAX_NEW_TOKENS``  most tokens one generation may ask for (default 400).
``CODEBOOK_APP_MAX_PROMPT_CHARS`` longest prompt accepted (default 2000 characters).
``CODEBOOK_APP_CONCURRENCY``   generations running at once (default 16; they share one batched
                               forward per token, see :mod:`app.batching`).
``CODEBOOK_APP_QUEUE_SIZE``    requests waiting in the queue before new ones are refused (64).
``CODEBOOK_APP_MAX_MODELS``    models kept loaded at once (default 3; the start model never leaves).
``CODEBOOK_APP_MAX_MODEL_MB``  largest Hub model (weights) a visitor may load (default 1024 MB).
``CODEBOOK_APP_DEVICE``        ``cpu`` or ``cuda`` (default: cuda when available).
``CODEBOOK_APP_TORCH_THREADS`` torch's threads per forward pass (default 1: small models gain
                               nothing from more, and requests interleave token by token).
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` are Gradio's own (default 127.0.0.1:7860).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "default"
    model_roots: tuple[Path, ...] = ()
    max_new_tokens: int = 400
    max_prompt_chars: int = 2000
    concurrency: int = 16
    queue_size: int = 64
    max_models: int = 3
    max_model_mb: int = 1024
    device: str | None = None
    torch_threads: int = 1

    @classmethod
    def from_env(cls) -> Settings:
        roots = os.environ.get("CODEBOOK_APP_MODEL_ROOTS", "")
        device = os.environ.get("CODEBOOK_APP_DEVICE", "").strip() or None
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"CODEBOOK_APP_DEVICE must be cpu or cuda, got {device!r}")
        return cls(
            model=os.environ.get("CODEBOOK_MODEL", "").strip() or "default",
            # Resolved now, so that a root given through a symlink still contains what it holds.
            model_roots=tuple(Path(r).expanduser().resolve() for r in roots.split(os.pathsep)
                              if r.strip()),
            max_new_tokens=_int("CODEBOOK_APP_MAX_NEW_TOKENS", 400),
            max_prompt_chars=_int("CODEBOOK_APP_MAX_PROMPT_CHARS", 2000),
            concurrency=_int("CODEBOOK_APP_CONCURRENCY", 16),
            queue_size=_int("CODEBOOK_APP_QUEUE_SIZE", 64),
            max_models=_int("CODEBOOK_APP_MAX_MODELS", 3),
            max_model_mb=_int("CODEBOOK_APP_MAX_MODEL_MB", 1024),
            device=device,
            torch_threads=_int("CODEBOOK_APP_TORCH_THREADS", 1),
        )
