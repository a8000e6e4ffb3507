"""Constants of If/Loop/Scan bodies moved to the main graph, one copy per distinct tensor.

Constant folding inside a body leaves its results there: in a merged decoder both branches fold the
``Transpose`` of a tied embedding into a 113 MB lm_head weight of their own, which would then be
quantized and stored twice. Guarantees: every body initializer of at least :data:`MIN_BYTES` is
read from the main graph instead (outer-scope reads are what bodies are for) unless it is an output
of its body (ONNX Runtime refuses a body returning an outer value), tensors with equal
type, shape and bytes become one initializer, and no name clashes with any other in the model.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir

from onnxq.passes._util import Namer

MIN_BYTES = 1024  # smaller constants (shapes, axes, scalars) stay where they are


def digest(value: ir.Value) -> tuple[str, tuple[int, ...], str]:
    """(dtype, shape, sha256 of the bytes) of a constant: equal keys, equal tensors."""
    tensor = value.const_value
    assert tensor is not None
    return str(tensor.dtype), tuple(tensor.shape.numpy()), hashlib.sha256(tensor.tobytes()).hexdigest()


class HoistBodyConstants(ir.passes.InPlacePass):
    """Move large body initializers to the main graph, merging identical ones."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        seen: dict[tuple[str, tuple[int, ...], str], ir.Value] = {}
        namer: Namer | None = None
        modified = False
        for graph in model.graphs():
            if graph is main:
                continue
            for name, value in list(graph.initializers.items()):
                tensor = value.const_value
                if tensor is None or tensor.nbytes < MIN_BYTES or value.is_graph_output():
                    continue  # a body output must be made in the body
                key = digest(value)
                graph.initializers.pop(name)
                if key in seen:
                    value.replace_all_uses_with(seen[key])
                else:
                    namer = namer or Namer(main)
                    value.name = namer(name)
                    main.register_initializer(value)
                    seen[key] = value
                modified = True
        return ir.passes.PassResult(model, modified)
