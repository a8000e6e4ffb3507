"""onnxq: quantize ONNX models by rewriting their graphs, fast on the target by default.

``onnxq.export`` is the export function, which shadows the submodule of the same name (that stays in
``sys.modules["onnxq.export"]``); torch, transformers and optimum are imported only when it is called.
"""

from onnxq.config import (
    MSE,
    Entropy,
    MinMax,
    Percentile,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
)
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    ExportError,
    MissingDependencyError,
    ModelLoadError,
    OnnxqError,
    OutputError,
    QuantizationError,
)
from onnxq.export import export
from onnxq.pipeline import quantize
from onnxq.result import QuantizationResult, QuantizationSummary

__version__ = "0.1.0"

__all__ = [
    "MSE",
    "CalibrationDataError",
    "ConfigError",
    "Entropy",
    "ExportError",
    "MinMax",
    "MissingDependencyError",
    "ModelLoadError",
    "OnnxqError",
    "OutputError",
    "PerChannel",
    "PerTensor",
    "Percentile",
    "QuantConfig",
    "QuantSpec",
    "QuantizationError",
    "QuantizationResult",
    "QuantizationSummary",
    "SmoothQuant",
    "__version__",
    "export",
    "quantize",
]
