"""Opset upgrade where quantization needs it.

Guarantees: a model whose default-domain opset is below the required one (``MIN_OPSET`` = 13 for
per-axis QuantizeLinear/DequantizeLinear; ``OPSET_16BIT`` = 21 when 16-bit types are used) is
converted to it with onnxscript's version converter; newer models are left as they are. The pass
records the original opset in ``upgraded_from``. A model whose opset is newer than the installed
ONNX Runtime can quantize at (no QuantizeLinear/DequantizeLinear kernel for it) is refused here,
before any work, with the fix, instead of producing a file ORT cannot load.
"""

from __future__ import annotations

import functools
import logging

import onnx_ir as ir
from onnxscript import version_converter

from onnxq.errors import QuantizationError

log = logging.getLogger(__name__)

MIN_OPSET = 13
OPSET_16BIT = 21  # QuantizeLinear/DequantizeLinear with uint16/int16


@functools.cache
def runtime_runs_qdq(opset: int) -> bool:
    """Whether the installed ONNX Runtime's CPU EP loads a QuantizeLinear/DequantizeLinear pair at
    ``opset`` (a session on a two-node model; cached per opset)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("z", TensorProto.UINT8, [], [0]),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(onnx.IR_VERSION, 10)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


class UpgradeOpset(ir.passes.InPlacePass):
    """Raise the default-domain opset to at least ``min_opset``."""

    def __init__(self, min_opset: int = MIN_OPSET) -> None:
        super().__init__()
        self.min_opset = min_opset
        self.upgraded_from: int | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.min_opset
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", target))
        if not runtime_runs_qdq(max(version, target)):
            import onnxruntime as ort

            raise QuantizationError(
                f"the model's opset {version} is newer than onnxruntime {ort.__version__} runs "
                "QuantizeLinear/DequantizeLinear at; re-export it with an older opset or upgrade onnxruntime"
            )
        if version >= target:
            return ir.passes.PassResult(model, False)
        try:
            version_converter.convert_version(model, target, fallback=True)
        except Exception as exc:
            raise QuantizationError(
                f"the model's opset {version} is too old for the requested QDQ and could not be upgraded "
                f"to {target} ({exc}); re-export it with opset {target} or newer"
            ) from None
        log.info("upgraded the model from opset %d to %d for QDQ", version, target)
        self.upgraded_from = version
        return ir.passes.PassResult(model, True)
