"""Small builders shared by the tests: single-op ONNX models and graph inspection helpers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


def tensor_info(name: str, dtype: int = TensorProto.FLOAT, shape: Sequence | None = None):
    return helper.make_tensor_value_info(name, dtype, shape)


def make_model(
    nodes: Iterable[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = OPSET,
    infer: bool = True,
) -> onnx.ModelProto:
    """A checked single-graph model, with inferred value types unless ``infer`` is false."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        list(inputs),
        list(outputs),
        [numpy_helper.from_array(np.asarray(a), name) for name, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True) if infer else model


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model)


def session(model: onnx.ModelProto | ir.Model | str, **kwargs) -> ort.InferenceSession:
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    model = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"], **kwargs)


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def op_types(model: onnx.ModelProto | ir.Model) -> list[str]:
    if isinstance(model, ir.Model):
        return [n.op_type for n in model.graph]
    return [n.op_type for n in model.graph.node]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def weight_source(model: onnx.ModelProto, node: onnx.NodeProto, index: int = 1):
    """For a node input fed ``DequantizeLinear(initializer)``: ``(dq_node, int_array)``; else None."""
    prod = producers(model).get(node.input[index])
    inits = initializers(model)
    if prod is None or prod.op_type != "DequantizeLinear" or prod.input[0] not in inits:
        return None
    return prod, inits[prod.input[0]]


def matmul_model(w: np.ndarray, opset: int = 18) -> onnx.ModelProto:
    """``y = x @ w`` with ``x`` of symbolic batch and ``w`` an initializer."""
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def counted(items: Iterable, seen: list) -> Iterator:
    """``items`` as a generator that appends to ``seen`` each time it hands one out."""
    for item in items:
        seen.append(1)
        yield item
