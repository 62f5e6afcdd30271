"""What every handler of the page shares: an error becomes the one line the CLI would print, never a traceback.

A handler with a status box gets `error: ...` as its first output; one without (the lists the page refreshes)
raises it as a gradio message. The traceback of an unexpected error goes to .sdlora-serve/server.log only.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import gradio as gr

from sdlora.errors import BUG, SdloraError, describe, printable

LOG = logging.getLogger("sdlora.serve")


def one_line(exc: BaseException) -> str:
    """The message `sdlora` prints for `exc` (after `error: `), as the CLI's error boundary words it."""
    if isinstance(exc, SdloraError):
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    known = describe(exc)
    if known is not None:
        return known[0]
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {printable(first)[:300]}; {BUG}"


def guarded(outputs: int | None):
    """Turn any exception of a handler into 'error: <one line>': in its status output (the first of `outputs`),
    or, with `outputs=None` (a handler without a status box), as the page's error message."""

    def wrap(handler):
        @functools.wraps(handler)
        def inner(*args: Any, **kwargs: Any):
            try:
                return handler(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the page shows one line; the log keeps the traceback
                if not isinstance(exc, SdloraError):
                    LOG.exception("handler %s failed", handler.__name__)
                message = f"error: {one_line(exc)}"
            if outputs is None:
                raise gr.Error(message, print_exception=False)
            return (message, *[gr.update() for _ in range(outputs - 1)])

        inner.guarded = True  # type: ignore[attr-defined]  # tests check every handler of the page has this
        return inner

    return wrap
