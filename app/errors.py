"""Turning a visitor's mistake into a visible message, and keeping server paths out of messages.

Handlers raise :class:`ValueError` subclasses (:class:`app.inputs.InputError`,
:class:`app.models.ModelError`) naming the problem; :func:`shown` turns them into ``gr.Error``,
which the browser shows as a notice and ``gradio_client`` raises as ``AppError`` with the same
message. :func:`warn` shows a notice without ending the request.
The app keeps serving: an error ends only that request.

In the browser an event that raises leaves Gradio's red "Error" badge over every one of its
outputs (text boxes, buttons, the stories) until the visitor clears it, so events a browser
triggers never raise: :func:`reported` turns the error into a notice and a line in a status
output, and leaves the other outputs as they were. :func:`endpoint` wires both: the named API
endpoint (which raises, so that API clients get ``AppError``) on a hidden trigger, and the same
handler, reported, on the visible triggers.

Messages never show where things are on the server: :func:`public` replaces every path under a
folder the server uses (the temporary directory, the home directory, the project, the Hugging Face
cache, Python's prefix, the working directory, and the folders registered with :func:`hide`) by its
base name, whatever library wrote the message.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr

log = logging.getLogger(__name__)

_hidden: set[str] = set()
_hidden_lock = threading.Lock()
_pattern: re.Pattern | None = None
# What ends a path inside a message: white space, quotes, brackets and separators.
_PATH_REST = r"""(?:/[^\s'"`,;:()\[\]{}<>|]*)*"""


def hide(*folders) -> None:
    """Keep paths under ``folders`` out of messages too (e.g. the operator's model roots)."""
    global _pattern
    with _hidden_lock:
        _hidden.update(str(Path(f)) for f in folders if f)
        _pattern = None


def _roots() -> set[str]:
    from huggingface_hub import constants

    roots = {tempfile.gettempdir(), str(Path.home()), str(Path(__file__).resolve().parents[1]),
             str(constants.HF_HUB_CACHE), sys.prefix, os.getcwd()}
    with _hidden_lock:
        roots |= _hidden
    # Symlinked folders appear in messages under either name.
    roots |= {os.path.realpath(r) for r in roots}
    return {r.rstrip("/") for r in roots if r.rstrip("/")}


def _path_pattern() -> re.Pattern:
    global _pattern
    if _pattern is None:
        roots = sorted(_roots(), key=len, reverse=True)
        alternatives = [re.escape(r) + r"(?![^\s/'\"`,;:()\[\]{}<>|])" for r in roots]
        _pattern = re.compile("(?:" + "|".join(alternatives + ["~(?=/)"]) + ")" + _PATH_REST)
    return _pattern


def public(message: str) -> str:
    """``message`` with every server path replaced by its base name."""
    return _path_pattern().sub(lambda m: Path(m.group(0).rstrip("/")).name or "…", str(message))


def warn(message: str) -> str:
    """Show ``message`` (without server paths) as a notice; return what was shown."""
    message = public(message)
    gr.Warning(message, title="Not changed")
    return message


def _visible(err: ValueError) -> gr.Error:
    # print_exception=False: a visitor's typo is not a server problem worth a traceback.
    return gr.Error(public(str(err)), title="Cannot do that", print_exception=False)


def shown(fn: Callable) -> Callable:
    """Wrap a handler (function or generator) so that ``ValueError`` reaches the visitor."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as err:
                raise _visible(err) from None

        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise _visible(err) from None

    return function


def _message(err: Exception) -> str:
    """What a visitor is told about ``err``: its own message for a visitor's mistake, a short
    note (and a traceback in the server log) for anything else."""
    if isinstance(err, gr.Error):
        return public(err.message)
    if isinstance(err, ValueError):
        return public(str(err))
    log.exception("unexpected error in an event", exc_info=err)
    return (f"the server could not do that ({type(err).__name__}); the app keeps running, "
            "try again or change the input")


def reported(fn: Callable, outputs: int, status: int) -> Callable:
    """``fn`` (a handler of ``outputs`` outputs, function or generator) for the browser: an error
    becomes a notice (a toast) and ``**Cannot do that**: message`` in output number ``status``;
    every other output is left as it was (``gr.skip()``). Nothing raises into the components,
    so Gradio draws no "Error" badge over them."""

    def failed(err: Exception):
        message = _message(err)
        gr.Warning(message, title="Cannot do that")
        line = f"**Cannot do that**: {message}"
        if outputs == 1:
            return line
        return [line if i == status else gr.skip() for i in range(outputs)]

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 (the visitor is told, the app lives)
                yield failed(err)

        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            return failed(err)

    return function


def _position(outputs: list, status) -> int:
    return next(i for i, output in enumerate(outputs) if output is status)


def endpoint(triggers, fn: Callable, inputs, outputs: list, *, status, api_name: str,
             browser: Callable | None = None, browser_outputs: list | None = None, **kwargs):
    """Wire ``fn`` twice: as the API endpoint ``api_name`` on a hidden button (errors raise, as
    API clients expect: :func:`shown`), and on ``triggers`` for the browser, private and
    :func:`reported` into ``status``. The browser may run ``browser`` instead (the same inputs;
    ``browser_outputs``, default ``outputs``, which hold ``status``): what a page updates beside
    the plain values an API client gets. ``kwargs`` go to both events (a shared
    ``concurrency_id`` keeps one limit for both). Returns the browser's event."""
    gr.Button(visible=False).click(shown(fn), inputs, outputs, api_name=api_name, **kwargs)
    shown_outputs = browser_outputs or outputs
    return gr.on(triggers, reported(browser or fn, len(shown_outputs),
                                    _position(shown_outputs, status)),
                 inputs, shown_outputs, api_visibility="private", **kwargs)
