"""Turning a visitor's mistake into a visible message.

Handlers raise :class:`ValueError` subclasses (:class:`app.inputs.InputError`,
:class:`app.models.ModelError`) naming the problem; :func:`shown` turns them into ``gr.Error``,
which the browser shows as a notice and ``gradio_client`` raises as ``AppError`` with the same
message.
The app keeps serving: an error ends only that request.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import gradio as gr


def _visible(err: ValueError) -> gr.Error:
    # print_exception=False: a visitor's typo is not a server problem worth a traceback.
    return gr.Error(str(err), title="Cannot do that", print_exception=False)


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
