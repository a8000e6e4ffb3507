"""ONNX shape inference, with data propagation only where it works.

onnx's data propagation fails on ``If`` branches that reuse each other's value names ("Data for
input 0 already exists") — which merged decoder exports do, their two branches being two exports
of one model — and onnx_ir's pass then leaves the whole model without types. Models with
subgraphs are therefore inferred without data propagation (types and shapes, not the values of
shape arithmetic); every other model with it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


class InferShapes(ShapeInferencePass):
    """onnx shape inference; data propagation unless the model has If/Loop/Scan bodies."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.data_prop = next(iter(model.graph.subgraphs()), None) is None
        return super().call(model)
