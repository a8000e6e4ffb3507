"""Constant folding, through onnxscript's optimizer.

Guarantees: every node whose inputs are all constants (up to a size cap) is replaced by its value,
so weights reached through Transpose/Cast/Reshape chains become plain initializers the planner can
quantize. Model inputs, outputs and numerics are unchanged.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import fold_constants

# Large enough for weight Transposes of big models, small enough never to fold a whole model.
FOLD_SIZE_LIMIT = 1 << 26


class FoldConstants(ir.passes.InPlacePass):
    """Fold constant subgraphs into initializers (onnxscript's constant folder)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = fold_constants(model, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT)
        return ir.passes.PassResult(model, bool(result))
