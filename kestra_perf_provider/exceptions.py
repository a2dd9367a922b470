"""
Exceptions of the provider.

Every class takes a single message, so instances pickle and cross process boundaries unchanged, and
each message names the offending value and the fix.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class NamespaceFilesError(AirflowException):
    """Base class of namespace-file staging errors."""


class NamespaceFilesConfigError(NamespaceFilesError, ValueError):
    """An option of ``[namespace_files]`` or an operator argument has an invalid value."""


class InvalidNamespaceError(NamespaceFilesError, ValueError):
    """A namespace URL cannot be used: unknown protocol, relative path or a missing filesystem package."""


class NamespaceNotFoundError(NamespaceFilesError, FileNotFoundError):
    """A namespace root does not exist in its storage."""


class UnknownConnectionError(NamespaceFilesError, LookupError):
    """A namespace names an Airflow connection id that is not defined."""


class UnsafePathError(NamespaceFilesError, ValueError):
    """An object key would be written outside the task's working directory."""


class FileConflictError(NamespaceFilesError, FileExistsError):
    """A planned file collides with an existing file or with a folder of the same name."""


class StagingError(NamespaceFilesError, OSError):
    """A file could not be downloaded; the message names the file, its namespace and the cause."""
