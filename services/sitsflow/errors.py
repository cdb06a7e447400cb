"""The error hierarchy and the exit codes an orchestrator acts on.

Exit codes: 0 done; 2 bad input or configuration (permanent: never retried);
75 transient infrastructure trouble (EX_TEMPFAIL: an orchestrator may retry); 1 a bug (an
exception that is not a SitsflowError: the CLI prints its traceback and asks for a report).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75
EXIT_BUG = 1


class SitsflowError(Exception):
    """Base class of every error sitsflow raises on purpose."""

    exit_code = 1


class BadInputError(SitsflowError, ValueError):
    """Bad input: a file, geometry, raster, model or value the user must fix (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInputError):
    """A configuration key, type or value is wrong (exit 2).

    The message names the full key path (``arg_train.deep_learning_parameters.epochs``), what was
    given and what is allowed, and where possible the file and line.
    """


class InputNotFoundError(BadInputError, FileNotFoundError):
    """A required input (file or object) does not exist (exit 2)."""


class TransientError(SitsflowError, OSError):
    """Infrastructure trouble that persisted after retries (exit 75: the orchestrator may retry)."""

    exit_code = EXIT_TRANSIENT
