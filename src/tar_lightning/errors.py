"""The library's own error types.

Every error a user can cause with bad input (a recipe key, a file, a value) is raised as one of these, with a
message that names the offending key, file or value and says what was expected. The CLI turns them into a
one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations


class TARLightningError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(TARLightningError, ValueError):
    """A configuration value (recipe key, constructor argument) is invalid."""


class DataError(TARLightningError, ValueError):
    """A data source is missing, malformed, or lacks a configured field."""


class ModelLoadError(TARLightningError, ValueError):
    """A model source cannot be resolved or loaded."""


class CheckpointWriteError(TARLightningError, OSError):
    """A checkpoint or result file could not be written (the previous file at that path is left untouched)."""


class NonFiniteError(TARLightningError, RuntimeError):
    """Training produced NaN/Inf: too many skipped outer steps in a row, or non-finite weights to save."""


class ExportError(TARLightningError, ValueError):
    """A model cannot be exported: non-finite weights, a non-serializable quantized model, or a failed write."""
