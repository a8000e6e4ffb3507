"""MinMax calibration that streams: ranges are reduced inside ONNX Runtime, never stored.

A calibration copy of the graph gets a ReduceMin and a ReduceMax output for every tensor the plan
needs, so each sample returns two scalars per tensor instead of the tensor itself. The statistics
are folded sample by sample into :class:`MinMaxObserver` objects, which can be merged (shards give
the same result as one pass). The copy's weights are not duplicated: it is serialised without
weight bytes and ONNX Runtime reads them from the model's own file.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxq.config import MinMax
from onnxq.data import Sample
from onnxq.errors import CalibrationDataError

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
class CalibrationResult:
    """Ranges per tensor plus the fp32 outputs of the first samples (kept for the fidelity check)."""

    ranges: dict[str, tuple[float, float]]
    samples_seen: int
    kept_inputs: list[Sample] = field(default_factory=list)
    kept_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)


def release_freed_memory() -> None:
    """Hand memory freed by a finished ORT session back to the OS (glibc keeps it otherwise)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def session_options(*, threads: int | None = None, calibration: bool = False) -> ort.SessionOptions:
    """Session options for onnxq's own ORT runs: quiet, no spinning threads, and for calibration
    no weight pre-packing (which would copy every weight)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    proto = ir.serde.serialize_model(model)
    folders = {
        Path(v.const_value.path).parent
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(folders) > 1:
        raise CalibrationDataError("weights in several folders are not supported")
    return proto.SerializeToString(), (folders.pop() if folders else None)


def make_session(model: ir.Model, so: ort.SessionOptions) -> ort.InferenceSession:
    """An ORT CPU session on ``model`` without copying its file-backed weights into the proto."""
    data, folder = serialize_for_ort(model)
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class _Augment:
    """Adds ReduceMin/ReduceMax outputs for ``tensors`` to ``model`` and removes them on exit."""

    def __init__(self, model: ir.Model, tensors: list[str]) -> None:
        self.model = model
        self.tensors = tensors
        self.nodes: list[ir.Node] = []
        self.outputs: list[ir.Value] = []

    def __enter__(self) -> dict[str, tuple[str, str]]:
        graph = self.model.graph
        values = {v.name: v for v in _all_values(graph)}
        names: dict[str, tuple[str, str]] = {}
        for i, name in enumerate(self.tensors):
            value = values[name]
            pair = []
            for op in ("ReduceMin", "ReduceMax"):
                node = ir.node(op, [value], attributes={"keepdims": 0}, name=f"onnxq_calib_{op}_{i}")
                node.outputs[0].name = f"onnxq_calib_{op}_{i}"
                node.outputs[0].dtype = value.dtype
                node.outputs[0].shape = ir.Shape([])
                graph.append(node)
                graph.outputs.append(node.outputs[0])
                self.nodes.append(node)
                self.outputs.append(node.outputs[0])
                pair.append(node.outputs[0].name)
            names[name] = (pair[0], pair[1])
        return names

    def __exit__(self, *exc: object) -> None:
        graph = self.model.graph
        for value in self.outputs:
            graph.outputs.remove(value)
        for node in self.nodes:
            graph.remove(node, safe=True)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def calibrate_minmax(
    model: ir.Model,
    tensors: list[str],
    samples: Iterable[Sample],
    method: MinMax,
    *,
    total: int | None = None,
    keep: int = 16,
    progress: bool = True,
) -> CalibrationResult:
    """Run ``samples`` through the fp32 model and return the range of each of ``tensors``.

    Memory does not grow with the number of samples: each sample yields two scalars per tensor.
    The first ``keep`` inputs and fp32 outputs are kept for the fidelity report.
    """
    observers = {name: MinMaxObserver(method.moving_average) for name in tensors}
    model_outputs = [v.name for v in model.graph.outputs]
    with _Augment(model, tensors) as reduce_names:
        try:
            session = make_session(model, session_options(calibration=True))
        except Exception as exc:
            raise CalibrationDataError(f"ONNX Runtime cannot run the model for calibration: {exc}") from None
    fetch = model_outputs + [n for pair in reduce_names.values() for n in pair]
    result = CalibrationResult({}, 0)
    bar = tqdm(samples, total=total, desc="calibrating", unit="sample", disable=not progress, leave=False)
    for sample in bar:
        try:
            outputs = session.run(fetch, sample)
        except Exception as exc:
            raise CalibrationDataError(
                f"calibration sample {result.samples_seen} failed in ONNX Runtime: {str(exc).splitlines()[0]}"
            ) from None
        named = dict(zip(fetch, outputs, strict=True))
        for tensor, (lo, hi) in reduce_names.items():
            lo_v, hi_v = named[lo], named[hi]
            if lo_v.size == 0:
                continue
            observers[tensor].update(float(lo_v), float(hi_v))
        if len(result.kept_inputs) < keep:
            result.kept_inputs.append(sample)
            result.kept_outputs.append({n: named[n] for n in model_outputs})
        result.samples_seen += 1
    del session
    release_freed_memory()
    result.ranges = {name: obs.range() for name, obs in observers.items()}
    return result
