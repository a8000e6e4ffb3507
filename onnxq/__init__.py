"""onnxq: quantize ONNX models by rewriting their graphs, fast on the target by default.

``onnxq.export``, ``onnxq.validate`` and ``onnxq.diff`` are functions that shadow the submodules of
the same names (those stay in ``sys.modules``); torch, transformers and optimum are imported only when
``export`` is called.
"""

from onnxq.config import (
    AWQ,
    GPTQ,
    MSE,
    BiasCorrection,
    Codebook,
    CrossLayerEqualization,
    Dynamic,
    Entropy,
    MinMax,
    PerBlock,
    Percentile,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
)
from onnxq.diff import DiffReport, diff
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
from onnxq.mixed_precision import MixedPrecision, MixedPrecisionResult, quantize_mixed
from onnxq.pipeline import quantize
from onnxq.result import QuantizationResult, QuantizationSummary
from onnxq.validate import Tolerances, ValidationReport, validate

__version__ = "0.1.0"

__all__ = [
    "AWQ",
    "GPTQ",
    "MSE",
    "BiasCorrection",
    "CalibrationDataError",
    "Codebook",
    "ConfigError",
    "CrossLayerEqualization",
    "DiffReport",
    "Dynamic",
    "Entropy",
    "ExportError",
    "MinMax",
    "MissingDependencyError",
    "MixedPrecision",
    "MixedPrecisionResult",
    "ModelLoadError",
    "OnnxqError",
    "OutputError",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "Percentile",
    "QuantConfig",
    "QuantSpec",
    "QuantizationError",
    "QuantizationResult",
    "QuantizationSummary",
    "SmoothQuant",
    "Tolerances",
    "ValidationReport",
    "__version__",
    "diff",
    "export",
    "quantize",
    "quantize_mixed",
    "validate",
]
