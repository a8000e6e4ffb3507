"""int8 activation zero points of 0 given by ``output_dtype`` instead of an input, at opset ≥ 21.

ONNX Runtime's CPU EP (1.32 and before) moves an activation's Q/DQ pair across a Reshape or
Transpose it inserts (a static-shape N-D ``MatMul`` + bias becomes Reshape → Gemm → Reshape), then
turns int8 activation pairs into uint8 ones. On opset-21 ``QuantizeLinear`` nodes the moved copy keeps
``output_dtype=INT8`` while its zero point becomes UINT8, and the session fails to load ("output_dtype
INT8 does not match y_zero_point type UINT8"). That rewrite leaves pairs without a zero-point input
alone. A missing zero point is 0 of the output type, so the model computes exactly what it did.

Guarantees: only activation pairs change (a ``QuantizeLinear`` whose every reader is a
``DequantizeLinear`` with the same scalar int8 zero point of 0), in every graph including If/Loop/Scan
bodies; the zero-point initializers left unread are removed. Models below opset 21 are unchanged
(``output_dtype`` does not exist there, and a missing zero point would mean uint8).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MIN_OPSET = 21


def _zero_int8(value: ir.Value | None) -> bool:
    if value is None or value.const_value is None or not value.is_initializer():
        return False
    array = value.const_value.numpy()
    return array.dtype == np.int8 and array.shape == () and int(array) == 0


class ImplicitZeroPoints(ir.passes.InPlacePass):
    """Drop the int8 zero points of 0 of activation Q/DQ pairs at opset ≥ 21 (see the module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 0) < MIN_OPSET:
            return ir.passes.PassResult(model, False)
        dropped: dict[int, ir.Value] = {}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.inputs) != 3 or not _zero_int8(node.inputs[2]):
                continue
            readers = [u.node for u in node.outputs[0].uses()]
            if node.outputs[0].is_graph_output() or not all(
                r.op_type == "DequantizeLinear" and len(r.inputs) == 3 and _zero_int8(r.inputs[2])
                for r in readers
            ):
                continue
            for q_or_dq in (node, *readers):
                dropped[id(q_or_dq.inputs[2])] = q_or_dq.inputs[2]  # type: ignore[index]
                q_or_dq.resize_inputs(2)
            node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", ir.DataType.INT8)
        for value in dropped.values():
            if not value.uses() and not value.is_graph_output() and value.graph is not None:
                value.graph.initializers.pop(value.name, None)
        return ir.passes.PassResult(model, bool(dropped))
