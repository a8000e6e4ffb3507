"""Exceptions raised by onnxq.

Every error a user can cause derives from :class:`OnnxqError` and carries a one-line message that names
the problem and the fix. The CLI prints that line and exits with code 2.
"""

from __future__ import annotations


class OnnxqError(Exception):
    """Base class of every error onnxq raises on purpose."""


class ModelLoadError(OnnxqError):
    """The model could not be read: missing, unreadable, not ONNX, or corrupt."""


class ConfigError(OnnxqError):
    """The quantization config is invalid or asks for something unsupported."""


class CalibrationDataError(OnnxqError):
    """The calibration data does not match the model's inputs or holds unusable values."""


class OutputError(OnnxqError):
    """The output could not be written where it was asked for."""


class QuantizationError(OnnxqError):
    """The graph rewrite could not produce a valid model."""


class MissingDependencyError(OnnxqError):
    """An optional dependency is not installed (the message names the pip command that installs it)."""


class ExportError(OnnxqError):
    """A transformers model could not be exported to ONNX: unsupported architecture or task, or the
    exporter failed."""
