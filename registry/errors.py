"""Every error the registry raises on purpose, each carrying the exit code the CLI returns.

Exit codes: 0 ok, 1 operation failed, 2 usage or bad input, 3 not found, 4 not allowed (a catalog server refused
the token), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FORBIDDEN = 4  # a catalog server (REGISTRY_URL) refused the token: missing, unknown, revoked, or its role
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, or `registry worker` stopped by a second signal


class RegistryError(Exception):
    """Base of all registry errors; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class OperationFailed(RegistryError):
    """The operation ran but did not succeed (verification mismatch, disk full, job failed)."""

    exit_code = EXIT_FAILED


class BadInput(RegistryError):
    """The request itself is wrong: bad folder, bad name, bad file, unknown kind."""

    exit_code = EXIT_USAGE


class AmbiguousRef(BadInput):
    """A digest prefix matches more than one artifact."""


class Conflict(BadInput):
    """The request contradicts what is registered (name taken, artifact still has children)."""


class NotFound(RegistryError):
    """An artifact, tag, job or path does not exist."""

    exit_code = EXIT_NOT_FOUND


class Forbidden(RegistryError):
    """The token's role does not allow this (HTTP 403 from `registry serve`)."""

    exit_code = EXIT_FORBIDDEN


class Unauthorized(Forbidden):
    """No token, or one the server does not know or has revoked (HTTP 401)."""


class DatabaseLocked(OperationFailed):
    """Another process held the database lock for longer than the busy timeout."""


class DatabaseUnavailable(OperationFailed):
    """The catalog database cannot be used: read-only, I/O error, damaged file, server unreachable."""


class WorkerStopped(BaseException):
    """A worker was told to stop now (a second signal, or its grace period ran out): re-queue the job.

    A BaseException, like KeyboardInterrupt, so a handler's `except Exception` cannot swallow it.
    """


class DiskFull(OperationFailed):
    """The store's file system ran out of space (ENOSPC)."""


class VerificationFailed(OperationFailed):
    """One or more files did not match the manifest."""


class JobCancelled(OperationFailed):
    """The job was cancelled while it ran."""


class LeaseLost(OperationFailed):
    """Another worker took over this job after our lease expired."""


def error_for(exit_code: int | None, message: str) -> RegistryError:
    """Rebuild an error from a recorded job's exit code and message (for jobs run elsewhere)."""
    cls = {EXIT_USAGE: BadInput, EXIT_NOT_FOUND: NotFound, EXIT_FORBIDDEN: Forbidden}.get(exit_code or EXIT_FAILED, OperationFailed)
    return cls(message)
