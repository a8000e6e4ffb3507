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


FLOAT_ROWS = "onnxq.float_rows"  # Value.meta key of the float rows add_float_channels adds


def add_float_channels(
    graph: ir.Graph,
    namer: Namer,
    readers: list[ir.Node],
    channels: np.ndarray,
    rows: dict[int, np.ndarray],
    spill: SpillFile | None = None,
    storage: ir.DataType | None = None,
) -> None:
    """Beside every MatMul in ``readers`` (reading the same ``x``), add ``x[..., channels] @ rows``
    in float to its output: ``Gather`` once, then a ``MatMul`` and an ``Add`` per reader (``rows``:
    ``id(reader's weight value)`` → ``[len(channels), N]``). The ``Add`` takes over the output's
    name and uses; the MatMul's output gets a new name. ``storage``: a narrower float type the rows
    are stored in, with a ``Cast`` back to ``x``'s type (folded by ONNX Runtime at load)."""
    x = readers[0].inputs[0]
    assert x is not None
    base = readers[0].name or "matmul"
    index = add_initializer(graph, namer(f"{base}_float_channels"), channels.astype(np.int64))
    gather = ir.node("Gather", [x, index], attributes={"axis": -1}, name=namer(f"{base}_float_channels"))
    picked = gather.outputs[0]
    picked.name = namer(f"{x.name}_float_channels")
    if x.dtype is not None:
        picked.dtype = x.dtype
    if x.shape is not None:
        picked.shape = ir.Shape([*list(x.shape)[:-1], int(channels.size)])
    graph.insert_before(readers[0], gather)
    for node in readers:
        y = node.outputs[0]
        weight = node.inputs[1]
        assert weight is not None
        array = rows[id(weight)]
        if storage is not None:
            array = array.astype(storage.numpy())
        side_w = add_initializer(graph, namer(f"{weight.name}_float_rows"), array)
        side_w.meta[FLOAT_ROWS] = True  # never quantized by a later pass
        if spill is not None:
            spill.take(side_w)
        compute = weight.dtype or x.dtype
        if storage is not None and compute is not None and storage != compute:
            cast = ir.node(
                "Cast", [side_w], attributes={"to": compute.value}, name=namer(f"{side_w.name}_cast")
            )
            cast.outputs[0].name = namer(f"{side_w.name}_{compute.name.lower()}")
            cast.outputs[0].dtype, cast.outputs[0].shape = compute, side_w.shape
            graph.insert_before(node, cast)
            side_w = cast.outputs[0]
        side = ir.node("MatMul", [picked, side_w], name=namer(f"{node.name}_float_channels"))
        side.outputs[0].name = namer(f"{y.name}_float_channels")
        _same_type(side.outputs[0], y)
        graph.insert_before(node, side)
        uses = list(y.uses())
        name = y.name
        y.name = namer(f"{name}_quantized")
        add = ir.node("Add", [y, side.outputs[0]], name=namer(f"{node.name}_plus_float_channels"))
        total = add.outputs[0]
        total.name = name
        _same_type(total, y)
        graph.insert_after(node, add)
        for use in uses:
            use.node.replace_input_with(use.idx, total)
        if y.is_graph_output():
            graph.outputs[graph.outputs.index(y)] = total


def _same_type(value: ir.Value, like: ir.Value) -> None:
    """Give ``value`` the element type and shape of ``like`` (what of them is known)."""
    if like.dtype is not None:
        value.dtype = like.dtype
    if like.shape is not None:
        value.shape = like.shape


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
