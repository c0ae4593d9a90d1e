"""Exceptions raised by transferkit.

Every exception carries a one-line, user-facing message: what was wrong, where (file, row,
field) and what to do about it. The CLI prints ``str(error)`` and exits non-zero; KFP
components let them propagate so that the retry policy sees real failures.
"""

from __future__ import annotations


class TransferkitError(Exception):
    """Base class: a failure with a one-line message meant for the user."""

    def __init__(self, message: str) -> None:
        # One line, always: multi-line causes are folded so logs and CLIs stay readable.
        super().__init__(" ".join(str(message).split()))


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
