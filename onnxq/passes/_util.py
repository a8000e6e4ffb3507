"""Small helpers shared by the passes."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
import onnx_ir as ir

# Key of ``graph.meta`` under which a body graph being rewritten on its own (onnxq.plan.body_model)
# holds the names of the rest of the model, so names made inside it shadow nothing outside.
OUTER_NAMES = "onnxq.outer_names"


def names_in(graph: ir.Graph) -> set[str]:
    """Every value and node name in ``graph`` and in the bodies its nodes hold."""
    taken: set[str] = set()
    for g in (graph, *graph.subgraphs()):
        taken.update(v.name for v in g.inputs if v.name)
        taken.update(g.initializers)
        for node in g:
            if node.name:
                taken.add(node.name)
            taken.update(v.name for v in node.outputs if v.name)
    return taken


class Namer:
    """Hands out value/node names that do not clash with any name already in ``graph`` (or, for a
    body rewritten on its own, anywhere in its model: ``graph.meta[OUTER_NAMES]``)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken = names_in(graph) | set(graph.meta.get(OUTER_NAMES, ()))

    def __call__(self, base: str) -> str:
        name = base
        for i in itertools.count(1):
            if name not in self.taken:
                break
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer ``name`` holding ``array`` (the name must be free)."""
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer (None for anything computed at run time)."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def release(value: ir.Value) -> None:
    """Unmap a file-backed initializer's pages once its data has been used."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array view is still alive: unmapped when it dies
            tensor.release()


class SpillFile:
    """An append-only file in a private folder that new weights (quantized, smoothed) move to as they
    are made, so memory holds one at a time; the save copies them into the output."""

    MIN_BYTES = 2**20  # smaller tensors stay in memory

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "weights.bin"
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()

    def take(self, value: ir.Value) -> None:
        """Write ``value``'s in-memory tensor to the file and point the value at it."""
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < self.MIN_BYTES:
            return
        offset = self.file.tell()
        data = tensor.tobytes()
        self.file.write(data)
        self.file.flush()
        value.const_value = ir.ExternalTensor(
            self.path.name,
            offset,
            len(data),
            tensor.dtype,
            shape=tensor.shape,
            name=value.name,
            base_dir=self.path.parent,
        )

    def close(self) -> None:
        self.file.close()
