"""Calibration ranges (and SmoothQuant's per-channel statistics) of values inside If/Loop/Scan bodies.

A value inside a body cannot be a model output, so for calibration each wanted body value is
reduced inside the body — to its scalar min and max, or, for per-channel statistics, to the min,
max and sum of squares of each channel (last axis) and its element count — and the results are
carried out, level by level, as extra outputs of the body and of the node that owns it:

- ``If``: both branches gain the outputs; the branch that does not compute a value returns
  ``+inf``/``-inf`` for mins/maxes and 0 for sums and counts, which the running statistics ignore;
- ``Loop``/``Scan``: per-iteration scan outputs, reduced again in the graph around the node (a loop
  that ran zero times gives the same neutral values).

Only the serialized copy handed to ONNX Runtime is edited, never the model being quantized. Body
values get MinMax ranges whatever the calibration method: histogram methods need whole
activations, which a body cannot return (a loop's iterations may differ in shape).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

# Names of the nodes added here start with this, so the segment splitter keeps each main-graph
# reduction with the node that feeds it (onnxq.segments.split's sidecars).
PREFIX = "onnxq_body"

Key = tuple[int, str, int | None]  # (id of the body graph, value name, channels; None: its range)


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


@dataclass(frozen=True)
class _Stat:
    """One reduced statistic: its length (None: a scalar), what a branch that does not compute it
    returns, and how the per-iteration values of a loop are reduced again."""

    length: int | None
    neutral: float
    combine: str  # ReduceMin, ReduceMax or ReduceSum


_RANGE = (_Stat(None, float("inf"), "ReduceMin"), _Stat(None, float("-inf"), "ReduceMax"))


def _channel_stats(k: int) -> tuple[_Stat, ...]:
    return (
        _Stat(k, float("inf"), "ReduceMin"),
        _Stat(k, float("-inf"), "ReduceMax"),
        _Stat(k, 0.0, "ReduceSum"),
        _Stat(None, 0.0, "ReduceSum"),  # element count
    )


def _info(name: str, stat: _Stat) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [] if stat.length is None else [stat.length]
    )


class _Builder:
    """Appends reduction nodes to one serialized graph, with the model's opset rules for axes."""

    def __init__(self, graph: onnx.GraphProto, names: _Names, opset: int) -> None:
        self.graph, self.names, self.opset = graph, names, opset

    def node(self, op: str, inputs: list[str], hint: str, **attrs: object) -> str:
        out = self.names(hint)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def constant(self, stat: _Stat) -> str:
        if stat.length is None:
            return self.node("Constant", [], "bound", value_float=stat.neutral)
        value = helper.make_tensor("value", TensorProto.FLOAT, [stat.length], [stat.neutral] * stat.length)
        return self.node("Constant", [], "bound", value=value)

    def to_float(self, value: str) -> str:
        return self.node("Cast", [value], "float", to=TensorProto.FLOAT)

    def reduce(self, op: str, value: str, axis0: bool) -> str:
        """``op`` over every axis (a scalar), or over axis 0 only, without keeping dimensions."""
        if not axis0:
            return self.node(op, [value], op, keepdims=0)
        if self.opset >= (13 if op == "ReduceSum" else 18):
            axes = self.node("Constant", [], "axes", value_ints=[0])
            return self.node(op, [value, axes], op, keepdims=0)
        return self.node(op, [value], op, keepdims=0, axes=[0])

    def range_of(self, value: str) -> list[str]:
        return [self.to_float(self.reduce(op, value, False)) for op in ("ReduceMin", "ReduceMax")]

    def channels_of(self, value: str, k: int) -> list[str]:
        shape = self.node("Constant", [], "rows_shape", value_ints=[-1, k])
        rows = self.node("Reshape", [value, shape], "rows")
        stats = [
            self.to_float(self.reduce(op, rows, True)) for op in ("ReduceMin", "ReduceMax", "ReduceSumSquare")
        ]
        return [*stats, self.to_float(self.node("Size", [value], "size"))]


def _attribute(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


def _expose(
    ir_graph: ir.Graph,
    graph: onnx.GraphProto,
    wanted: Mapping[int, Sequence[tuple[str, int | None]]],
    names: _Names,
    opset: int,
) -> list[tuple[Key, tuple[_Stat, ...], list[str]]]:
    """Make the statistics of every wanted value of ``ir_graph`` (serialized as ``graph``) and of its
    bodies values of ``graph``: ``(name, None)`` its range, ``(name, k)`` its per-channel statistics
    (``k`` channels). Returns ``(key, statistics, value names)`` for each."""
    build = _Builder(graph, names, opset)
    found: list[tuple[Key, tuple[_Stat, ...], list[str]]] = []
    for value, k in wanted.get(id(ir_graph), ()):
        key = (id(ir_graph), value, k)
        if k is None:
            found.append((key, _RANGE, build.range_of(value)))
        else:
            found.append((key, _channel_stats(k), build.channels_of(value, k)))
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
            name: _expose(body, _attribute(node, name).g, wanted, names, opset)
            for name, body in bodies.items()
        }
        if not any(inner.values()):
            continue
        if node.op_type == "If":
            items = {
                key: stats
                for branch in ("then_branch", "else_branch")
                for key, stats, _ in inner.get(branch, [])
            }
            for branch in ("then_branch", "else_branch"):
                body = _attribute(node, branch).g
                own = {key: values for key, _, values in inner.get(branch, [])}
                filler = _Builder(body, names, opset)
                for key, stats in items.items():
                    values = own.get(key) or [filler.constant(stat) for stat in stats]
                    body.output.extend(_info(v, stat) for v, stat in zip(values, stats, strict=True))
            for key, stats in items.items():
                outputs = [names("if_stat") for _ in stats]
                node.output.extend(outputs)
                found.append((key, stats, outputs))
        elif node.op_type in ("Loop", "Scan") and "body" in inner:
            body = _attribute(node, "body").g
            for key, stats, values in inner["body"]:
                body.output.extend(_info(v, stat) for v, stat in zip(values, stats, strict=True))
                per_iteration = [names("iterations") for _ in stats]
                node.output.extend(per_iteration)
                if node.op_type == "Scan":
                    for attr in node.attribute:
                        if attr.name in ("scan_output_axes", "scan_output_directions"):
                            attr.ints.extend([0] * len(stats))
                combined = [
                    build.reduce(stat.combine, v, stat.length is not None)
                    for v, stat in zip(per_iteration, stats, strict=True)
                ]
                found.append((key, stats, combined))
    return found


def expose_statistics(
    model: ir.Model,
    proto: onnx.ModelProto,
    ranges: Mapping[int, Sequence[str]],
    channels: Mapping[int, Sequence[tuple[str, int]]] | None = None,
) -> tuple[dict[tuple[int, str], tuple[str, str]], dict[tuple[int, str], tuple[str, str, str, str]]]:
    """Edit ``proto`` (the serialized ``model``) so that every value in ``ranges`` (body graph id →
    value names) has its per-sample min and max as float scalar outputs of the main graph, and every
    ``(value, k)`` in ``channels`` its per-channel min, max and sum of squares (``[k]`` each) and its
    element count. Returns ``(body id, value) → (min, max)`` and ``→ (min, max, sumsq, count)``."""
    wanted: dict[int, list[tuple[str, int | None]]] = {}
    for body, values in ranges.items():
        wanted.setdefault(body, []).extend((v, None) for v in values)
    for body, pairs in (channels or {}).items():
        wanted.setdefault(body, []).extend(pairs)
    wanted.pop(id(model.graph), None)
    if not any(wanted.values()):
        return {}, {}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    found = _expose(model.graph, proto.graph, wanted, _Names(proto), opset)
    out_ranges: dict[tuple[int, str], tuple[str, str]] = {}
    out_channels: dict[tuple[int, str], tuple[str, str, str, str]] = {}
    for key, stats, values in found:
        proto.graph.output.extend(_info(v, stat) for v, stat in zip(values, stats, strict=True))
        if key[2] is None:
            out_ranges[key[:2]] = tuple(values)  # type: ignore[assignment]
        else:
            out_channels[key[:2]] = tuple(values)  # type: ignore[assignment]
    return out_ranges, out_channels
