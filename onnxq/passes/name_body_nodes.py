"""Unnamed nodes inside If/Loop/Scan bodies named uniquely across the model.

onnx_ir's ``NameFixPass`` names unnamed nodes graph by graph ("node", "node_1", ...), so a body's
first unnamed node and the main graph's get the same name; the plans, which key nodes by name across
every graph, would then mix them up (a body MatMul taking the decision made for a main-graph Relu).
Guarantees: every unnamed node of a body gets ``<op type>`` or ``<op type>_<n>``, a name used
nowhere else in the model; named nodes and main-graph nodes are left as they are. Run before
``NameFixPass``.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.passes._util import Namer


class NameBodyNodes(ir.passes.InPlacePass):
    """Give unnamed body nodes model-unique names (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        namer: Namer | None = None
        for graph in model.graph.subgraphs():
            for node in graph:
                if not node.name:
                    namer = namer or Namer(model.graph)  # names_in covers the bodies too
                    node.name = namer(node.op_type)
        return ir.passes.PassResult(model, namer is not None)
