"""Calibration ranges of values computed inside If/Loop/Scan bodies.

A value inside a body cannot be a model output, so for calibration each wanted body value is
reduced to its scalar min and max inside the body, and the scalars are carried out, level by level,
as extra outputs of the body and of the node that owns it:

- ``If``: both branches gain the outputs; the branch that does not compute a value returns
  ``+inf``/``-inf`` for it, which the running min/max ignores;
- ``Loop``/``Scan``: per-iteration scan outputs, reduced again in the graph around the node (a loop
  that ran zero times gives ``+inf``/``-inf``).

Only the serialized copy handed to ONNX Runtime is edited, never the model being quantized. Body
values get MinMax ranges whatever the calibration method: histogram methods need whole
activations, which a body cannot return (a loop's iterations may differ in shape).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

# Names of the nodes added here start with this, so the segment splitter keeps each main-graph
# reduction with the node that feeds it (onnxq.segments.split's sidecars).
PREFIX = "onnxq_body"

Key = tuple[int, str]  # (id of the body graph, value name)


class _Names:
    def __init__(self, proto: onnx.ModelProto) -> None:
        self.taken = set()
        todo = [proto.graph]
        while todo:
            graph = todo.pop()
            self.taken.update(i.name for i in graph.input)
            self.taken.update(i.name for i in graph.initializer)
            for node in graph.node:
                self.taken.add(node.name)
                self.taken.update(node.output)
                todo.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        self.counter = itertools.count()

    def __call__(self, hint: str) -> str:
        while True:
            name = f"{PREFIX}_{next(self.counter)}_{hint}"
            if name not in self.taken:
                self.taken.add(name)
                return name


def _scalar_info(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [])


def _reduce_one(graph: onnx.GraphProto, value: str, op: str, names: _Names) -> str:
    """``op`` (ReduceMin/ReduceMax) of ``value`` over every axis, as a float scalar (an empty
    tensor gives ±inf)."""
    reduced, cast = names(op), names(f"{op}_float")
    graph.node.append(helper.make_node(op, [value], [reduced], name=reduced, keepdims=0))
    graph.node.append(helper.make_node("Cast", [reduced], [cast], name=cast, to=TensorProto.FLOAT))
    return cast


def _reduce(graph: onnx.GraphProto, value: str, names: _Names) -> tuple[str, str]:
    """The min and max of ``value`` as float scalars."""
    return _reduce_one(graph, value, "ReduceMin", names), _reduce_one(graph, value, "ReduceMax", names)


def _constant(graph: onnx.GraphProto, number: float, names: _Names) -> str:
    name = names("bound")
    graph.node.append(helper.make_node("Constant", [], [name], name=name, value_float=number))
    return name


def _attribute(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


def _expose(
    ir_graph: ir.Graph,
    graph: onnx.GraphProto,
    wanted: Mapping[int, Sequence[str]],
    names: _Names,
) -> list[tuple[Key, str, str]]:
    """Make the min/max scalars of every wanted value of ``ir_graph`` (serialized as ``graph``) and of
    its bodies values of ``graph``; returns ``(key, min value, max value)`` for each."""
    found = [((id(ir_graph), v), *_reduce(graph, v, names)) for v in wanted.get(id(ir_graph), ())]
    original = list(graph.node)[: len(ir_graph)]  # the nodes added above come last
    for ir_node, node in zip(ir_graph, original, strict=True):
        bodies = {
            name: attr.as_graph()
            for name, attr in ir_node.attributes.items()
            if attr.type == ir.AttributeType.GRAPH
        }
        if not bodies or node.domain not in ("", "ai.onnx"):
            continue
        inner = {
            name: _expose(body, _attribute(node, name).g, wanted, names) for name, body in bodies.items()
        }
        if not any(inner.values()):
            continue
        if node.op_type == "If":
            keys = [key for branch in ("then_branch", "else_branch") for key, _, _ in inner.get(branch, [])]
            for branch in ("then_branch", "else_branch"):
                body = _attribute(node, branch).g
                own = {key: (lo, hi) for key, lo, hi in inner.get(branch, [])}
                for key in keys:
                    lo, hi = own.get(key) or (
                        _constant(body, float("inf"), names),
                        _constant(body, float("-inf"), names),
                    )
                    body.output.extend([_scalar_info(lo), _scalar_info(hi)])
            for key in keys:
                lo, hi = names("if_min"), names("if_max")
                node.output.extend([lo, hi])
                found.append((key, lo, hi))
        elif node.op_type in ("Loop", "Scan") and "body" in inner:
            body = _attribute(node, "body").g
            for key, lo, hi in inner["body"]:
                body.output.extend([_scalar_info(lo), _scalar_info(hi)])
                per_iteration = [names("iterations_min"), names("iterations_max")]
                node.output.extend(per_iteration)
                if node.op_type == "Scan":
                    for attr in node.attribute:
                        if attr.name in ("scan_output_axes", "scan_output_directions"):
                            attr.ints.extend([0, 0])
                lo_all = _reduce_one(graph, per_iteration[0], "ReduceMin", names)
                hi_all = _reduce_one(graph, per_iteration[1], "ReduceMax", names)
                found.append((key, lo_all, hi_all))
    return found


def expose_ranges(
    model: ir.Model, proto: onnx.ModelProto, wanted: Mapping[int, Sequence[str]]
) -> dict[Key, tuple[str, str]]:
    """Edit ``proto`` (the serialized ``model``) so that every value in ``wanted`` (body graph id →
    value names) has its per-sample min and max as float scalar outputs of the main graph; returns
    ``(body id, value) → (min output, max output)``."""
    if not any(wanted.values()):
        return {}
    names = _Names(proto)
    found = _expose(
        model.graph, proto.graph, {k: v for k, v in wanted.items() if k != id(model.graph)}, names
    )
    for _, lo, hi in found:
        proto.graph.output.extend([_scalar_info(lo), _scalar_info(hi)])
    return {key: (lo, hi) for key, lo, hi in found}
