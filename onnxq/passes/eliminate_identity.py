"""Identity nodes removed, graph outputs kept.

onnx_ir's ``IdentityEliminationPass``, except that an ``Identity`` copying one output of a graph
into another is kept: removing it would list one value twice among the outputs and drop an output's
name (a model output renamed; in a Scan body, the state and the scan output then share one value,
which ONNX Runtime does not run correctly).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass


class EliminateIdentity(IdentityEliminationPass):
    """Remove ``Identity`` nodes except those between two outputs of their graph."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if node.op_type == "Identity" and len(node.inputs) == 1 else None
        if source is not None and source.is_graph_output() and node.outputs[0].is_graph_output():
            return False
        return super()._try_eliminate_identity_node(node)
