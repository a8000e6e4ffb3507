"""Opset upgrade where quantization needs it.

Guarantees: a model whose default-domain opset is below the required one (``MIN_OPSET`` = 13 for
per-axis QuantizeLinear/DequantizeLinear; ``OPSET_16BIT`` = 21 when 16-bit types are used) is
converted to it with onnxscript's version converter; newer models are left as they are. The pass
records the original opset in ``upgraded_from``.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript import version_converter

from onnxq.errors import QuantizationError

log = logging.getLogger(__name__)

MIN_OPSET = 13
OPSET_16BIT = 21  # QuantizeLinear/DequantizeLinear with uint16/int16


class UpgradeOpset(ir.passes.InPlacePass):
    """Raise the default-domain opset to at least ``min_opset``."""

    def __init__(self, min_opset: int = MIN_OPSET) -> None:
        super().__init__()
        self.min_opset = min_opset
        self.upgraded_from: int | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.min_opset
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", target))
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
