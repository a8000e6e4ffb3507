"""Identity nodes removed, graph outputs kept.

onnx_ir's ``IdentityEliminationPass``, except that two kinds of ``Identity`` are kept:

- one copying an output of a graph into another: removing it would list one value twice among the
  outputs and drop an output's name (a model output renamed; in a Scan body, the state and the scan
  output then share one value, which ONNX Runtime does not run correctly);
- one in an If/Loop/Scan body that returns a value of an outer graph: a body output must be made in
  the body (ONNX Runtime refuses "an outer scope value being returned directly").
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass


def _defined_in(value: ir.Value, graph: ir.Graph | None) -> bool:
    """Whether ``value`` is made by a node of ``graph``, or is one of its inputs or initializers."""
    producer = value.producer()
    if producer is not None:
        return producer.graph is graph
    return graph is not None and (value in graph.inputs or graph.initializers.get(value.name or "") is value)


class EliminateIdentity(IdentityEliminationPass):
    """Remove ``Identity`` nodes except those the module docstring lists."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if node.op_type == "Identity" and len(node.inputs) == 1 else None
        if (
            source is not None
            and node.outputs[0].is_graph_output()
            and (source.is_graph_output() or not _defined_in(source, node.graph))
        ):
            return False
        return super()._try_eliminate_identity_node(node)
