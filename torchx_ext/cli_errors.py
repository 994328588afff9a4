"""One readable line instead of a traceback when the ``torchx`` CLI hits one of our errors.

The TorchX CLI only catches its own exception types; an unreachable cluster or an invalid option
would end in a Python traceback. Our schedulers call :func:`install` when they are created: it
changes nothing unless the process is the ``torchx`` CLI, and then only for torchx-ext's own
exceptions (:class:`~torchx_ext.errors.TorchxExtError`: they all say what was wrong and what is
valid). Engine and OS errors on our code paths reach it already translated into one of those by
the scheduler base (:mod:`torchx_ext.schedulers.base`); anything else (a bug, an error in user code
such as a component) keeps its traceback.

Ctrl-C is the other case: interrupting ``torchx run --wait`` or ``torchx log --tail`` stops the
waiting, not the app (our apps are detached from the CLI on every backend). Instead of a
KeyboardInterrupt traceback the CLI says so in one line, naming the app's handle and the command
that cancels it.

Not covered: ``torchx status nope`` (a malformed handle) fails in TorchX's own handle parser before
any scheduler exists, so before this hook is installed; TorchX prints that traceback itself.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Optional, Type

from torchx.specs.api import UnknownAppException, parse_app_handle

from torchx_ext import compat, errors
from torchx_ext._builtin_entry_points import OURS

# ours, and TorchX's own "no such app" (raised by the runner when our describe says None, e.g.
# `torchx log` of a deleted app): both are complete one-line answers, not bugs
_OURS = (errors.TorchxExtError, UnknownAppException)


def install() -> None:
    """Installs the hook once, in the torchx CLI only."""
    if not compat.is_torchx_cli() or getattr(sys.excepthook, "_torchx_ext", False):
        return
    previous = sys.excepthook

    def hook(tp: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
        if isinstance(value, KeyboardInterrupt):
            sys.stderr.write(interrupted_message(interrupted_handle(tb)) + "\n")
            sys.stderr.flush()
            return  # the interpreter still ends by SIGINT (exit status 130 in a shell)
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

    hook._torchx_ext = True  # type: ignore[attr-defined]  # noqa: SLF001 - our own mark on our own function
    sys.excepthook = hook
    threading.excepthook = thread_hook


def interrupted_handle(tb: Optional[TracebackType]) -> Optional[str]:
    """The handle of our app that the interrupted CLI command was waiting for, if any.

    TorchX's CLI keeps it in the ``app_handle`` argument of the calls it was in when interrupted
    (``Runner.wait``/``status``/``describe``/``log_lines``, ``cmd_run._wait_and_exit``,
    ``cmd_log.get_logs``), in 0.7.0 and in the nightly alike; the innermost one wins.
    """
    found = None
    while tb is not None:
        handle = tb.tb_frame.f_locals.get("app_handle")
        if isinstance(handle, str) and is_our_handle(handle):
            found = handle
        tb = tb.tb_next
    return found


def is_our_handle(handle: str) -> bool:
    try:
        return parse_app_handle(handle)[0] in OURS
    except Exception:  # noqa: BLE001 - TorchX raises several types for a malformed handle: not ours either way
        return False


def interrupted_message(handle: Optional[str]) -> str:
    if handle is None:
        return "torchx: interrupted"
    return (f"torchx: interrupted; the app keeps running: {handle} "
            f"(see it with: torchx status {handle}; cancel it with: torchx cancel {handle})")
