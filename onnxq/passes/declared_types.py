"""Value types and shapes written only where the input model declared them.

onnxq infers every value's type and shape to plan and rewrite; ONNX Runtime infers them again when
it loads a model. The inferred shapes are not neutral, though: with them ORT's CPU EP can prove a
residual ``Add`` + ``LayerNormalization`` pair has equal 3-D inputs and fuses it into
``SkipLayerNormalization``, whose kernel (onnxruntime 1.32) is several times slower than the pair
(BERT-base int8 latency in ``tools/bench_quantize.py``: 0.41× fp32 with the shapes written, 0.35×
without; an exported fp32 model without them is not fused either). Guarantees: every intermediate
value (a node output that is not an output of its graph) keeps its type and shape only if the model
onnxq loaded declared one for that name; graph inputs and outputs keep theirs; nothing else changes.
"""

from __future__ import annotations

import onnx_ir as ir


def _intermediates(model: ir.Model):
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if not value.is_graph_output():
                    yield value


def declared_types(model: ir.Model) -> frozenset[str]:
    """Names of the intermediate values ``model`` gives a type or shape (call it on the model as
    loaded, before shape inference)."""
    return frozenset(
        v.name for v in _intermediates(model) if v.name and (v.type is not None or v.shape is not None)
    )


class KeepDeclaredTypes(ir.passes.InPlacePass):
    """Forget the type and shape of every intermediate value not in ``declared``."""

    def __init__(self, declared: frozenset[str]) -> None:
        super().__init__()
        self.declared = declared

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in _intermediates(model):
            if value.name not in self.declared and (value.type is not None or value.shape is not None):
                value.type, value.shape = None, None
                modified = True
        return ir.passes.PassResult(model, modified)
