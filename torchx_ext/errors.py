"""Exceptions. Each subclasses a built-in so callers can catch either (fsspec's habit)."""

from __future__ import annotations

from typing import Iterable


class InvalidAppError(ValueError):
    """The AppDef cannot run as given (empty roles, duplicate names, no entrypoint, ...)."""


class UnknownOptionError(ValueError):
    """A run option the scheduler does not have; the message lists the valid ones."""

    def __init__(self, scheduler: str, unknown: Iterable[str], valid: Iterable[str]) -> None:
        unknown = sorted(unknown)
        names = ", ".join(repr(u) for u in unknown)
        super().__init__(
            f"Unknown option{'s' if len(unknown) > 1 else ''} {names} for scheduler "
            f"'{scheduler}'. Valid options: {', '.join(sorted(valid))}"
        )


class DependencyError(ValueError):
    """A dependency that does not exist (or cannot be resolved) at submission."""


class SchedulerUnavailable(ConnectionError):
    """The backend (Ray dashboard, slurmctld, dockerd) cannot be reached."""


class UnknownExecutorError(LookupError):
    """No scheduler is registered for an executor (or no executor for a scheduler)."""


class MissingExtraError(ImportError):
    """An optional heavy dependency is missing; the message says which extra installs it."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"'{module}' is not installed; it is needed by this scheduler. "
            f"Install it with: pip install 'torchx-ext[{extra}]'"
        )
