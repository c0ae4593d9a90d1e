"""Exceptions raised by transferkit.

Every exception carries a one-line, user-facing message: what was wrong, where (file, row,
field) and what to do about it. The CLI prints ``str(error)`` and exits non-zero.

An error is ``transient`` when the same call may well succeed a little later (a connection
lost, a store or server answering 5xx or "slow down"); whoever raises it says so, because
only there is the cause known. Steps retry transient errors (``transferkit.retry``) and fail
at once on every other: bad input does not get better by running it again.
"""

from __future__ import annotations

# Longest message kept: a message that quotes an input (a value, a name) must not grow with
# it. Its start (what and where) and its end (the fix) are kept.
MAX_MESSAGE_CHARS = 2000


def clip(text: str, limit: int) -> str:
    """``text`` cut in the middle to at most ``limit`` characters, its start (what and where)
    and its end (the fix) kept."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]} … {text[-half:]}"


class TransferkitError(Exception):
    """Base class: a failure with a one-line, bounded message meant for the user."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        # One line, always: multi-line causes are folded so logs and CLIs stay readable.
        text = str(message)
        if len(text) > 2 * MAX_MESSAGE_CHARS:  # bound the folding's work too
            text = f"{text[:MAX_MESSAGE_CHARS]} {text[-MAX_MESSAGE_CHARS:]}"
        super().__init__(clip(" ".join(text.split()), MAX_MESSAGE_CHARS))
        self.transient = transient


class ConfigError(TransferkitError):
    """The configuration file or an override is invalid."""


class DataError(TransferkitError):
    """The target dataset cannot be read or fails validation."""


class StorageError(TransferkitError):
    """A URI cannot be resolved, read or written (local files, S3)."""


class BackboneError(TransferkitError):
    """The pre-trained backbone is missing, unsafe or inconsistent."""


class TrainingError(TransferkitError):
    """Training could not produce a model (diverged, no usable data)."""


class RegistryError(TransferkitError):
    """MLflow tracking or registration failed."""


class RunInterruptedError(TransferkitError):
    """SIGINT or SIGTERM stopped ``transferkit run`` and every process it had started."""

    def __init__(self, message: str, signum: int = 15) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + self.signum


class Terminated(SystemExit):
    """SIGTERM arrived: Kubernetes, docker or systemd is stopping the step.

    Raised in the main thread by ``transferkit.termination.sigterm_raises`` so that ``finally``
    blocks and context managers release what they hold. Not an ``Exception`` (as
    KeyboardInterrupt is not), so no ``except Exception`` swallows it; uncaught, the process
    exits quietly with status 143 (128 + SIGTERM), as a terminated process does.
    """

    def __init__(self, message: str) -> None:
        super().__init__(143)
        self.message = " ".join(message.split())

    def __str__(self) -> str:
        return self.message
