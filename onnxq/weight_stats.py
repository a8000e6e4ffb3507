"""What GPTQ and AWQ are computed from: the target weights (:class:`Target`), the mergeable
statistics of the activations they multiply (:class:`ActivationStats`), the float rows chosen from
them, and the two ways of gathering them: one streaming pass over the fp32 model
(:func:`collect_statistics`) or segment by segment, each segment on the outputs of the already
quantized ones (:func:`layer_by_layer`). The pipeline is described in :mod:`onnxq.weight_algorithms`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxq.config import QuantSpec
from onnxq.errors import CalibrationDataError
from onnxq.passes._util import Namer, add_float_channels, release
from onnxq.segments import ActivationStore, SampleFailed, run_sample

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
_SEED = 0x5EED  # the reservoir's row keys: seeded by the sample index, the same rows however sharded


@dataclass
class ActivationStats:
    """Mergeable statistics of one activation, viewed as rows ``[-1, K]``.

    ``hessian``: ``ΣXᵀX`` (float64, or None when not asked for); ``abs_sum``/``sq_sum``: ``Σ|X|``
    and ``ΣX²`` per channel (with the reservoir); ``rows``: rows folded in;
    ``sample_rows``/``sample_keys``: the reservoir (at most ``max_rows`` rows with the smallest
    keys). ``update`` per sample, ``merge`` shards (exact)."""

    hessian_wanted: bool = True
    max_rows: int = 0
    hessian: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    sq_sum: np.ndarray | None = None
    rows: int = 0
    sample_rows: np.ndarray | None = None
    sample_keys: np.ndarray | None = None

    def update(self, x: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Fold rows ``x [n, K]`` in; ``keys`` (one per row, uniform in [0, 1)) for the reservoir."""
        x = np.asarray(x, np.float32)
        if self.hessian_wanted:
            h = (x.T @ x).astype(np.float64)
            self.hessian = h if self.hessian is None else self.hessian + h
        if self.max_rows:
            a = np.abs(x).sum(axis=0, dtype=np.float64)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
            q = np.square(x, dtype=np.float64).sum(axis=0)
            self.sq_sum = q if self.sq_sum is None else self.sq_sum + q
            if keys is None:
                raise ValueError("reservoir sampling needs one key per row")
            self._keep(x, np.asarray(keys, np.float64))
        self.rows += len(x)

    def _keep(self, x: np.ndarray, keys: np.ndarray) -> None:
        if self.sample_rows is not None:
            x = np.concatenate([self.sample_rows, x])
            keys = np.concatenate([self.sample_keys, keys])  # type: ignore[list-item]
        if len(keys) > self.max_rows:
            pick = np.sort(np.argpartition(keys, self.max_rows - 1)[: self.max_rows])
            x, keys = x[pick], keys[pick]
        self.sample_rows, self.sample_keys = np.ascontiguousarray(x), keys

    def merge(self, other: ActivationStats) -> ActivationStats:
        """The statistics of both sample sets together."""
        if other.hessian is not None:
            self.hessian = other.hessian.copy() if self.hessian is None else self.hessian + other.hessian
        if other.abs_sum is not None:
            self.abs_sum = other.abs_sum.copy() if self.abs_sum is None else self.abs_sum + other.abs_sum
        if other.sq_sum is not None:
            self.sq_sum = other.sq_sum.copy() if self.sq_sum is None else self.sq_sum + other.sq_sum
        if other.sample_rows is not None:
            self._keep(other.sample_rows, other.sample_keys)  # type: ignore[arg-type]
        self.rows += other.rows
        return self

    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)  # type: ignore[operator]

    def energy(self) -> np.ndarray | None:
        """``ΣX²`` per channel (the Hessian's diagonal), or None without either statistic."""
        if self.hessian is not None:
            return np.diag(self.hessian).copy()
        return None if self.sq_sum is None else self.sq_sum.copy()


@dataclass
class Target:
    """One weight the algorithm handles: its initializer, readers and their activation inputs."""

    value: ir.Value
    readers: list[ir.Node]
    transposed: bool  # stored [N, K] (read through Transpose, or Gemm transB=1)
    activations: list[str]


def resolve_constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array, through Identity chains (None for run-time values)."""
    while value is not None:
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return None
        value = producer.inputs[0]
    return None


def find_targets(model: ir.Model, exclude: Callable[[ir.Node], str] | None = None) -> dict[str, Target]:
    """The MatMul/Gemm weights the weight-only pass quantizes (see the module docstring)."""
    from onnxq.passes.weight_only import _uses

    exclude = exclude or (lambda node: "")
    targets: dict[str, Target] = {}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is None or value.dtype not in FLOAT_TYPES or len(const.shape) != 2:
            continue
        uses = _uses(value)
        if uses.other or uses.gather:
            continue
        readers = [*uses.matmul, *uses.gemm]
        via_t = [m for _, ms in uses.transposed for m in ms]
        if not readers and not via_t:
            continue
        if (readers and via_t) or any(exclude(n) for n in (*readers, *via_t)):
            continue
        gemm_t = [g.attributes.get_int("transB", 0) for g in uses.gemm]
        if uses.gemm and (uses.matmul or len(set(gemm_t)) > 1):
            continue
        if any(g.attributes.get_int("transA", 0) for g in uses.gemm):
            continue
        nodes = readers or via_t
        if any(n.graph is not model.graph for n in nodes):
            continue  # read inside an If/Loop/Scan body: its activations cannot be fetched, RTN
        acts = list(dict.fromkeys(n.inputs[0].name for n in nodes if n.inputs[0] is not None))
        if len(acts) != len({id(n.inputs[0]) for n in nodes}) or not all(acts):
            continue
        targets[name] = Target(value, nodes, bool(via_t) or bool(gemm_t and gemm_t[0]), acts)
    return targets


def float_row_readers(targets: dict[str, Target], key: tuple[str, ...]) -> list[ir.Node] | None:
    """The MatMuls that read the targets of activation ``key`` when float rows can be added beside
    them (each reads its weight directly as ``B`` and all read one activation), else None."""
    names = [n for n, t in targets.items() if tuple(t.activations) == key]
    readers: list[ir.Node] = []
    for name in names:
        t = targets[name]
        if t.transposed:
            return None
        for node in t.readers:
            if (
                node.op_type != "MatMul"
                or node.domain not in ("", "ai.onnx")
                or node.inputs[1] is not t.value
            ):
                return None
            readers.append(node)
    if not readers or len({id(r.inputs[0]) for r in readers}) != 1:
        return None
    return readers


def add_float_rows(
    model: ir.Model,
    targets: dict[str, Target],
    float_rows: dict[tuple[str, ...], np.ndarray],
    rows: dict[str, np.ndarray],
) -> list[str]:
    """Add ``X[..., float_rows] @ rows`` beside the MatMuls of every target in ``rows`` (whose
    integer weight has zeros there); float32 rows are stored as float16. Returns the summary's
    note on them (none when nothing was added)."""
    namer = Namer(model.graph)
    groups = count = nbytes = 0
    for key, keep in float_rows.items():
        readers = float_row_readers(targets, key)
        by_weight = {
            id(t.value): rows[n] for n, t in targets.items() if tuple(t.activations) == key and n in rows
        }
        if readers is None or not keep.size or not by_weight:
            continue
        readers = [r for r in readers if id(r.inputs[1]) in by_weight]
        dtype = readers[0].inputs[1].dtype or ir.DataType.FLOAT  # type: ignore[union-attr]
        storage = ir.DataType.FLOAT16 if dtype == ir.DataType.FLOAT else None
        by_weight = {k: v.astype(dtype.numpy()) for k, v in by_weight.items()}  # half models: half rows
        add_float_channels(model.graph, namer, readers, keep, by_weight, storage=storage)
        groups += 1
        count += keep.size
        nbytes += sum(a.size * (2 if storage is not None else a.itemsize) for a in by_weight.values())
    if not groups:
        return []
    return [f"float rows: {count} input features of {groups} activations kept float ({nbytes / 1e6:.2f} MB)"]


def collect_statistics(
    model: ir.Model,
    activations: Iterable[str],
    samples: Iterable[dict[str, np.ndarray]],
    *,
    hessian: bool,
    max_rows: int = 0,
    keep: int = 0,
    progress: bool = False,
    capture: Iterable[str] = (),
    store: ActivationStore | None = None,
    capture_samples: int = 0,
) -> tuple[dict[str, ActivationStats], int, list, list]:
    """One streaming pass of ``samples`` through the fp32 ``model``: :class:`ActivationStats` per
    activation, the number of samples, and the first ``keep`` inputs with their fp32 outputs. The
    values named in ``capture`` (activations, graph inputs or any other) of the first
    ``capture_samples`` samples are put whole into ``store``."""
    from onnxq.calibrate import _Augment, make_session, release_freed_memory, session_options

    names = list(dict.fromkeys(activations))
    stats = {n: ActivationStats(hessian, max_rows) for n in names}
    model_outputs = [v.name for v in model.graph.outputs]
    graph_inputs = {v.name for v in model.graph.inputs}
    capture = list(dict.fromkeys(capture)) if store is not None and capture_samples else []
    extra = [n for n in capture if n not in names and n not in graph_inputs]
    with _Augment(model, [], raw=names + extra):
        try:
            session = make_session(model, session_options(calibration=True))
        except Exception as exc:
            raise CalibrationDataError(f"ONNX Runtime cannot run the model for calibration: {exc}") from None
    kept_in: list = []
    kept_out: list = []
    seen = 0
    bar = tqdm(samples, desc="weight statistics", unit="sample", disable=not progress, leave=False)
    for sample in bar:
        fetch = names + ([n for n in model_outputs if n not in names] if len(kept_in) < keep else [])
        if seen < capture_samples:
            fetch += [n for n in extra if n not in fetch]
        try:
            outputs = dict(zip(fetch, run_sample(session, fetch, sample, seen), strict=True)) if fetch else {}
        except SampleFailed as exc:
            raise exc.calibration_error() from None
        if len(kept_in) < keep:
            kept_in.append(sample)
            kept_out.append({n: outputs[n] for n in model_outputs})
        if seen < capture_samples:
            for name in capture:
                store.put(seen, name, sample[name] if name in graph_inputs else outputs[name])  # type: ignore[union-attr]
            for name in extra:
                outputs.pop(name)
        keys: dict[int, np.ndarray] = {}  # reservoir keys per row count: same rows in every tensor
        for name in names:
            x = outputs.pop(name)
            if x.size == 0 or not np.issubdtype(x.dtype, np.floating):
                continue
            x2 = x.reshape(-1, x.shape[-1])
            if max_rows and len(x2) not in keys:
                keys[len(x2)] = np.random.default_rng([_SEED, seen, len(x2)]).random(len(x2))
            stats[name].update(x2, keys.get(len(x2)))
            del x, x2
        del outputs
        seen += 1
    del session
    release_freed_memory()
    if seen == 0:
        raise CalibrationDataError("the calibration data holds no samples")
    return stats, seen, kept_in, kept_out


def choose_float_rows(energy: np.ndarray | None, count: int | float) -> np.ndarray:
    """The rows kept float for an activation with per-channel ``energy`` (``ΣX²``): the ``count``
    largest (a float: that fraction of ``K``, rounded; at most ``K // 16``, none without energy),
    in ascending order."""
    if energy is not None and isinstance(count, float):
        count = round(count * len(energy))
    if energy is None or count <= 0:
        return np.empty(0, np.int64)
    top = np.argsort(-np.asarray(energy), kind="stable")[: min(count, len(energy) // 16)]
    return np.sort(top[np.asarray(energy)[top] > 0]).astype(np.int64)


def weight_block(spec: QuantSpec, length: int) -> int | None:
    """The block along K the weight-only pass uses for a weight with ``length`` rows of K."""
    from onnxq.config import PerBlock

    gran = spec.granularity
    if isinstance(gran, PerBlock):
        return gran.size if gran.size < length else None
    return None


def layer_by_layer(
    model: ir.Model,
    targets: dict[str, Target],
    samples: Iterable[dict[str, np.ndarray]],
    new_stats: Callable[[], ActivationStats],
    quantize_segment: Callable[[list[str], dict[str, ActivationStats]], dict[str, np.ndarray]],
    *,
    desc: str,
    progress: bool = False,
) -> int:
    """Drive an algorithm segment by segment (:mod:`onnxq.segments`, about one decoder layer a
    segment): the samples run through segment ``k`` once with its fp32 weights, to fold the
    statistics (``new_stats()`` per activation; rows keyed as in :func:`collect_statistics`) of
    the activations it produces, then ``quantize_segment(names, stats)`` handles the targets read
    in segment ``k`` and returns their dequantized weights (stored orientation), and the samples
    run through the segment once more with those, to produce what the next segment reads. Each
    layer thus sees the error of the layers before it. Statistics are dropped once every target
    reading them is done. Memory: one segment's weights twice, its statistics, and the cut
    activations of all samples (spilled to disk past :data:`onnxq.segments.STORE_BYTES`). Returns
    the number of samples."""
    from onnx import numpy_helper

    from onnxq.calibrate import _Augment, proto_for_ort, release_freed_memory, segment_opener
    from onnxq.segments import (
        node_reads,
        segment_model,
        segment_types,
        split,
        tensor_bytes,
        value_types,
    )

    acts = list(dict.fromkeys(a for t in targets.values() for a in t.activations))
    with _Augment(model, [], raw=acts):
        proto, folder = proto_for_ort(model)
    sizes = {t.name: tensor_bytes(t) for t in proto.graph.initializer}
    types = value_types(proto)
    total = sum(sizes.values())
    largest = max((sizes.get(n, 0) for n in targets), default=0)
    segments = split(proto.graph, max(total // 32, largest, 1))
    graph_inputs = {i.name for i in proto.graph.input}
    weight_segment: dict[str, int] = {}
    for k, seg in enumerate(segments):
        for i in seg.nodes:
            for n in node_reads(proto.graph.node[i]):
                if n in targets:
                    weight_segment.setdefault(n, k)
    last_use: dict[str, int] = {}  # activation → the last segment reading a target of it
    for n, t in targets.items():
        for a in t.activations:
            last_use[a] = max(last_use.get(a, -1), weight_segment.get(n, -1))
    stats: dict[str, ActivationStats] = {}
    open_session = segment_opener(folder)

    def fold(name: str, x: np.ndarray, i: int) -> None:
        if x.size and np.issubdtype(x.dtype, np.floating):
            stat = stats.setdefault(name, new_stats())
            x2 = x.reshape(-1, x.shape[-1])
            keys = np.random.default_rng([_SEED, i, len(x2)]).random(len(x2)) if stat.max_rows else None
            stat.update(x2, keys)

    store = ActivationStore()
    later = [{n for s in segments[k + 1 :] for n in s.inputs} for k in range(len(segments))]
    count = 0
    bar = tqdm(total=len(segments), desc=desc, unit="segment", disable=not progress, leave=False)
    try:
        for k, seg in enumerate(segments):
            part = segment_model(proto, seg, segment_types(types, store, seg, count))
            stat_fetch = [a for a in seg.outputs if a in acts]
            fp32 = open_session(part.SerializeToString(), True) if stat_fetch else None
            feeds: Iterable[tuple[int, dict[str, np.ndarray]]]
            if k == 0:
                feeds = enumerate(samples)
            else:
                feeds = ((i, {n: store.get(i, n) for n in seg.inputs}) for i in range(count))
            # pass 1: fp32 weights of this segment, statistics of the activations it produces
            cached: list[tuple[int, dict[str, np.ndarray]]] = []
            for i, feed in feeds:
                if k == 0:
                    count += 1
                    for name in later[0] & feed.keys():
                        store.put(i, name, feed[name])
                    for a in acts:
                        if a in graph_inputs and a in feed:
                            fold(a, feed[a], i)
                    feed = {n: feed[n] for n in seg.inputs if n in feed}
                    cached.append((i, feed))
                if fp32 is not None:
                    for name, x in zip(stat_fetch, run_sample(fp32, stat_fetch, feed, i), strict=True):
                        fold(name, x, i)
            del fp32
            # pass 2: this segment's weights quantized, outputs for the segments after it
            dequantized = quantize_segment([n for n in targets if weight_segment.get(n) == k], stats)
            for a in [a for a in stats if last_use.get(a, -1) <= k]:
                del stats[a]
            hand_on = [n for n in seg.outputs if n in later[k]]
            if hand_on:
                for init in part.graph.initializer:
                    if init.name in dequantized:
                        init.CopyFrom(numpy_helper.from_array(dequantized[init.name], init.name))
                del dequantized
                quantized = open_session(part.SerializeToString(), True)
                del part
                feeds = (
                    cached
                    if k == 0
                    else ((i, {n: store.get(i, n) for n in seg.inputs}) for i in range(count))
                )
                for i, feed in feeds:
                    for name, x in zip(hand_on, run_sample(quantized, hand_on, feed, i), strict=True):
                        store.put(i, name, x)
                del quantized
            cached = []
            store.drop(n for n in {key[1] for key in (*store.memory, *store.spilled)} if n not in later[k])
            release_freed_memory()
            bar.update(1)
    except SampleFailed as exc:
        raise exc.calibration_error() from None
    finally:
        bar.close()
        store.close()
    if count == 0:
        raise CalibrationDataError("the calibration data holds no samples")
    return count


def to_stored(t: Target, wk: np.ndarray) -> np.ndarray:
    """A ``[K, N]`` array in ``t``'s stored orientation."""
    return wk.T if t.transposed else wk


def read_weight(t: Target) -> np.ndarray:
    """``t``'s weight as float32 ``[K, N]`` (its file-backed data released)."""
    w = t.value.const_value.numpy()  # type: ignore[union-attr]
    wk = np.array(w.T if t.transposed else w, np.float32)
    del w
    release(t.value)
    return wk


def weight_rows(t: Target) -> int:
    """``K`` (the rows of the ``[K, N]`` view) of ``t``'s weight."""
    shape = t.value.shape
    return int(shape[1] if t.transposed else shape[0])  # type: ignore[index]
