"""Static input shapes, for runtimes that compile fixed shapes only (QNN-HTP).

Guarantees: every symbolic or unknown dimension of a model input is set to the size it has in the
given sample; fixed dimensions are left as they are (a sample that disagrees with one is rejected
earlier, by the calibration-data checks), and the symbolic shapes the exporter recorded for
intermediate values are cleared so shape inference recomputes them from the fixed inputs.
``fixed`` records ``input → shape`` for what changed, so the summary can say so. Shape
computations then fold into constants with the usual prepare passes (:class:`RefreshShapes` between
rounds).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir


class FixInputShapes(ir.passes.InPlacePass):
    """Set the symbolic dimensions of the model inputs to the shapes of ``sample``."""

    def __init__(self, sample: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.sample = sample
        self.fixed: dict[str, tuple[int, ...]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.inputs:
            array = self.sample.get(value.name or "")
            if array is None or value.shape is None:
                continue
            dims = [
                d if isinstance(d, int) else int(n) for d, n in zip(value.shape, array.shape, strict=True)
            ]
            if any(not isinstance(d, int) for d in value.shape):
                value.shape = ir.Shape(dims)
                self.fixed[value.name or ""] = tuple(dims)
        if self.fixed:
            _clear_symbolic(model.graph)
        return ir.passes.PassResult(model, bool(self.fixed))


class RefreshShapes(ir.passes.InPlacePass):
    """Forget stale shapes before shape inference runs again: initializers take their tensor's shape
    (constant folding reuses values that kept the exporter's symbolic shape) and node outputs with
    symbolic dimensions lose them. Meant for models whose inputs are all static."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            if value.const_value is not None:
                value.shape = ir.Shape(value.const_value.shape)
        _clear_symbolic(model.graph)
        return ir.passes.PassResult(model, False)


def _clear_symbolic(graph: ir.Graph) -> None:
    """Symbolic dimensions forgotten; a graph output (of the model or of a body) keeps its rank, with
    unknown dimensions, since a model output needs a shape and inference cannot always give one
    back (an If whose branches' shapes are unknown)."""
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for out in node.outputs:
            if out.shape is not None and any(not isinstance(d, int) for d in out.shape):
                out.shape = ir.Shape([None] * len(out.shape)) if out.is_graph_output() else None
