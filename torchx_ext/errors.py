"""Exceptions. Everything torchx-ext raises on purpose is a :class:`TorchxExtError`.

Each class also subclasses the matching built-in (fsspec's habit), so callers can catch either:
``except ValueError`` keeps working for an invalid app, ``except ConnectionError`` for an
unreachable cluster, ``except TorchxExtError`` for anything of ours. The ``torchx`` CLI prints
any of them as one line (:mod:`torchx_ext.cli_errors`).
"""

from __future__ import annotations

import difflib
from typing import Iterable


class TorchxExtError(Exception):
    """Base of every error torchx-ext raises; its message says what was wrong and what is valid."""


class InvalidAppError(TorchxExtError, ValueError):
    """The AppDef cannot run as given (empty roles, duplicate names, no entrypoint, ...)."""


class UnknownOptionError(TorchxExtError, ValueError):
    """A run option the scheduler does not have; the message lists the valid ones."""

    def __init__(self, scheduler: str, unknown: Iterable[str], valid: Iterable[str]) -> None:
        names_sorted = sorted(unknown)
        valid_sorted = sorted(valid)
        names = ", ".join(repr(u) for u in names_sorted)
        close = [m for u in names_sorted for m in difflib.get_close_matches(u, valid_sorted, n=1)]
        hint = f" (did you mean {', '.join(repr(m) for m in close)}?)" if close else ""
        super().__init__(
            f"Unknown option{'s' if len(names_sorted) > 1 else ''} {names} for scheduler "
            f"'{scheduler}'{hint}. Valid options: {', '.join(valid_sorted)}"
        )


class InvalidOptionError(TorchxExtError, ValueError):
    """A run option with a value the scheduler cannot use; the message lists the valid values."""


class DependencyError(TorchxExtError, ValueError):
    """A dependency that does not exist (or cannot be resolved) at submission."""


class UnknownAppError(TorchxExtError, ValueError):
    """An app id (or a replica of it, for ``log``) that the scheduler does not know."""


class SchedulerUnavailable(TorchxExtError, ConnectionError):
    """The backend (Ray dashboard, slurmctld, dockerd) cannot be reached."""


class BackendError(TorchxExtError, RuntimeError):
    """The backend answered, and refused: sbatch rejected the job, the Docker API said no, ..."""


class StateError(TorchxExtError, OSError):
    """Local state under ``$TORCHX_EXT_HOME`` cannot be written (unwritable, full)."""


class UnknownExecutorError(TorchxExtError, LookupError):
    """No scheduler is registered for an executor (or no executor for a scheduler)."""


class RegistrationError(TorchxExtError, ValueError):
    """An executor registration that would silently replace another one."""


class MissingExtraError(TorchxExtError, ImportError):
    """An optional heavy dependency is missing; the message says which extra installs it."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"'{module}' is not installed; it is needed by this scheduler. "
            f"Install it with: pip install 'torchx-ext[{extra}]'"
        )
