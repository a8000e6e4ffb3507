"""Finite attention-mask sentinels, for runtimes that must quantize the mask path (QNN-HTP).

Transformer exports build additive attention masks as ``(1 - mask) * float32.min`` or
``Where(mask, float32.min, 0)``: the sentinel reaches -3.4e38, which no calibrated scale can hold
(the Add that applies the mask would lose every score). Where the mask path has to be quantized,
the sentinel is replaced by a large-but-finite value: ``exp(-1e4)`` is exactly 0 in float32, so the
softmax still ignores masked positions while the mask's range stays quantizable.

Guarantees: every float initializer holding a value of magnitude ``>= SENTINEL_MAGNITUDE`` (1e9) or
an infinity gets those entries replaced by ``±value`` (sign kept); nothing else changes. ``replaced``
lists the initializers changed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.plan import FLOAT_TYPES, SENTINEL_MAGNITUDE

# Larger initializers are weights, not mask constants: never scanned.
_MAX_SCAN = 1 << 16


class FiniteMaskSentinels(ir.passes.InPlacePass):
    """Replace sentinel-sized constants (attention masks' float32.min) by ``±value``."""

    def __init__(self, value: float = 1e4) -> None:
        super().__init__()
        self.value = value
        self.replaced: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for name, init in model.graph.initializers.items():
            tensor = init.const_value
            if tensor is None or init.dtype not in FLOAT_TYPES or tensor.size > _MAX_SCAN:
                continue
            array = tensor.numpy()
            big = np.abs(array.astype(np.float64)) >= SENTINEL_MAGNITUDE
            if not big.any():
                continue
            fixed = np.where(big, np.sign(array) * self.value, array).astype(array.dtype)
            init.const_value = ir.Tensor(fixed, name=name)
            self.replaced.append(name)
        return ir.passes.PassResult(model, bool(self.replaced))
