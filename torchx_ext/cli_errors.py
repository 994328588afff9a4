"""One readable line instead of a traceback when the ``torchx`` CLI hits one of our errors.

The TorchX CLI only catches its own exception types; an unreachable cluster or an invalid option
would end in a Python traceback. Our schedulers call :func:`install` when they are created: it
changes nothing unless the process is the ``torchx`` CLI, and then only for torchx-ext's own
exceptions (:class:`~torchx_ext.errors.TorchxExtError`: they all say what was wrong and what is
valid). Engine and OS errors on our code paths reach it already translated into one of those by
the scheduler base (:mod:`torchx_ext.schedulers.base`); anything else (a bug, an error in user code
such as a component) keeps its traceback.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Optional, Type

from torchx.specs.api import UnknownAppException

from torchx_ext import compat, errors

# ours, and TorchX's own "no such app" (raised by the runner when our describe says None, e.g.
# `torchx log` of a deleted app): both are complete one-line answers, not bugs
_OURS = (errors.TorchxExtError, UnknownAppException)


def install() -> None:
    """Installs the hook once, in the torchx CLI only."""
    if not compat.is_torchx_cli() or getattr(sys.excepthook, "_torchx_ext", False):
        return
    previous = sys.excepthook

    def hook(tp: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
        if isinstance(value, _OURS):
            sys.stderr.write(f"torchx: error: {value}\n")
            sys.stderr.flush()
            return  # the interpreter still exits with status 1
        previous(tp, value, tb)

    previous_thread_hook = threading.excepthook

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        # `torchx log` reads logs in threads and re-raises their first error in the main thread,
        # where `hook` prints it once
        if isinstance(args.exc_value, _OURS):
            return
        previous_thread_hook(args)

    hook._torchx_ext = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    threading.excepthook = thread_hook
