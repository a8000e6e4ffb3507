"""Clean-up after the rewrite: data-movement ops run on integers, dead values go.

Embedding tables quantized per row are read row by row first (:mod:`onnxq.passes.gather_rows`).

Guarantees: a data-movement op (Reshape, Transpose, Gather, MaxPool, ...) that sits between a
DequantizeLinear and a QuantizeLinear with identical per-tensor scale and zero point is rewired to
read and write the integers directly, and the pair disappears — the result is exactly equal, and
every runtime sees the cheaper graph, not only ORT's CPU optimiser. Unused nodes and initializers
are removed and the graph is sorted topologically.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxq.passes._util import constant_array
from onnxq.passes.gather_rows import GatherRows
from onnxq.plan import DATA_MOVEMENT_OPS

# Ops whose output integers equal a pure rearrangement/selection of input integers (MaxPool is
# monotone, so it commutes with a positive-scale quantization).
_PASSTHROUGH = DATA_MOVEMENT_OPS - {"Resize"}


def _same_params(dq: ir.Node, q: ir.Node) -> bool:
    if len(dq.inputs) < 3 or len(q.inputs) < 3:
        return False
    a = [constant_array(v) for v in dq.inputs[1:3]]
    b = [constant_array(v) for v in q.inputs[1:3]]
    if any(x is None for x in (*a, *b)):
        return False
    if a[0].size != 1 or b[0].size != 1 or a[0].item() <= 0:  # type: ignore[union-attr]
        return False
    return all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b, strict=True))  # type: ignore[union-attr]


class DropQDQAroundDataMovement(ir.passes.InPlacePass):
    """Remove DQ→op→Q pairs with matching parameters around data-movement ops."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type not in _PASSTHROUGH or not node.inputs or len(node.outputs) != 1:
                continue
            src = node.inputs[0]
            dq = src.producer() if src is not None else None
            out = node.outputs[0]
            users = out.consumers()
            if dq is None or dq.op_type != "DequantizeLinear" or len(src.uses()) != 1:
                continue
            if out.is_graph_output() or len(users) != 1 or users[0].op_type != "QuantizeLinear":
                continue
            q = users[0]
            if q.inputs[0] is not out or not _same_params(dq, q):
                continue
            node.replace_input_with(0, dq.inputs[0])
            q_out = q.outputs[0]
            q_out.replace_all_uses_with(out)
            int_dtype = dq.inputs[0].dtype or q_out.dtype
            if int_dtype is not None:
                out.dtype = int_dtype
            else:
                out.type = None  # unknown integer type: leave it to shape inference
            graph.remove([q], safe=True)
            graph.remove([dq], safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


class Cleanup(ir.passes.InPlacePass):
    """Gather per-row tables row by row, drop QDQ pairs around data movement (unless
    ``drop_data_movement=False``: runtimes such as QNN-HTP need every op in QDQ form), remove
    unused nodes and values, sort the graph."""

    def __init__(self, drop_data_movement: bool = True) -> None:
        super().__init__()
        self.drop_data_movement = drop_data_movement

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        passes: list[ir.passes.PassBase] = [GatherRows()]
        if self.drop_data_movement:
            passes.append(DropQDQAroundDataMovement())
        result = ir.passes.PassManager([*passes, RemoveUnusedNodesPass(), TopologicalSortPass()])(model)
        return ir.passes.PassResult(model, result.modified)
