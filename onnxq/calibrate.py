"""Calibration that streams: statistics are folded sample by sample, activations never stored.

A calibration copy of the graph gets a ReduceMin and a ReduceMax output for every tensor the plan
needs, so for MinMax each sample returns two scalars per tensor instead of the tensor itself. For the
histogram methods (Percentile, Entropy, MSE) the tensor is fetched too and folded at once into a
fixed-size :class:`~onnxq.histogram.HistogramObserver` and released. Memory holds one sample's
activations, whatever the number of samples. Observers merge (shards give the same result as one
pass). The copy's weights are not duplicated: it is serialised without weight bytes and ONNX Runtime
reads them from the model's own file.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxq import histogram
from onnxq.config import MSE, Calibration, Entropy, MinMax, Percentile, QuantSpec
from onnxq.data import Sample
from onnxq.errors import CalibrationDataError
from onnxq.qmath import int_type
from onnxq.segments import SampleFailed, SegmentRunner
from onnxq.subgraph_calibration import expose_statistics

log = logging.getLogger(__name__)


@dataclass
class MinMaxObserver:
    """Running range of one tensor; ``update`` with each sample's extremes, ``merge`` shards."""

    moving_average: float | None = None
    min: float = float("inf")
    max: float = float("-inf")
    count: int = 0

    def update(self, batch_min: float, batch_max: float) -> None:
        """Fold one sample's extremes in (exact running extremes, or their moving average)."""
        if self.moving_average is not None and self.count:
            c = self.moving_average
            self.min = (1 - c) * self.min + c * batch_min
            self.max = (1 - c) * self.max + c * batch_max
        else:
            self.min = min(self.min, batch_min)
            self.max = max(self.max, batch_max)
        self.count += 1

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        """The observer of the union of both sample sets (count-weighted for moving averages)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.min, self.max, self.count = other.min, other.max, other.count
            return self
        if self.moving_average is None:
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        else:
            total = self.count + other.count
            self.min = (self.min * self.count + other.min * other.count) / total
            self.max = (self.max * self.count + other.max * other.count) / total
        self.count += other.count
        return self

    def range(self) -> tuple[float, float]:
        """The calibrated ``(min, max)``; ``(0, 0)`` if nothing was observed."""
        if self.count == 0:
            return 0.0, 0.0
        return self.min, self.max

    def state(self) -> dict[str, float | int | None]:
        """A small serialisable state."""
        return {"moving_average": self.moving_average, "min": self.min, "max": self.max, "count": self.count}


@dataclass
class ChannelStats:
    """Per-channel (last axis) minimum, maximum and sum of squares of one tensor, with the number
    of rows folded in; ``update`` per sample, ``merge`` shards."""

    min: np.ndarray | None = None
    max: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    rows: int = 0

    def update(self, lo: np.ndarray, hi: np.ndarray, sumsq: np.ndarray, rows: int) -> None:
        lo, hi, sumsq = (np.asarray(a, dtype=np.float64) for a in (lo, hi, sumsq))
        if self.min is None:
            self.min, self.max, self.sumsq = lo, hi, sumsq
        else:
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)
            self.sumsq = self.sumsq + sumsq
        self.rows += rows

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.min is not None:
            self.update(other.min, other.max, other.sumsq, other.rows)  # type: ignore[arg-type]
        return self

    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min), np.abs(self.max))  # type: ignore[arg-type]

    def mean_square(self) -> np.ndarray:
        return self.sumsq / max(self.rows, 1)  # type: ignore[operator]


@dataclass
class ChannelMean:
    """Running per-channel mean of one tensor (one channel axis), weighted by the elements per channel
    of each sample; ``update`` per sample, ``merge`` shards."""

    sum: np.ndarray | None = None
    count: int = 0

    def update(self, mean: np.ndarray, rows: int) -> None:
        part = np.asarray(mean, dtype=np.float64) * rows
        self.sum = part if self.sum is None else self.sum + part
        self.count += rows

    def merge(self, other: ChannelMean) -> ChannelMean:
        if other.sum is not None:
            self.sum = other.sum.copy() if self.sum is None else self.sum + other.sum
            self.count += other.count
        return self

    def mean(self) -> np.ndarray | None:
        return None if self.sum is None else self.sum / max(self.count, 1)


@dataclass
class CalibrationResult:
    """Ranges per tensor plus the fp32 outputs of the first samples (kept for the fidelity check)."""

    ranges: dict[str, tuple[float, float]]
    samples_seen: int
    channels: dict[str, ChannelStats] = field(default_factory=dict)
    means: dict[str, ChannelMean] = field(default_factory=dict)
    kept_inputs: list[Sample] = field(default_factory=list)
    kept_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    # id of an If/Loop/Scan body graph → its values' MinMax ranges (onnxq.subgraph_calibration).
    body_ranges: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    # id of a body graph → per-channel statistics of its values (``body_channels`` of calibrate).
    body_channels: dict[int, dict[str, ChannelStats]] = field(default_factory=dict)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# The fp32 outputs kept for the fidelity report stop at this size (a decoder's logits are ~100 MB a
# sample): at least one sample is always kept.
KEEP_BYTES = 256 * 2**20


def return_large_blocks_promptly() -> None:
    """Fix glibc's mmap threshold at its 128 KiB default (glibc otherwise raises it after each large
    free and then keeps up to 32 MiB blocks of freed activations in the heap). Large blocks — ONNX
    Runtime's activations — then go back to the OS when freed, which lowers calibration's peak RSS
    by tens of MB. Process-wide and harmless elsewhere; a no-op off glibc."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def release_freed_memory() -> None:
    """Hand memory freed by a finished ORT session back to the OS (glibc keeps it otherwise)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def session_options(
    *, threads: int | None = None, calibration: bool = False, spinning: bool = False
) -> ort.SessionOptions:
    """Session options for onnxq's own ORT runs: quiet, threads that sleep between kernels unless
    ``spinning``, and with ``calibration`` no memory arena and no weight pre-packing (which would
    copy every weight), for runs of a whole big model. :func:`calibrate` itself keeps both: its
    sessions hold one segment's weights at most (:mod:`onnxq.segments`), and the arena saves a page
    fault per activation. ``spinning`` (faster back-to-back runs, busy threads between them) suits
    sessions that live only while onnxq runs them."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads:
        so.intra_op_num_threads = threads
    if calibration:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    return so


def serialize_for_ort(model: ir.Model) -> tuple[bytes, Path | None]:
    """The model as bytes for ORT, with weights that live in a file left there.

    Returns the bytes and the folder ORT must resolve external weights against (None if all
    weights are in memory).
    """
    proto, folder = proto_for_ort(model)
    return proto.SerializeToString(), folder


def proto_for_ort(model: ir.Model) -> tuple[onnx.ModelProto, Path | None]:
    """The model as a proto whose file-backed weights stay references into their file, and the
    folder ORT must resolve them against (None if all weights are in memory)."""
    proto = ir.serde.serialize_model(model)
    folders = {
        Path(v.const_value.path).parent
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(folders) > 1:
        raise CalibrationDataError("weights in several folders are not supported")
    return proto, (folders.pop() if folders else None)


def segment_opener(
    folder: Path | None, *, refuse_as_calibration: bool = False
) -> Callable[[bytes, bool], ort.InferenceSession]:
    """``open_session(model_bytes, prepack)`` for :class:`onnxq.segments.SegmentRunner`: an ORT CPU
    session with spinning threads, external weights resolved against ``folder``, weight pre-packing
    only when ``prepack``. With ``refuse_as_calibration``, a model ORT cannot load is a
    :class:`CalibrationDataError`."""

    def open_session(data: bytes, prepack: bool) -> ort.InferenceSession:
        so = session_options(spinning=True)
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if folder is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            if not refuse_as_calibration:
                raise
            raise CalibrationDataError(f"ONNX Runtime cannot run the model for calibration: {exc}") from None

    return open_session


def make_session(model: ir.Model, so: ort.SessionOptions) -> ort.InferenceSession:
    """An ORT CPU session on ``model`` without copying its file-backed weights into the proto."""
    data, folder = serialize_for_ort(model)
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class _Augment:
    """Adds ReduceMin/ReduceMax outputs for ``tensors`` to ``model`` (and the tensors themselves for
    ``raw``) and removes them on exit."""

    def __init__(
        self,
        model: ir.Model,
        tensors: list[str],
        raw: Iterable[str] = (),
        channels: Iterable[str] = (),
        means: Mapping[str, int] | None = None,
    ) -> None:
        self.model = model
        self.tensors = tensors
        self.raw = [name for name in raw if name not in {v.name for v in model.graph.outputs}]
        self.channels = list(channels)
        self.channel_names: dict[str, tuple[str, str, str, str]] = {}
        self.means = dict(means or {})
        self.mean_names: dict[str, tuple[str, str, int]] = {}
        self.nodes: list[ir.Node] = []
        self.outputs: list[ir.Value] = []
        self.constants: list[ir.Value] = []

    def _expose(self, graph: ir.Graph, node: ir.Node, dtype: ir.DataType | None) -> str:
        """Append ``node`` and make its output, named as the node, a graph output (removed on exit)."""
        out = self._hidden(graph, node)
        out.dtype = dtype
        graph.outputs.append(out)
        self.outputs.append(out)
        return out.name  # type: ignore[return-value]

    def _axes(
        self, graph: ir.Graph, op: str, node_inputs: list[ir.Value], axes: list[int], name: str
    ) -> ir.Node:
        """``op`` over ``axes``, given as an input from the opset that moved them there."""
        opset = self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 13))
        keep = {"keepdims": 0} if op.startswith("Reduce") else {}
        if opset < (13 if op in ("ReduceSum", "Unsqueeze") else 18):
            return ir.node(op, node_inputs, attributes={"axes": axes, **keep}, name=name)
        axes_value = self._constant(graph, f"{name}_axes", np.array(axes, dtype=np.int64))
        return ir.node(op, [*node_inputs, axes_value], attributes=keep, name=name)

    def _constant(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        """An initializer (removed on exit), registered once per name."""
        if name in graph.initializers:
            return graph.initializers[name]
        value = ir.Value(name=name, const_value=ir.tensor(array))
        graph.register_initializer(value)
        self.constants.append(value)
        return value

    def _reduce(self, graph: ir.Graph, op: str, value: ir.Value, axes: list[int], name: str) -> str:
        """``op(value)`` over ``axes`` without keepdims as an output."""
        return self._expose(graph, self._axes(graph, op, [value], axes, name), value.dtype)

    def _shape(self, graph: ir.Graph, value: ir.Value, name: str) -> str:
        return self._expose(graph, ir.node("Shape", [value], name=name), ir.DataType.INT64)

    def _hidden(self, graph: ir.Graph, node: ir.Node) -> ir.Value:
        """Append ``node`` (removed on exit) and return its output, named as the node."""
        node.outputs[0].name = node.name
        graph.append(node)
        self.nodes.append(node)
        return node.outputs[0]

    def _channel_extremes(self, graph: ir.Graph, value: ir.Value, name: str) -> tuple[str, str, str]:
        """Per-channel min, max (each ``[1, C, 1]``) and sum of squares (``[C]``) of a float32
        ``value``: its rows flattened to ``[R, C]``, transposed to ``[1, C, R]`` and padded with one
        ``-inf`` column (so no rows give ``+inf`` / ``-inf`` as ReduceMin/ReduceMax do) for
        GlobalMaxPool of it and of its negation, and ReduceSum of its square: ORT's
        ReduceMin/ReduceMax/ReduceSumSquare over leading axes have no fast path, these ops do."""
        pads = self._constant(graph, "onnxq_channel_pads", np.array([0, 0, 0, 0, 0, 1], np.int64))
        neg_inf = self._constant(graph, "onnxq_channel_neg_inf", np.array(-np.inf, np.float32))

        def pooled(x: ir.Value, suffix: str) -> ir.Node:
            padded = self._hidden(graph, ir.node("Pad", [x, pads, neg_inf], name=f"{name}_{suffix}_pad"))
            return ir.node("GlobalMaxPool", [padded], name=f"{name}_{suffix}")

        rows = self._hidden(graph, ir.node("Flatten", [value], attributes={"axis": -1}, name=f"{name}_rows"))
        lifted = self._hidden(graph, self._axes(graph, "Unsqueeze", [rows], [0], f"{name}_lift"))
        cols = self._hidden(
            graph, ir.node("Transpose", [lifted], attributes={"perm": [0, 2, 1]}, name=f"{name}_cols")
        )
        hi = self._expose(graph, pooled(cols, "max"), value.dtype)
        negated = self._hidden(graph, ir.node("Neg", [cols], name=f"{name}_neg"))
        neg_lo = self._hidden(graph, pooled(negated, "negmax"))
        lo = self._expose(graph, ir.node("Neg", [neg_lo], name=f"{name}_min"), value.dtype)
        square = self._hidden(graph, ir.node("Mul", [rows, rows], name=f"{name}_square"))
        sq = self._expose(graph, self._axes(graph, "ReduceSum", [square], [0], f"{name}_sumsq"), value.dtype)
        return lo, hi, sq

    def _add_channel_reductions(self, graph: ir.Graph, values: dict[str, ir.Value]) -> None:
        """Min, max and sum of squares over every axis but the last, for ``channels``."""
        for i, name in enumerate(self.channels):
            value = values[name]
            if value.dtype == ir.DataType.FLOAT:
                lo, hi, sq = self._channel_extremes(graph, value, f"onnxq_channel_{i}")
            else:
                axes = list(range(len(value.shape) - 1))  # type: ignore[arg-type]
                lo, hi, sq = (
                    self._reduce(graph, op, value, axes, f"onnxq_channel_{op}_{i}")
                    for op in ("ReduceMin", "ReduceMax", "ReduceSumSquare")
                )
            self.channel_names[name] = (lo, hi, sq, self._shape(graph, value, f"onnxq_channel_Shape_{i}"))

    def _add_channel_means(self, graph: ir.Graph, values: dict[str, ir.Value]) -> None:
        """ReduceMean over every axis but the channel axis (and a Shape), for ``means``."""
        for i, (name, axis) in enumerate(self.means.items()):
            value = values.get(name)
            if value is None or value.shape is None:
                continue
            rank = len(value.shape)
            axis = axis % rank
            node_name = f"onnxq_channel_mean_{i}"
            mean = self._reduce(graph, "ReduceMean", value, [a for a in range(rank) if a != axis], node_name)
            self.mean_names[name] = (mean, self._shape(graph, value, f"{node_name}_Shape"), axis)

    def __enter__(self) -> dict[str, tuple[str, str]]:
        """Tensor → names of the outputs holding its min and max: scalars, or for a tensor with
        per-channel statistics its per-channel min and max (the tensor's are their extremes)."""
        graph = self.model.graph
        values = {v.name: v for v in _all_values(graph)}
        self._add_channel_reductions(graph, values)
        names: dict[str, tuple[str, str]] = {}
        for i, name in enumerate(self.tensors):
            if name in self.channel_names:
                names[name] = self.channel_names[name][:2]
                continue
            value = values[name]
            pair = []
            for op in ("ReduceMin", "ReduceMax"):
                node = ir.node(op, [value], attributes={"keepdims": 0}, name=f"onnxq_calib_{op}_{i}")
                node.outputs[0].shape = ir.Shape([])
                pair.append(self._expose(graph, node, value.dtype))
            names[name] = (pair[0], pair[1])
        for name in self.raw:
            graph.outputs.append(values[name])
        self._add_channel_means(graph, values)
        return names

    def __exit__(self, *exc: object) -> None:
        graph = self.model.graph
        values = {v.name: v for v in graph.outputs}
        for name in self.raw:
            graph.outputs.remove(values[name])
        for value in self.outputs:
            graph.outputs.remove(value)
        graph.remove(self.nodes, safe=True)
        for value in self.constants:
            del graph.initializers[value.name]


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def tensor_range(
    method: Calibration,
    spec: QuantSpec,
    minmax: MinMaxObserver,
    hist: histogram.HistogramObserver | None,
) -> tuple[float, float]:
    """The calibrated ``(min, max)`` of one tensor under ``method`` for its quantization ``spec``."""
    if hist is None or hist.total == 0:
        return minmax.range()
    qtype = int_type(spec.dtype)
    if isinstance(method, Percentile):
        symmetric = spec.symmetric if method.symmetric is None else method.symmetric
        return histogram.percentile_range(hist, method.percentile, symmetric)
    if isinstance(method, Entropy):
        return histogram.entropy_range(hist, qtype, spec.symmetric, method.candidates)
    if isinstance(method, MSE):
        return histogram.mse_range(hist, qtype, spec.symmetric, method.candidates)
    return minmax.range()


def calibrate(
    model: ir.Model,
    tensors: Mapping[str, QuantSpec],
    samples: Iterable[Sample],
    method: Calibration,
    *,
    total: int | None = None,
    keep: int = 16,
    progress: bool = True,
    channels: Iterable[str] = (),
    means: Mapping[str, int] | None = None,
    segment_bytes: int | None = None,
    bodies: Mapping[int, Sequence[str]] | None = None,
    body_channels: Mapping[int, Sequence[tuple[str, int]]] | None = None,
) -> CalibrationResult:
    """Run ``samples`` through the fp32 model and return the calibrated range of each of ``tensors``.

    ``tensors`` maps each tensor to its quantization spec; a spec's own ``calibration`` overrides
    ``method``. ``channels``: tensors whose per-channel (last axis) statistics are gathered too.
    ``means``: tensor → channel axis, tensors whose per-channel mean is gathered too (``result.means``).
    Memory does not grow with the number of samples. The first ``keep`` inputs and fp32 outputs (up to
    :data:`KEEP_BYTES`) are kept for the fidelity report. A model with more than ``segment_bytes``
    of weights (default :data:`onnxq.segments.SEGMENT_BYTES`) runs segment by segment
    (:mod:`onnxq.segments`): one segment's weights in memory at a time. ``bodies``: id of an
    If/Loop/Scan body graph → values inside it whose MinMax range is wanted too
    (``result.body_ranges``; :mod:`onnxq.subgraph_calibration`); ``body_channels``: body id →
    ``(value, channels)`` whose per-channel statistics are wanted (``result.body_channels``).
    """
    methods = {name: spec.calibration or method for name, spec in tensors.items()}
    minmax = {
        name: MinMaxObserver(m.moving_average if isinstance(m, MinMax) else None)
        for name, m in methods.items()
    }
    hists = {name: histogram.HistogramObserver() for name, m in methods.items() if not isinstance(m, MinMax)}
    model_outputs = [v.name for v in model.graph.outputs]
    return_large_blocks_promptly()
    augment = _Augment(model, list(tensors), hists, channels, means)
    with augment as reduce_names:
        proto, folder = proto_for_ort(model)
    body_names, body_channel_names = expose_statistics(model, proto, bodies or {}, body_channels)
    body_minmax = {key: MinMaxObserver() for key in body_names}
    channel_names = augment.channel_names

    runner = SegmentRunner(proto, segment_opener(folder, refuse_as_calibration=True), segment_bytes)
    del proto
    result = CalibrationResult({}, 0, {name: ChannelStats() for name in channel_names})
    for body, name in body_channel_names:
        result.body_channels.setdefault(body, {})[name] = ChannelStats()
    result.means = {name: ChannelMean() for name in augment.mean_names}
    kept: dict[int, dict[str, np.ndarray]] = {}
    kept_inputs: list[Sample] = []
    kept_bytes, limit = 0, keep

    def keep_output(index: int, name: str, array: np.ndarray) -> None:
        """Keep fp32 outputs of the first ``keep`` samples, dropping the last kept sample while
        over :data:`KEEP_BYTES` (sample 0 always stays)."""
        nonlocal kept_bytes, limit
        if index >= limit:
            return
        kept.setdefault(index, {})[name] = array
        kept_bytes += array.nbytes
        while kept_bytes > KEEP_BYTES and len(kept) > 1:
            last = max(kept)
            kept_bytes -= sum(a.nbytes for a in kept.pop(last).values())
            limit = last

    def counted(samples: Iterable[Sample]) -> Iterable[Sample]:
        for sample in samples:
            if len(kept_inputs) < keep:
                kept_inputs.append(sample)
            result.samples_seen += 1
            yield sample

    steps = None if total is None else total * runner.count
    desc = "calibrating" if runner.count == 1 else f"calibrating ({runner.count} segments)"
    unit = "sample" if runner.count == 1 else "step"  # a step: one sample through one segment
    bar = tqdm(total=steps, desc=desc, unit=unit, disable=not progress, leave=False)
    try:
        for index, named in runner.run(counted(samples)):
            bar.update(1)
            extremes = {}
            for tensor, (lo, hi) in reduce_names.items():
                if lo not in named or named[lo].size == 0:
                    continue
                extremes[tensor] = (float(named[lo].min()), float(named[hi].max()))
                minmax[tensor].update(*extremes[tensor])
            for key, (lo, hi) in body_names.items():
                low, high = (float(named[lo]), float(named[hi])) if lo in named else (1.0, 0.0)
                if low <= high:  # a branch that did not run gives +inf/-inf
                    body_minmax[key].update(low, high)
            for (body, tensor), (lo, hi, sq, size) in body_channel_names.items():
                count = int(named[size]) if size in named else 0
                if count:  # zero: the branch or loop did not run for this sample
                    stats = result.body_channels[body][tensor]
                    stats.update(named[lo], named[hi], named[sq], count // named[lo].size)
            for tensor, (lo, hi, sq, shape) in channel_names.items():
                if lo in named and named[lo].size:
                    rows = int(np.prod(named[shape][:-1]))
                    result.channels[tensor].update(named[lo].ravel(), named[hi].ravel(), named[sq], rows)
            for tensor, (mean, shape, axis) in augment.mean_names.items():
                if mean in named and named[mean].size:
                    dims = named[shape]
                    result.means[tensor].update(named[mean], int(np.prod(dims)) // max(int(dims[axis]), 1))
            for name in model_outputs:
                if name in named:
                    keep_output(index, name, named[name])
            # Binned inline, each tensor released as soon as it is folded: one sample's activations at most.
            for name, observer in hists.items():
                values = named.pop(name, None)
                if values is not None and name in extremes:
                    observer.update(values, *extremes[name])
                del values
            del named
    except SampleFailed as exc:
        raise exc.calibration_error() from None
    finally:
        bar.close()
    release_freed_memory()
    result.kept_inputs = kept_inputs[: len(kept)]
    result.kept_outputs = [kept[i] for i in sorted(kept)]
    result.ranges = {
        name: tensor_range(methods[name], tensors[name], minmax[name], hists.get(name)) for name in tensors
    }
    for (body, name), observer in body_minmax.items():  # never computed: no range (kept float)
        result.body_ranges.setdefault(body, {})[name] = (
            observer.range() if observer.count else (np.nan, np.nan)
        )
    return result
