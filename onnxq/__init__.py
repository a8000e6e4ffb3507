"""onnxq: quantize ONNX models by rewriting their graphs, fast on the target by default."""

from onnxq.config import MinMax, PerChannel, PerTensor, QuantConfig, QuantSpec
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    ModelLoadError,
    OnnxqError,
    OutputError,
    QuantizationError,
)
from onnxq.pipeline import quantize
from onnxq.result import QuantizationResult, QuantizationSummary

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "ConfigError",
    "MinMax",
    "ModelLoadError",
    "OnnxqError",
    "OutputError",
    "PerChannel",
    "PerTensor",
    "QuantConfig",
    "QuantSpec",
    "QuantizationError",
    "QuantizationResult",
    "QuantizationSummary",
    "__version__",
    "quantize",
]
