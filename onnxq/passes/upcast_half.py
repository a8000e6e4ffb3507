"""float16 / bfloat16 models are quantized through float32.

Guarantees: every fp16/bf16 initializer, Cast target and ``ConstantOfShape`` value in the graph (and
its subgraphs) becomes float32, so calibration runs on ONNX Runtime's CPU kernels (most of which are
float32-only) and QuantizeLinear/DequantizeLinear get float32 scales at any opset. The interface is
kept: a half-precision model input is read through a ``Cast`` to float32 and a half-precision model
output is produced by a ``Cast`` back, under the same names and dtypes. The nodes left in float then
compute in float32, which on CPUs is also the faster type. ``upcast`` records what was converted.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes._util import Namer

log = logging.getLogger(__name__)

HALF = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _float32(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)


class UpcastHalf(ir.passes.InPlacePass):
    """Turn a float16/bfloat16 model into a float32 one with the same inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.upcast: str | None = None  # the half type that was converted, for the summary

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        found: set[ir.DataType] = set()
        half_outputs = {i: v.dtype for i, v in enumerate(graph.outputs) if v.dtype in HALF}
        for g in model.graphs():
            for value in g.initializers.values():
                if value.const_value is not None and value.const_value.dtype in HALF:
                    found.add(value.const_value.dtype)
                    value.const_value = _float32(value.const_value)
                    value.dtype = ir.DataType.FLOAT
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.outputs:
                if value.dtype in HALF:
                    found.add(value.dtype)
                    value.dtype = ir.DataType.FLOAT
            to = node.attributes.get("to")
            if node.op_type == "Cast" and to is not None and ir.DataType(to.as_int()) in HALF:
                found.add(ir.DataType(to.as_int()))
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
            for key, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype in HALF:
                    found.add(attr.as_tensor().dtype)
                    node.attributes[key] = ir.AttrTensor(key, _float32(attr.as_tensor()))
        namer = Namer(graph)
        for value in list(graph.inputs):
            if value.dtype in HALF and value.const_value is None:
                found.add(value.dtype)
                cast = ir.node(
                    "Cast", [value], attributes={"to": ir.DataType.FLOAT}, name=namer(f"{value.name}_upcast")
                )
                cast.outputs[0].name = namer(f"{value.name}_float32")
                cast.outputs[0].dtype = ir.DataType.FLOAT
                cast.outputs[0].shape = value.shape
                for user, index in list(value.uses()):  # a passthrough model output stays as it is
                    if user is not cast:
                        user.replace_input_with(index, cast.outputs[0])
                if len(graph):
                    graph.insert_before(graph[0], cast)
                else:
                    graph.append(cast)
        for index, original in half_outputs.items():
            value = graph.outputs[index]
            if value.is_graph_input():
                continue
            name = value.name
            value.name = namer(f"{name}_float32")
            cast = ir.node("Cast", [value], attributes={"to": original}, name=namer(f"{name}_downcast"))
            cast.outputs[0].name = name
            cast.outputs[0].dtype = original
            cast.outputs[0].shape = value.shape
            graph.append(cast)
            graph.outputs[index] = cast.outputs[0]
        if not found:
            return ir.passes.PassResult(model, False)
        if len(found) > 1:
            log.info("the model mixes float16 and bfloat16; outputs keep %s", sorted(t.name for t in found))
        self.upcast = sorted(t.name.lower() for t in found)[0]
        log.info("%s model: quantized through float32, inputs and outputs keep their dtype", self.upcast)
        return ir.passes.PassResult(model, True)
