"""Turning a visitor's mistake into a visible message, and keeping server paths out of messages.

Handlers raise :class:`ValueError` subclasses (:class:`app.inputs.InputError`,
:class:`app.models.ModelError`) naming the problem; :func:`shown` turns them into ``gr.Error``,
which the browser shows as a notice and ``gradio_client`` raises as ``AppError`` with the same
message. :func:`warn` shows a notice without ending the request.
The app keeps serving: an error ends only that request.

Messages never show where things are on the server: :func:`public` replaces every path under a
folder the server uses (the temporary directory, the home directory, the project, the Hugging Face
cache, Python's prefix, the working directory, and the folders registered with :func:`hide`) by its
base name, whatever library wrote the message.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr

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
