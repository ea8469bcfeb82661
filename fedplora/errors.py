"""The errors fedplora raises on purpose, under one base class.

Each one's message is a single line that names what is wrong and how to fix it, so the CLI
reports any ``FedploraError`` as ``fedplora: error: <message>`` (exit code 2) and never as a
traceback. Anything else that escapes is a bug and keeps its traceback.

They also subclass ``ValueError``, as they did before this module existed, so code that
catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class FedploraError(Exception):
    """A problem the user can fix; the message is one line saying what and how."""


class ConfigError(FedploraError, ValueError):
    """A setting is wrong; the message names it."""


class DataError(FedploraError, ValueError):
    """Data or model files are missing or malformed; the message names the file and the fix."""


class CheckpointError(FedploraError, ValueError):
    """A checkpoint is missing, corrupt or from another run; the message names the file and why."""


class UpdateRejected(FedploraError, ValueError):
    """A client's update failed validation; it is never aggregated."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "FedploraError", "UpdateRejected"]
