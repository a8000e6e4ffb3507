"""Opset upgrade where quantization needs it.

Guarantees: a model whose default-domain opset is below ``MIN_OPSET`` (13: per-axis
QuantizeLinear/DequantizeLinear) is converted to it with onnxscript's version converter; newer
models are left as they are. The pass records the original opset in ``upgraded_from``.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript import version_converter

from onnxq.errors import QuantizationError

log = logging.getLogger(__name__)

MIN_OPSET = 13


class UpgradeOpset(ir.passes.InPlacePass):
    """Raise the default-domain opset to at least ``MIN_OPSET``."""

    def __init__(self) -> None:
        super().__init__()
        self.upgraded_from: int | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", MIN_OPSET))
        if version >= MIN_OPSET:
            return ir.passes.PassResult(model, False)
        try:
            version_converter.convert_version(model, MIN_OPSET, fallback=True)
        except Exception as exc:
            raise QuantizationError(
                f"the model's opset {version} is too old for per-channel QDQ and could not be upgraded "
                f"to {MIN_OPSET} ({exc}); re-export it with opset {MIN_OPSET} or newer"
            ) from None
        log.info("upgraded the model from opset %d to %d for per-channel QDQ", version, MIN_OPSET)
        self.upgraded_from = version
        return ir.passes.PassResult(model, True)
