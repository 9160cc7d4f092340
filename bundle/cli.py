"""What a failed command-line run prints: the bundle's own error message as the last line, exit code 1.

``python -m monai.bundle run`` evaluates the config's expressions, and MONAI wraps whatever they raise in
``RuntimeError: Failed to evaluate ConfigExpression`` (or ``Failed to instantiate``) after a long traceback, with the
bundle's precise message buried above it. The bundle's configs import this module (``"$import bundle.cli"``), which
installs :func:`excepthook` when the process is such a command-line run: the chain of wrapped exceptions is followed
to the error that started it, and that error's message is the last line printed. The traceback goes to the
``bundle.cli`` logger at DEBUG level, and to stderr when the environment sets ``SAM_UNET_DEBUG=1``. Scripts use
:func:`run_main` for the same behaviour.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

logger = logging.getLogger(__name__)

DEBUG_VARIABLE = "SAM_UNET_DEBUG"
#: errors that describe bad input or a bad setting; anything else is reported as an internal error
EXPECTED_ERRORS = (ValueError, OSError, KeyError, ImportError, TimeoutError)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain (``raise ... from`` causes, then implicit contexts)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def error_message(error: BaseException) -> str:
    """One line for the user: the root cause's own message (with its type when it is not an input error)."""
    cause = root_cause(error)
    text = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause)
    text = " ".join(text.split()) or type(cause).__name__
    if not isinstance(cause, EXPECTED_ERRORS):
        return f"{type(cause).__name__}: {text} (an internal error: run again with {DEBUG_VARIABLE}=1 and report it)"
    return text


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def report(error: BaseException, stream=None) -> int:
    """Print ``error`` for a command-line user (traceback only when debugging) and return the exit code, 1."""
    stream = stream or sys.stderr
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logger.debug("traceback:\n%s", text)
    if debugging():
        stream.write(text)
    else:
        stream.write(f"(the traceback is shown with {DEBUG_VARIABLE}=1)\n")
    stream.write(f"error: {error_message(error)}\n")
    stream.flush()
    return 1


def excepthook(exc_type, error, tb) -> None:
    """``sys.excepthook`` of command-line runs; interrupts keep Python's own report."""
    if not isinstance(error, Exception):
        sys.__excepthook__(exc_type, error, tb)
        return
    report(error)


def run_main(main: Callable[[], int | None]) -> int:
    """Call a script's ``main`` and turn its exceptions into :func:`report`'s short error (exit code 1)."""
    try:
        return int(main() or 0)
    except Exception as error:  # noqa: BLE001 - every failure ends as one clear line
        return report(error)


def _is_bundle_command_line() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in ("monai.bundle.__main__", "monai.bundle")


if _is_bundle_command_line():
    sys.excepthook = excepthook
