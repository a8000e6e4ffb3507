"""Weights stored as integers: every QuantizeLinear of a constant becomes an integer initializer.

Guarantees: after this pass no QuantizeLinear reads a constant; each such Q is replaced by an
int8/uint8 initializer computed exactly as ONNX QuantizeLinear would (round half to even,
saturation), feeding the existing DequantizeLinear nodes. The float weight is dropped when nothing
else uses it; a weight shared with float consumers keeps its original name and value.
Weights are processed one at a time and file-backed ones are unmapped after use.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.passes._util import Namer, SpillFile, add_initializer, constant_array, release
from onnxq.qmath import quantize


class PrequantizeWeights(ir.passes.InPlacePass):
    """Fold QuantizeLinear(constant) into an integer initializer; with ``spill``, each integer weight
    of 1 MiB or more moves to that file as soon as it is made.

    The integer initializer goes to the graph that owns the float one, so an outer-scope weight
    quantized inside If/Loop/Scan bodies is stored once, in the outer graph (ONNX Runtime fuses
    QDQ groups that read it from there); a pass instance run on several bodies reuses it for every
    QuantizeLinear of the same weight with the same parameters."""

    def __init__(self, spill: SpillFile | None = None) -> None:
        super().__init__()
        self.spill = spill
        self._made: dict[tuple[int, bytes, bytes, int | None], ir.Value] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        modified = False
        for node in list(graph):
            if node.op_type != "QuantizeLinear":
                continue
            weight = node.inputs[0]
            array = constant_array(weight)
            scale = constant_array(node.inputs[1])
            zero_point = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
            if array is None or scale is None or zero_point is None:
                continue
            axis = node.attributes.get_int("axis", 1) if scale.ndim == 1 and scale.size > 1 else None
            if axis is not None and axis < 0:
                axis += array.ndim
            owner = weight.graph if weight.graph is not None else graph
            key = (id(weight), scale.tobytes(), zero_point.tobytes() + zero_point.dtype.str.encode(), axis)
            q_value = self._made.get(key) if owner is not graph else None
            if q_value is None:
                flat = array.reshape(-1) if array.ndim == 0 else array  # numpy's out= needs an array, not 0-d
                q = quantize(flat, scale, zero_point, axis).reshape(array.shape)
                del flat
                q_value = add_initializer(owner, namer(f"{weight.name}_quantized"), q)
                del q
                if self.spill is not None:
                    self.spill.take(q_value)
                if owner is not graph:
                    self._made[key] = q_value
            del array  # no view of the mapped weight may outlive it, or it cannot be unmapped
            release(weight)
            node.outputs[0].replace_all_uses_with(q_value)
            graph.remove(node, safe=True)
            if not weight.uses() and not weight.is_graph_output() and weight.name in owner.initializers:
                owner.initializers.pop(weight.name)
            modified = True
        return ir.passes.PassResult(model, modified)
