"""Run a model as a chain of segments, each holding a bounded share of the weights.

Calibration must run the fp32 model, and ONNX Runtime maps every weight a session uses. To keep
calibration's memory bounded on big models, :func:`split` cuts the (augmented) graph, in its
topological order, into segments of at most ``budget`` bytes of weights each (a node whose own
weights exceed the budget gets a segment of its own). :class:`SegmentRunner` then runs every sample
through segment 0, then every sample through segment 1, and so on: only one segment's session — and
so one segment's weights — is alive at a time. What crosses a cut (the hidden state, a mask, ...) is
kept per sample in an :class:`ActivationStore`, in memory up to its budget and in an anonymous
temporary file past it, so memory does not grow with the number of samples either; a value is
dropped as soon as the last segment that reads it has run.

Guarantees: every node runs with the same inputs as in the whole graph, so the outputs are the
whole graph's (up to kernels ONNX Runtime fuses differently at a cut); a node reading activations
runs once per sample, while DequantizeLinear nodes and nodes computing from initializers alone run
in each segment that reads them, so no weight-sized value ever crosses a cut. A graph small enough
for one segment runs as one session. Values read inside subgraphs (If/Loop/Scan bodies) from the
outer scope count as inputs of the node that owns the subgraph.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.errors import CalibrationDataError, OutputError

log = logging.getLogger(__name__)

# Weights per segment. Large enough that a transformer layer or a CNN stage fits whole, small
# enough that a segment's mapped weights are a small share of a big model.
SEGMENT_BYTES = 128 * 2**20
# Cut activations kept in memory across segments; the rest go to an anonymous temporary file.
STORE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Segment:
    """Indices of the graph's nodes in one segment (in graph order), what it reads from earlier
    segments or the graph's inputs, and what it must hand on (to later segments or as graph
    outputs)."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's data, read from its header only (external data: its ``length``)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    return count * itemsize


def _subgraph_names(graph: onnx.GraphProto) -> Iterator[str]:
    for node in graph.node:
        yield from node.input
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraph_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraph_names(g)
    yield from (o.name for o in graph.output)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads: its inputs, and what its subgraphs read (outer-scope values among
    them; names defined inside a subgraph are included too and simply never match an outer value)."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names.extend(_subgraph_names(attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                names.extend(_subgraph_names(g))
    return names


def split(
    graph: onnx.GraphProto, budget: int = SEGMENT_BYTES, sidecar_prefix: str = "onnxq_"
) -> list[Segment]:
    """Cut ``graph`` (topologically sorted) into segments of at most ``budget`` bytes of weights.

    Nodes that compute from initializers alone (a weight's DequantizeLinear, a Transpose of a
    constant) are copied into every segment that reads them, so a cut never carries a weight-sized
    value; so is every DequantizeLinear, so a cut carries the integer tensor and ONNX Runtime still
    sees each ``DequantizeLinear → op → QuantizeLinear`` group whole (and fuses it). Nodes named
    with ``sidecar_prefix`` (calibration's reductions, which only read and feed
    graph outputs) join the segment of their latest producer, so a cut never has to carry a tensor
    just to reduce it.
    """
    nodes = list(graph.node)
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    reads = [node_reads(node) for node in nodes]
    const_producer: dict[str, int] = {}  # outputs of nodes copied into each segment that reads them
    constants: set[str] = set()  # values computed from initializers alone
    for i, node in enumerate(nodes):
        constant = all((n in sizes and n not in graph_inputs) or n in constants for n in reads[i])
        dequantize = node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")
        if constant:
            constants.update(out for out in node.output if out)
        if (constant or dequantize) and not node.name.startswith(sidecar_prefix):
            const_producer.update((out, i) for out in node.output if out)

    def closure(i: int) -> set[int]:
        """The constant nodes node ``i`` needs, transitively."""
        found: set[int] = set()
        for n in reads[i]:
            if n in const_producer:
                found |= closure_of_value(n, const_producer, reads)
        return found

    def weights_of(members: set[int]) -> set[str]:
        return {n for j in members for n in reads[j] if n in sizes}

    produced_in: dict[str, int] = {}
    members: list[set[int]] = [set()]
    current, seen = 0, set()
    for i, node in enumerate(nodes):
        if any(out in const_producer for out in node.output if out):
            continue
        needs = closure(i) | {i}
        if node.name.startswith(sidecar_prefix) and any(n in const_producer for n in reads[i]):
            seg = current  # reads a copied value: where everything it may depend on is available
        elif node.name.startswith(sidecar_prefix):
            seg = max((produced_in[n] for n in reads[i] if n in produced_in), default=0)
        else:
            new = weights_of(needs) - seen
            if seen and sum(sizes[n] for n in seen | new) > budget:
                current, seen = current + 1, set()
                members.append(set())
                new = weights_of(needs)
            seg = current
            seen |= new
        members[seg] |= needs
        for out in node.output:
            if out:
                produced_in[out] = seg
    graph_outputs = [o.name for o in graph.output]
    for name in graph_outputs:  # a constant graph output: computed by the last segment
        if name in const_producer:
            members[-1] |= closure_of_value(name, const_producer, reads)
    last_read: dict[str, int] = {}
    for seg, idx_set in enumerate(members):
        for i in idx_set:
            for n in reads[i]:
                last_read[n] = max(last_read.get(n, -1), seg)
    segments = []
    for seg, idx_set in enumerate(members):
        idx = tuple(sorted(idx_set))
        here = {out for i in idx for out in nodes[i].output if out}
        inputs = dict.fromkeys(
            n
            for i in idx
            for n in reads[i]
            if n not in here and n not in sizes and (n in produced_in or n in graph_inputs)
        )
        outputs = [n for n in here if last_read.get(n, -1) > seg and n not in const_producer]
        outputs += [
            n
            for n in graph_outputs
            if n in here and n not in outputs and (n not in const_producer or seg == len(members) - 1)
        ]
        weight = sum(sizes[n] for n in weights_of(idx_set))
        segments.append(Segment(idx, tuple(inputs), tuple(dict.fromkeys(outputs)), weight))
    return segments


def closure_of_value(name: str, const_producer: dict[str, int], reads: list[list[str]]) -> set[int]:
    """The constant nodes that compute ``name``, transitively."""
    found: set[int] = set()
    todo = [name]
    while todo:
        j = const_producer[todo.pop()]
        if j not in found:
            found.add(j)
            todo.extend(n for n in reads[j] if n in const_producer)
    return found


def segment_model(
    model: onnx.ModelProto, segment: Segment, types: dict[str, onnx.ValueInfoProto]
) -> onnx.ModelProto:
    """A standalone model of ``segment``: its nodes, the initializers they read (external-data
    references stay references), its inputs and outputs typed from ``types``."""
    graph = model.graph
    part = onnx.ModelProto()
    part.ir_version = model.ir_version
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.graph.name = f"{graph.name}_segment"
    reads: set[str] = set()
    for i in segment.nodes:
        node = graph.node[i]
        part.graph.node.append(node)
        reads.update(node_reads(node))
    part.graph.initializer.extend(t for t in graph.initializer if t.name in reads)
    part.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in reads)
    part.graph.input.extend(types.get(n, onnx.ValueInfoProto(name=n)) for n in segment.inputs)
    part.graph.output.extend(types.get(n, onnx.ValueInfoProto(name=n)) for n in segment.outputs)
    return part


def value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Name → typed ValueInfo for every value the model declares (inputs, outputs, value_info)."""
    graph = model.graph
    return {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}


@dataclass
class ActivationStore:
    """Arrays per (sample, name), in memory up to ``budget`` bytes, then in an anonymous temporary
    file (deleted by the OS when closed, even if the process dies)."""

    budget: int = STORE_BYTES
    memory: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    spilled: dict[tuple[int, str], tuple[int, np.dtype, tuple[int, ...]]] = field(default_factory=dict)
    held: int = 0
    file: object | None = None

    def put(self, sample: int, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):  # a sequence or map value: kept as ORT returned it
            self.memory[sample, name] = array
            return
        if self.held + array.nbytes <= self.budget or array.nbytes == 0:
            self.memory[sample, name] = array
            self.held += array.nbytes
            return
        try:
            if self.file is None:
                self.file = tempfile.TemporaryFile(prefix="onnxq-calibration-")  # noqa: SIM115 - close()
            f = self.file
            f.seek(0, 2)  # type: ignore[attr-defined]
            offset = f.tell()  # type: ignore[attr-defined]
            f.write(np.ascontiguousarray(array).data)  # type: ignore[attr-defined]
        except OSError as exc:
            raise OutputError(
                f"cannot spill calibration activations to a temporary file in {tempfile.gettempdir()}: "
                f"{exc.strerror or exc}; free space there or point TMPDIR at a larger disk"
            ) from None
        self.spilled[sample, name] = (offset, array.dtype, array.shape)

    def get(self, sample: int, name: str) -> np.ndarray:
        if (sample, name) in self.memory:
            return self.memory[sample, name]
        offset, dtype, shape = self.spilled[sample, name]
        out = np.empty(shape, dtype)
        f = self.file
        f.seek(offset)  # type: ignore[union-attr]
        f.readinto(memoryview(out.reshape(-1).view(np.uint8)))  # type: ignore[union-attr]
        return out

    def has(self, sample: int, name: str) -> bool:
        return (sample, name) in self.memory or (sample, name) in self.spilled

    def drop(self, names: Iterable[str]) -> None:
        names = set(names)
        for key in [k for k in self.memory if k[1] in names]:
            self.held -= getattr(self.memory.pop(key), "nbytes", 0)
        for key in [k for k in self.spilled if k[1] in names]:
            del self.spilled[key]

    def close(self) -> None:
        self.memory.clear()
        self.spilled.clear()
        self.held = 0
        if self.file is not None:
            self.file.close()  # type: ignore[attr-defined]
            self.file = None


class SegmentRunner:
    """Runs samples through ``model`` segment by segment (see the module docstring).

    ``open_session(model_bytes, prepack)`` makes one segment's session, with ORT's weight
    pre-packing only when ``prepack`` (false for a segment over the budget — a single node whose
    weights exceed it — since packing would hold that weight twice while the session loads);
    :meth:`run` yields, segment after segment and sample after sample, ``(sample index, graph
    outputs that segment produced)``.
    ``budget`` / ``store_bytes``: weights per segment and cut activations held in memory (default
    :data:`SEGMENT_BYTES` / :data:`STORE_BYTES`).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        open_session,
        budget: int | None = None,
        store_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.open_session = open_session
        self.store_bytes = STORE_BYTES if store_bytes is None else store_bytes
        graph = model.graph
        self.graph_outputs = {o.name for o in graph.output}
        self.budget = SEGMENT_BYTES if budget is None else budget
        segments = split(graph, self.budget)
        self.segments = segments if len(segments) > 1 else []
        self.whole_bytes = sum(tensor_bytes(t) for t in graph.initializer)
        self.types = value_types(model)

    @property
    def count(self) -> int:
        """Number of sessions :meth:`run` opens, one after another."""
        return max(len(self.segments), 1)

    def run(self, samples: Iterable[dict[str, np.ndarray]]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        if not self.segments:
            session = self.open_session(self.model.SerializeToString(), self.whole_bytes <= self.budget)
            fetch = [o.name for o in self.model.graph.output]
            try:
                for i, sample in enumerate(samples):
                    yield i, dict(zip(fetch, run_sample(session, fetch, sample, i), strict=True))
            finally:
                del session
            return
        store = ActivationStore(self.store_bytes)
        later = {n for s in self.segments[1:] for n in s.inputs}
        try:
            count = 0
            for k, segment in enumerate(self.segments):
                if k and not count:
                    break  # no samples
                types = segment_types(self.types, store, segment, count)
                fetch = list(segment.outputs)
                session = (
                    self.open_session(
                        segment_model(self.model, segment, types).SerializeToString(),
                        segment.weight_bytes <= self.budget,
                    )
                    if fetch
                    else None
                )
                feeds: Iterable[tuple[int, dict[str, np.ndarray]]]
                if k == 0:
                    feeds = enumerate(samples)
                else:
                    feeds = ((i, {n: store.get(i, n) for n in segment.inputs}) for i in range(count))
                for i, feed in feeds:
                    if k == 0:
                        count += 1
                        for name in later & feed.keys():
                            store.put(i, name, feed[name])
                        feed = {n: feed[n] for n in segment.inputs if n in feed}
                    named = (
                        dict(zip(fetch, run_sample(session, fetch, feed, i), strict=True)) if fetch else {}
                    )
                    for name in later & named.keys():
                        store.put(i, name, named[name])
                    yield i, {n: a for n, a in named.items() if n in self.graph_outputs}
                del session
                store.drop(
                    n for n in store_names(store) if not any(n in s.inputs for s in self.segments[k + 1 :])
                )
        finally:
            store.close()


def segment_types(
    types: dict[str, onnx.ValueInfoProto], store: ActivationStore, segment: Segment, samples: int
) -> dict[str, onnx.ValueInfoProto]:
    """``types`` plus, for ``segment``'s inputs the graph leaves untyped, an element type and a
    rank-free shape taken from the arrays sample 0 stored for them (once ``samples`` have run)."""
    untyped = [n for n in segment.inputs if not types.get(n, onnx.ValueInfoProto()).HasField("type")]
    if not samples or not untyped:
        return types
    out = dict(types)
    for name in untyped:
        stored = store.get(0, name)
        if isinstance(stored, np.ndarray):
            dtype = onnx.helper.np_dtype_to_tensor_dtype(stored.dtype)
            out[name] = onnx.helper.make_tensor_value_info(name, dtype, None)
    return out


def store_names(store: ActivationStore) -> set[str]:
    return {k[1] for k in store.memory} | {k[1] for k in store.spilled}


class SampleFailed(RuntimeError):
    """A sample failed in ONNX Runtime; ``index`` says which, the message says why."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index

    def calibration_error(self) -> CalibrationDataError:
        """The user's error: which calibration sample ONNX Runtime rejected, and why."""
        return CalibrationDataError(f"calibration sample {self.index} failed in ONNX Runtime: {self}")


def run_sample(session, fetch: list[str], feed: dict[str, np.ndarray], index: int) -> list[np.ndarray]:
    """``session.run(fetch, feed)``; ORT's error becomes :class:`SampleFailed` (one line, ``index``)."""
    try:
        return session.run(fetch, feed)
    except Exception as exc:
        raise SampleFailed(index, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
