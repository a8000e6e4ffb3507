"""GELU as one op, for runtimes that run ``Gelu`` but not ``Erf`` (QNN-HTP).

Exporters write exact GELU as ``x * 0.5 * (1 + erf(x / sqrt(2)))``: Div (or Mul by 1/sqrt(2)),
Erf, Add 1, and two Muls in either association. ORT's QNN EP has no Erf, so every GELU of a
transformer would fall back to the CPU; ONNX ``Gelu`` (opset 20) computes the same function and HTP
runs it.

Guarantees: each complete erf-GELU pattern whose intermediate values feed nothing else is replaced
by one ``Gelu`` node (``approximate="none"``) producing the pattern's output value, so numerics
are those of exact GELU and names downstream are unchanged. Runs only on models at opset >= 20;
anything that does not match exactly is left as it is.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from onnxq.passes._util import constant_array

GELU_OPSET = 20


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node, given one of its inputs."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def _only_user(value: ir.Value, op_type: str) -> ir.Node | None:
    users = value.consumers()
    if len(users) != 1 or users[0].op_type != op_type or value.is_graph_output():
        return None
    return users[0]


def _close(x: float | None, y: float) -> bool:
    return x is not None and math.isclose(x, y, rel_tol=1e-3)


class FuseGelu(ir.passes.InPlacePass):
    """Replace ``x * 0.5 * (1 + erf(x / sqrt(2)))`` by ``Gelu(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def _match(self, erf: ir.Node) -> tuple[ir.Value, ir.Value, list[ir.Node]] | None:
        scaled = erf.inputs[0]
        pre = scaled.producer() if scaled is not None else None
        if pre is None or pre.op_type not in ("Div", "Mul") or _only_user(scaled, "Erf") is None:
            return None
        x, c = pre.inputs[0], _scalar(pre.inputs[1])
        if pre.op_type == "Div" and not _close(c, math.sqrt(2.0)):
            return None
        if pre.op_type == "Mul" and not _close(c, 1.0 / math.sqrt(2.0)):
            return None
        add = _only_user(erf.outputs[0], "Add")
        if add is None or not _close(_scalar(_other(add, erf.outputs[0])), 1.0):
            return None
        m1 = _only_user(add.outputs[0], "Mul")
        if m1 is None:
            return None
        other = _other(m1, add.outputs[0])
        nodes = [pre, erf, add, m1]
        if other is x:  # (x * (1 + erf)) * 0.5
            m2 = _only_user(m1.outputs[0], "Mul")
            if m2 is None or not _close(_scalar(_other(m2, m1.outputs[0])), 0.5):
                return None
            return x, m2.outputs[0], [*nodes, m2]
        if _close(_scalar(other), 0.5):  # ((1 + erf) * 0.5) * x
            m2 = _only_user(m1.outputs[0], "Mul")
            if m2 is None or _other(m2, m1.outputs[0]) is not x:
                return None
            return x, m2.outputs[0], [*nodes, m2]
        half = other.producer() if other is not None else None  # (x * 0.5) * (1 + erf)
        if (
            half is not None
            and half.op_type == "Mul"
            and _only_user(other, "Mul") is m1  # type: ignore[arg-type]
            and x in half.inputs
            and _close(_scalar(_other(half, x)), 0.5)  # type: ignore[arg-type]
        ):
            return x, m1.outputs[0], [*nodes, half]
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 0) < GELU_OPSET:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        for erf in [n for n in graph if n.op_type == "Erf" and n.domain in ("", "ai.onnx")]:
            if erf.graph is not graph:
                continue
            found = self._match(erf)
            if found is None:
                continue
            x, out, nodes = found
            gelu = ir.node("Gelu", [x], attributes={"approximate": "none"}, name=f"{erf.name}_Gelu")
            gelu.outputs[0].dtype, gelu.outputs[0].shape = out.dtype, out.shape
            graph.insert_after(nodes[-1], gelu)
            name = out.name
            if out.is_graph_output():
                graph.outputs[graph.outputs.index(out)] = gelu.outputs[0]
            out.replace_all_uses_with(gelu.outputs[0])
            graph.remove(nodes, safe=True)
            gelu.outputs[0].name = name
            self.fused += 1
        return ir.passes.PassResult(model, bool(self.fused))
