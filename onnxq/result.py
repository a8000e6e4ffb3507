"""What ``onnxq.quantize`` returns: the output path, the model, and a summary a person can read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir


@dataclass(frozen=True)
class OutputFidelity:
    """Quantized vs fp32 on one model output, over the kept calibration samples."""

    name: str
    cosine: float
    sqnr_db: float
    max_abs_error: float


@dataclass(frozen=True)
class FloatNode:
    """A node onnxq left in float and why."""

    name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class QuantizationSummary:
    """Per-op-type counts, nodes left in float, sizes, and fidelity vs fp32."""

    quantized_nodes: dict[str, int]
    float_nodes: tuple[FloatNode, ...]
    size_before: int
    size_after: int
    calibration_samples: int
    fidelity: tuple[OutputFidelity, ...] = ()
    fidelity_samples: int = 0
    opset_upgraded_from: int | None = None
    smoothed: dict[str, float] = field(default_factory=dict)
    float_channels: dict[str, int] = field(default_factory=dict)  # MatMul input -> channels computed in float
    notes: tuple[str, ...] = field(default=())
    dynamic: bool = False  # activations quantized at run time; the samples served the fidelity check only

    @property
    def size_ratio(self) -> float:
        """Output size over input size."""
        return self.size_after / self.size_before if self.size_before else math.nan

    def to_text(self) -> str:
        """The summary as plain-text tables."""
        lines = ["quantized nodes", "  op type            count"]
        for op, n in self.quantized_nodes.items():
            lines.append(f"  {op:<18} {n:>5}")
        lines.append(f"  {'total':<18} {sum(self.quantized_nodes.values()):>5}")
        if self.float_nodes:
            reasons: dict[tuple[str, str], int] = {}
            for f in self.float_nodes:
                reasons[(f.op_type, f.reason)] = reasons.get((f.op_type, f.reason), 0) + 1
            lines.append("left in float")
            for (op, reason), n in sorted(reasons.items()):
                lines.append(f"  {op:<18} {n:>5}  {reason}")
        lines.append(
            f"size: {self.size_before / 1e6:.2f} MB -> {self.size_after / 1e6:.2f} MB "
            f"({100 * self.size_ratio:.1f}%)"
        )
        if self.dynamic:
            lines.append(
                "calibration: dynamic (activations quantized at run time); "
                f"{self.calibration_samples} samples used for the fidelity check only"
            )
        else:
            lines.append(f"calibration samples: {self.calibration_samples}")
        if self.smoothed:
            alphas = sorted(self.smoothed.values())
            lines.append(
                f"SmoothQuant: {len(self.smoothed)} MatMul inputs smoothed "
                f"(alpha {alphas[0]:.2f}..{alphas[-1]:.2f})"
            )
        if self.float_channels:
            lines.append(
                f"outlier channels computed in float: {sum(self.float_channels.values())} "
                f"(of {len(self.float_channels)} MatMul inputs)"
            )
        if self.opset_upgraded_from is not None:
            lines.append(f"opset upgraded from {self.opset_upgraded_from}")
        if self.fidelity:
            what = "samples" if self.dynamic else "calibration samples"
            lines.append(f"fidelity vs fp32 ({self.fidelity_samples} {what})")
            lines.append(f"  {'output':<28} {'cosine':>9} {'SQNR dB':>9} {'max abs err':>12}")
            for f in self.fidelity:
                lines.append(f"  {f.name:<28} {f.cosine:>9.5f} {f.sqnr_db:>9.2f} {f.max_abs_error:>12.4g}")
        lines.extend(self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class QuantizationResult:
    """The quantized model (``onnx_ir.Model``), where it was written (None if not), and its summary.

    When the model was written, its weights of 1 MiB or more are read from ``output_path`` on use
    (as :func:`onnxq.model_io.load_model` would read them) instead of staying in memory: replace or
    delete that file only once done with ``model``."""

    output_path: Path | None
    model: ir.Model
    summary: QuantizationSummary

    def __str__(self) -> str:
        head = f"onnxq: wrote {self.output_path}" if self.output_path else "onnxq: quantized model in memory"
        return head + "\n" + self.summary.to_text()
