"""``python app.py``: load the start model, build the interface, serve it.

Served on ``GRADIO_SERVER_NAME``:``GRADIO_SERVER_PORT`` (Gradio's own variables; default
127.0.0.1:7860). Prints ``codebook app ready at URL`` once the model is loaded and the server
answers, which is what tests and the benchmark wait for.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

READY = "codebook app ready at"


def _workdir() -> Path:
    """The app's own temporary directory, removed at exit. Gradio's file cache lives inside it,
    so every file the app serves (exported bundles, plots) comes from here."""
    workdir = Path(tempfile.mkdtemp(prefix="codebook-app-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    return workdir


def main() -> int:
    # Start-up is mostly imports (torch, transformers, gradio) that allocate hundreds of
    # thousands of long-lived objects; collecting garbage among them costs about a fifth of the
    # start-up CPU time and frees nothing. Collection resumes, with them frozen, once serving.
    gc.disable()
    from app.lean_imports import skip_unused_imports

    skip_unused_imports()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    workdir = _workdir()

    from app.settings import Settings

    try:
        settings = Settings.from_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # One thing after another: imports hold the GIL, so loading the model in a thread while
    # Gradio imports saved no time, and it raced two threads on transformers' lazy module
    # ("cannot import name 'DynamicCache'").
    import torch

    # Small models gain nothing from intra-op threads and lose much to contention with the
    # request threads (a step takes 10x longer with 2 threads on a busy 2-core machine).
    torch.set_num_threads(settings.torch_threads)
    from app.models import ModelError, ModelRegistry

    registry = ModelRegistry(settings)
    try:
        registry.start_model()
    except ModelError as err:
        print(f"error: the start model (CODEBOOK_MODEL={settings.model!r}) cannot be loaded: "
              f"{err}", file=sys.stderr)
        return 2
    from app.style import CSS, THEME
    from app.tabs.steer import FOCUS_SCRIPT
    from app.ui import build_demo

    demo = build_demo(registry, settings, workdir)
    demo.queue(default_concurrency_limit=2, max_size=settings.queue_size)
    _, url, _ = demo.launch(prevent_thread_lock=True, theme=THEME, css=CSS, head=FOCUS_SCRIPT,
                            allowed_paths=[], show_error=False)
    gc.freeze()
    gc.enable()
    print(f"{READY} {url}", flush=True)
    demo.block_thread()
    return 0
