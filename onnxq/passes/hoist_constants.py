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
from collections.abc import Callable

import onnx_ir as ir

from onnxq.passes._util import Namer

MIN_BYTES = 1024  # smaller constants (shapes, axes, scalars) stay where they are
Digest = tuple[str, tuple[int, ...], str]  # (dtype, shape, sha256 of the bytes)


def digest(value: ir.Value) -> Digest:
    """(dtype, shape, sha256 of the bytes) of a constant: equal keys, equal tensors."""
    tensor = value.const_value
    assert tensor is not None
    return str(tensor.dtype), tuple(tensor.shape.numpy()), hashlib.sha256(tensor.tobytes()).hexdigest()


def move_to_main(
    value: ir.Value,
    body: ir.Graph,
    main: ir.Graph,
    moved: dict[Digest, ir.Value],
    rename: Callable[[str], str] | None = None,
) -> None:
    """Take initializer ``value`` out of ``body``: its readers read the equal tensor already moved
    (``moved``, keyed by :func:`digest`) or ``value`` itself, registered in ``main`` (named by
    ``rename`` when given, called once ``value`` has left ``body``)."""
    body.initializers.pop(value.name)  # type: ignore[arg-type]
    key = digest(value)
    if key in moved:
        value.replace_all_uses_with(moved[key])
        return
    if rename is not None:
        value.name = rename(value.name)  # type: ignore[arg-type]
    main.register_initializer(value)
    moved[key] = value


class HoistBodyConstants(ir.passes.InPlacePass):
    """Move large body initializers to the main graph, merging identical ones."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        moved: dict[Digest, ir.Value] = {}
        namer: Namer | None = None

        def rename(name: str) -> str:
            nonlocal namer
            namer = namer or Namer(main)  # made once the first constant has left its body
            return namer(name)

        modified = False
        for graph in model.graphs():
            if graph is main:
                continue
            for value in list(graph.initializers.values()):
                tensor = value.const_value
                if tensor is None or tensor.nbytes < MIN_BYTES or value.is_graph_output():
                    continue  # a body output must be made in the body
                move_to_main(value, graph, main, moved, rename)
                modified = True
        return ir.passes.PassResult(model, modified)
