"""AWQ (Lin et al., 2024) for integer weight-only quantization: per input channel, scales
``s = mean|X|^α`` searched to minimise the group's output error, ``1/s`` folded into the producer of
``X``, then a per-block clip search (:func:`apply_awq`; layer by layer: :func:`sequential_awq`;
on a block's output: :class:`BlockLoss`). Step 4 of the pipeline in :mod:`onnxq.weight_algorithms`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxq.config import AWQ, QuantSpec
from onnxq.lowbit import WEIGHT_TYPES, WeightType, dequantize_blocks, quantize_blocks
from onnxq.passes._util import Namer
from onnxq.segments import ActivationStore
from onnxq.weight_stats import (
    ActivationStats,
    Target,
    choose_float_rows,
    float_row_readers,
    layer_by_layer,
    read_weight,
    resolve_constant,
    to_stored,
    weight_block,
    weight_rows,
)

log = logging.getLogger(__name__)


def _rtn(w: np.ndarray, wtype: WeightType, block: int | None, symmetric: bool) -> np.ndarray:
    """``w [K, N]`` quantized to nearest and dequantized (blocks along K)."""
    q, scale, zp = quantize_blocks(np.asarray(w, np.float32), wtype, 0, block, symmetric)
    return dequantize_blocks(q, scale, zp, 0, block)


def awq_search_scale(
    mean_abs: np.ndarray,
    x: np.ndarray,
    weights: list[np.ndarray],
    wtype: WeightType,
    block: int | None,
    symmetric: bool,
    grid: int,
    duo: bool = False,
    loss: Callable[[list[np.ndarray]], float] | None = None,
) -> tuple[np.ndarray, float]:
    """The AWQ scale ``s [K]`` (and its α) minimising the group's output error on rows ``x``:
    ``mean|X|^α``, or with ``duo`` ``mean|X|^α / mean|Ŵ|^(1-α)`` (``Ŵ``: the weights relative to
    their block's extremum per output channel; AutoAWQ's ``duo_scaling``). With ``loss``, the error
    is ``loss([Q(s·W)/s for W in weights])`` instead (a block's output error, :class:`BlockLoss`)."""
    wcat = np.concatenate([np.asarray(w, np.float32) for w in weights], axis=1)
    splits = np.cumsum([w.shape[1] for w in weights])[:-1]
    x = np.asarray(x, np.float32)
    ref = x @ wcat if loss is None else None
    best = (np.inf, np.ones(len(mean_abs), np.float32), 0.0)
    base = np.maximum(np.asarray(mean_abs, np.float64), 1e-8)
    w_mean = _relative_weight_mean(wcat, block) if duo else None
    empty = ~wcat.any(axis=1)  # rows without weights (float rows): any scale, keep them at 1
    for i in range(grid):
        alpha = i / grid
        s = base**alpha
        if w_mean is not None:
            s = s / (w_mean ** (1 - alpha) + 1e-4)
        s = np.maximum(s, 1e-4)
        s[empty] = 1.0
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        wq = _rtn(wcat * s[:, None], wtype, block, symmetric) / s[:, None]
        err = float(np.mean((x @ wq - ref) ** 2)) if loss is None else loss(np.split(wq, splits, axis=1))
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


# Ops that end a block: the scale search's block never reaches past a normalization.
_NORMS = {
    "ReduceMean",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "InstanceNormalization",
}


_REGION_NODES = 256


@dataclass
class BlockRegion:
    """The nodes from a group's MatMuls to the next target MatMuls (included), in graph order; the
    nodes computing the constants they read from outside (``constant_nodes``: Constant, Transpose
    of a weight, ...; initializers are read directly), the run-time values they read from outside
    (``inputs``: captured per sample) and the values the loss compares (``outputs``: the next
    MatMuls' outputs)."""

    nodes: list[ir.Node]
    constant_nodes: list[ir.Node]
    inputs: list[str]
    outputs: list[str]


def find_block_regions(
    model: ir.Model, targets: dict[str, Target], groups: dict[str, list[str]]
) -> dict[str, BlockRegion]:
    """Per activation of ``groups``: the block its MatMuls feed, walking forward from their outputs
    and stopping at the readers of other targets (q/k/v → attention → o_proj; gate/up → act · up →
    down_proj). The walk does not follow ``Shape``/``Size`` (what they compute does not depend on
    the weights: it is captured like any other input). None where the walk meets a normalization,
    a subgraph, more than 256 nodes, or no other target (o_proj, down_proj, lm_head: their own
    outputs are the block)."""
    graph = model.graph
    order = {id(n): i for i, n in enumerate(graph)}
    stop = {id(r) for t in targets.values() for r in t.readers}
    found: dict[str, BlockRegion] = {}
    for act, names in groups.items():
        own = {id(r): r for n in names for r in targets[n].readers}
        region = dict(own)
        todo = [o for r in own.values() for o in r.outputs]
        outputs: list[str] = []
        ok = True
        while todo and ok:
            v = todo.pop()
            for node, _ in v.uses():
                if id(node) in region or node.op_type in ("Shape", "Size"):
                    continue  # shapes do not depend on the weights: their values are captured
                if node.graph is not graph or node.op_type in _NORMS or len(region) >= _REGION_NODES:
                    ok = False
                    break
                region[id(node)] = node
                if id(node) in stop:
                    outputs.extend(o.name for o in node.outputs if o.name)
                else:
                    todo.extend(node.outputs)
        if not ok or not outputs:
            continue
        inside = {id(o) for n in region.values() for o in n.outputs}
        group_weights = {id(targets[n].value) for n in names}
        consts: dict[int, ir.Node] = {}
        inputs: dict[str, None] = {}

        for node in region.values():
            for v in node.inputs:
                if v is None or id(v) in inside or id(v) in group_weights:
                    continue
                if not _constant(v, graph, consts):
                    ok = ok and bool(v.name)  # an unnamed value cannot be captured
                    inputs[v.name or ""] = None
        if ok:
            key = lambda n: order[id(n)]  # noqa: E731
            found[act] = BlockRegion(
                sorted(region.values(), key=key), sorted(consts.values(), key=key), list(inputs), outputs
            )
    return found


def _constant(v: ir.Value, graph: ir.Graph, consts: dict[int, ir.Node]) -> bool:
    """Whether ``v`` is computed from constants alone (adding its producers to ``consts``)."""
    p = v.producer()
    if p is None:
        return v.const_value is not None and not v.is_graph_input()
    if p.graph is not graph:
        return False
    if id(p) not in consts:
        if p.op_type != "Constant" and not (
            p.inputs and all(i is None or _constant(i, graph, consts) for i in p.inputs)
        ):
            return False
        consts[id(p)] = p
    return True


class BlockLoss:
    """The squared error of a :class:`BlockRegion`'s outputs when the group's weights are replaced,
    summed over the captured samples and divided by the outputs' total size. One ONNX Runtime
    session per region; the group's weights are its inputs (in their stored orientation and type),
    every other weight a copy of the model's."""

    def __init__(
        self,
        model: ir.Model,
        region: BlockRegion,
        targets: dict[str, Target],
        names: list[str],
        store: ActivationStore,
        samples: int,
    ) -> None:
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        from onnxq.calibrate import session_options

        self.names = names
        self.targets = targets
        self.store = store
        self.inputs = region.inputs
        self.samples = [i for i in range(samples) if all(store.has(i, n) for n in region.inputs)]
        weights = {targets[n].value.name for n in names}
        nodes = [ir.serde.serialize_node(n) for n in region.constant_nodes + region.nodes]
        read = {v.name: v for n in region.constant_nodes + region.nodes for v in n.inputs if v is not None}
        inits = [
            numpy_helper.from_array(v.const_value.numpy(), name)  # type: ignore[union-attr]
            for name, v in read.items()
            if v.producer() is None and v.const_value is not None and name not in weights
        ]

        def info(name: str, dtype: ir.DataType | None, rank: int | None = None):
            elem = (dtype or ir.DataType.FLOAT).value
            return helper.make_tensor_value_info(name, elem, None if rank is None else [None] * rank)

        first = self.samples[0] if self.samples else None
        graph_inputs = [
            info(n, ir.DataType.from_numpy(store.get(first, n).dtype) if first is not None else read[n].dtype)
            for n in region.inputs
        ]
        graph_inputs += [info(targets[n].value.name, targets[n].value.dtype, 2) for n in names]  # type: ignore[arg-type]
        outs = {o.name: o for n in region.nodes for o in n.outputs}
        graph_outputs = [info(n, outs[n].dtype) for n in region.outputs]
        g = helper.make_graph(nodes, "awq_block", graph_inputs, graph_outputs, inits)
        opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
        proto = helper.make_model(g, opset_imports=opsets, ir_version=model.ir_version)
        self.session = ort.InferenceSession(
            proto.SerializeToString(), session_options(calibration=True), providers=["CPUExecutionProvider"]
        )
        self.dtypes = {n: (targets[n].value.dtype or ir.DataType.FLOAT).numpy() for n in names}
        self.reference = [self.run_sample(i, {}) for i in self.samples]

    def run_sample(self, i: int, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        feed = {n: self.store.get(i, n) for n in self.inputs}
        for n in self.names:
            t = self.targets[n]
            w = weights.get(n)
            if w is None:
                feed[t.value.name] = t.value.const_value.numpy()  # type: ignore[union-attr]
            else:
                feed[t.value.name] = np.ascontiguousarray((w.T if t.transposed else w).astype(self.dtypes[n]))
        return [np.asarray(o, np.float32) for o in self.session.run(None, feed)]

    def __call__(self, weights: list[np.ndarray]) -> float:
        """The error with ``weights`` (``[K, N]`` each, in ``names`` order)."""
        given = dict(zip(self.names, weights, strict=True))
        err = size = 0.0
        for i, ref in zip(self.samples, self.reference, strict=True):
            for out, r in zip(self.run_sample(i, given), ref, strict=True):
                err += float(np.sum(np.square(out - r, dtype=np.float64)))
                size += r.size
        return err / max(size, 1.0)


def _relative_weight_mean(w: np.ndarray, block: int | None) -> np.ndarray:
    """Per row of ``w [K, N]``: the mean over columns of ``|w|`` relative to its block's (along K)
    largest ``|w|`` in that column."""
    a = np.abs(np.asarray(w, np.float64))
    g = len(a) if block is None else block
    rel = np.empty_like(a)
    for b0 in range(0, len(a), g):
        blk = a[b0 : b0 + g]
        rel[b0 : b0 + g] = blk / (blk.max(axis=0, keepdims=True) + 1e-6)
    return rel.mean(axis=1)


def awq_clip(
    w: np.ndarray,
    x: np.ndarray,
    wtype: WeightType,
    block: int | None,
    symmetric: bool,
    clip_grid: int,
    max_shrink: float,
) -> np.ndarray:
    """``w [K, N]`` clamped per block and output channel to the shrunk range that minimises the
    block's partial output error ``‖x_b·(Q(clamp(w_b)) − w_b)‖²`` on rows ``x``."""
    w = np.array(w, np.float32)
    k = w.shape[0]
    g = k if block is None else block
    x = np.asarray(x, np.float32)
    steps = max(1, int(max_shrink * clip_grid))
    for b0 in range(0, k, g):
        wb = w[b0 : b0 + g]
        xb = x[:, b0 : b0 + g]
        ref = xb @ wb
        absmax = np.abs(wb).max(axis=0)
        best_err = np.full(w.shape[1], np.inf)
        best_max = absmax.copy()
        for i in range(steps):
            m = absmax * (1.0 - i / clip_grid)
            wc = np.clip(wb, -m, m)
            deq = _rtn(wc, wtype, None, symmetric)
            err = np.mean((xb @ deq - ref) ** 2, axis=0)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_max = np.where(better, m, best_max)
        w[b0 : b0 + g] = np.clip(wb, -best_max, best_max)
    return w


@dataclass
class AWQReport:
    """What :func:`apply_awq` did."""

    scaled: dict[str, tuple[float, str]] = field(default_factory=dict)  # activation → (α, where folded)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # activation → s (applied)
    clipped: int = 0
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # target → float rows (scaled, [r, N])
    block_loss: int = 0  # groups whose scale was searched on their block's output


def apply_awq(
    model: ir.Model,
    targets: dict[str, Target],
    stats: dict[str, ActivationStats],
    spec: QuantSpec,
    config: AWQ,
    float_rows: dict[tuple[str, ...], np.ndarray] | None = None,
    blocks: tuple[dict[str, BlockRegion], ActivationStore, int] | None = None,
    *,
    progress: bool = False,
) -> AWQReport:
    """AWQ's scale search, folding and clip search on ``model`` in place (:mod:`onnxq.weight_algorithms`,
    step 4). The ``float_rows`` of an activation are left out of both searches, and taken out of the
    weights (into ``AWQReport.rows``, zero in the weights) after every scale is applied. ``blocks``: the
    regions of :func:`find_block_regions`, the store holding their inputs and the number of samples there;
    a group with a region has its scale searched on the region's outputs."""
    float_rows = float_rows or {}
    regions, store, captured = blocks if blocks is not None else ({}, ActivationStore(), 0)
    graph = model.graph
    wtype = WEIGHT_TYPES[spec.dtype]
    block = getattr(spec.granularity, "size", None)
    symmetric = wtype.signed
    report = AWQReport()
    arrays: dict[str, np.ndarray] = {}  # modified weights, [K, N] orientation for targets

    def weight(name: str) -> np.ndarray:
        if name not in arrays:
            t = targets[name]
            w = np.array(t.value.const_value.numpy(), np.float32)  # type: ignore[union-attr]
            arrays[name] = np.ascontiguousarray(w.T) if t.transposed else w
        return arrays[name]

    groups = {act: names for act, names in awq_groups(targets).items() if act in stats}
    scales: dict[str, np.ndarray] = {}
    for act, names in tqdm(
        groups.items(), desc="AWQ search", unit="activation", disable=not progress, leave=False
    ):
        st = stats[act]
        if st.sample_rows is None or st.abs_sum is None:
            continue
        k = weight(names[0]).shape[0]
        if any(weight(n).shape[0] != k for n in names) or st.sample_rows.shape[1] != k:
            continue
        keep = float_rows.get((act,), np.empty(0, np.int64))
        loss = _block_loss(model, regions.get(act), targets, names, store, captured, keep, weight)
        report.block_loss += loss is not None
        s, alpha = awq_search_scale(
            st.mean_abs(),
            st.sample_rows,
            [_zero_rows(weight(n), keep) for n in names],
            wtype,
            block,
            symmetric,
            config.grid,
            config.duo,
            loss,
        )
        del loss
        if alpha == 0.0 and not config.duo:
            report.scaled[act] = (0.0, "not scaled (α = 0 is best)")
            continue
        scales[act] = s
        report.scaled[act] = (alpha, "")
    for act, s in scales.items():
        for n in groups[act]:
            arrays[n] = weight(n) * s[:, None]
    _fold_scales(graph, targets, groups, scales, weight, arrays, report)
    _take_rows(groups, float_rows, weight, arrays, report)
    if config.clip:
        for act, names in groups.items():
            st = stats[act]
            if st.sample_rows is None:
                continue
            x = st.sample_rows / scales[act][None, :] if act in scales else st.sample_rows
            for n in names:
                if weight(n).shape[0] == x.shape[1]:
                    arrays[n] = awq_clip(
                        weight(n), x, wtype, block, symmetric, config.clip_grid, config.max_shrink
                    )
                    report.clipped += 1
    report.scales = scales
    for name, w in arrays.items():
        _write_back(targets[name].value, np.ascontiguousarray(w.T) if targets[name].transposed else w)
    return report


def _fold_scales(graph, targets, groups, scales, weight, arrays, report: AWQReport) -> None:
    """Fold ``1/s`` of every scaled activation (its weights already hold ``s``)."""
    namer = Namer(graph)
    values = {v.name: v for v in _all_values(graph)}
    for act, s in scales.items():
        report.scaled[act] = (
            report.scaled[act][0],
            _fold(graph, namer, values[act], s, groups[act], targets, weight, arrays),
        )


def _take_rows(groups, float_rows, weight, arrays, report: AWQReport) -> None:
    """Move the float rows out of the weights into ``report.rows`` (after every fold: a fold may
    scale another group's rows)."""
    for act, names in groups.items():
        keep = float_rows.get((act,))
        if keep is not None and keep.size:
            for n in names:
                report.rows[n] = weight(n)[keep].copy()
                arrays[n][keep] = 0.0


def sequential_awq(
    model: ir.Model,
    targets: dict[str, Target],
    samples: Iterable[dict[str, np.ndarray]],
    spec: QuantSpec,
    config: AWQ,
    *,
    progress: bool = False,
) -> tuple[AWQReport, dict[tuple[str, ...], np.ndarray], int, Callable[[], None]]:
    """AWQ layer by layer (:func:`~onnxq.weight_stats.layer_by_layer`): each group's scale, clip and float
    rows are searched on the activations the already quantized layers before it produce (the reference is
    the fp32 weights on those inputs). Returns the report, the float rows per activation, the number of
    samples and ``apply()``, which changes the model: it folds every scale and takes the float rows out,
    as :func:`apply_awq` does."""
    wtype = WEIGHT_TYPES[spec.dtype]
    block = getattr(spec.granularity, "size", None)
    symmetric = wtype.signed
    groups = awq_groups(targets)
    report = AWQReport()
    arrays: dict[str, np.ndarray] = {}  # scaled and clipped weights (float rows still in), [K, N]
    scales: dict[str, np.ndarray] = {}
    float_rows: dict[tuple[str, ...], np.ndarray] = {}
    pending: dict[str, np.ndarray] = {}  # dequantized weights not handed on yet
    done: set[str] = set()

    def quantize_segment(names: list[str], stats: dict[str, ActivationStats]) -> dict[str, np.ndarray]:
        for act, group in groups.items():
            st = stats.get(act)
            if act in done or not any(n in names for n in group) or st is None or st.sample_rows is None:
                continue
            done.add(act)
            if any(weight_rows(targets[n]) != st.sample_rows.shape[1] for n in group):
                continue
            ws = {n: read_weight(targets[n]) for n in group}
            keep = choose_float_rows(
                st.energy(), config.float_rows if float_row_readers(targets, (act,)) else 0
            )
            s, alpha = awq_search_scale(
                st.mean_abs(),
                st.sample_rows,
                [_zero_rows(ws[n], keep) for n in group],
                wtype,
                block,
                symmetric,
                config.grid,
                config.duo,
            )
            if alpha == 0.0 and not config.duo:
                report.scaled[act] = (0.0, "not scaled (α = 0 is best)")
                s = np.ones(len(s), np.float32)
            else:
                scales[act] = s
                report.scaled[act] = (alpha, "")
            x = st.sample_rows / s[None, :]
            if keep.size:
                float_rows[(act,)] = keep
            for n in group:
                t = targets[n]
                w = ws.pop(n) * s[:, None]
                c = _zero_rows(w, keep) if keep.size else w.copy()
                if config.clip:
                    c = awq_clip(c, x, wtype, block, symmetric, config.clip_grid, config.max_shrink)
                    report.clipped += 1
                deq = _rtn(c, wtype, weight_block(spec, len(c)), symmetric)
                if keep.size:
                    c[keep] = w[keep]
                    deq[keep] = w[keep]
                arrays[n] = c
                deq /= s[:, None]
                pending[n] = np.ascontiguousarray(to_stored(t, deq)).astype(
                    (t.value.dtype or ir.DataType.FLOAT).numpy()
                )
        return {n: pending.pop(n) for n in names if n in pending}

    count = layer_by_layer(
        model,
        targets,
        samples,
        lambda: ActivationStats(False, config.max_rows),
        quantize_segment,
        desc="AWQ layer by layer",
        progress=progress,
    )
    report.scales = scales

    def apply() -> None:
        """Fold every scale, take the float rows out, write the weights back."""

        def weight(name: str) -> np.ndarray:
            if name not in arrays:
                arrays[name] = read_weight(targets[name])
            return arrays[name]

        _fold_scales(model.graph, targets, groups, scales, weight, arrays, report)
        _take_rows(groups, float_rows, weight, arrays, report)
        for name, w in arrays.items():
            _write_back(targets[name].value, np.ascontiguousarray(to_stored(targets[name], w)))

    return report, float_rows, count, apply


def awq_groups(targets: dict[str, Target]) -> dict[str, list[str]]:
    """Activation → the targets reading it and nothing else (one scale search each)."""
    groups: dict[str, list[str]] = {}
    for name, t in targets.items():
        if len(t.activations) == 1:
            groups.setdefault(t.activations[0], []).append(name)
    return groups


def _block_loss(
    model: ir.Model,
    region: BlockRegion | None,
    targets: dict[str, Target],
    names: list[str],
    store: ActivationStore,
    captured: int,
    keep: np.ndarray,
    weight: Callable[[str], np.ndarray],
) -> Callable[[list[np.ndarray]], float] | None:
    """The block-output loss for one group (its float rows put back into every candidate), or None
    where the group has no region or ONNX Runtime cannot run it (the layer loss is used then)."""
    if region is None or not captured:
        return None
    try:
        block = BlockLoss(model, region, targets, names, store, captured)
    except Exception as exc:  # an op ORT cannot run alone: fall back to the group's own outputs
        log.debug("AWQ: no block loss for %s: %s", names, str(exc).splitlines()[0] if str(exc) else exc)
        return None
    if not block.samples:
        return None
    if not keep.size:
        return block
    originals = [weight(n)[keep] for n in names]

    def loss(ws: list[np.ndarray]) -> float:
        restored = []
        for w, rows in zip(ws, originals, strict=True):
            w = w.copy()
            w[keep] = rows
            restored.append(w)
        return block(restored)

    return loss


def _zero_rows(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``w`` with ``rows`` set to zero (a copy when there are any)."""
    if not rows.size:
        return w
    w = w.copy()
    w[rows] = 0.0
    return w


def _fold(graph, namer, x: ir.Value, s, group, targets, weight, arrays) -> str:
    """Fold ``1/s`` into ``x``'s producer, or insert ``Mul(x, 1/s)`` before the group's readers."""
    readers = {id(n) for name in group for n in targets[name].readers}
    only_group = not x.is_graph_output() and all(  # Shape/Size read no values: scaling is invisible
        id(node) in readers or node.op_type in ("Shape", "Size") for node, _ in x.uses()
    )
    producer = x.producer()
    inv = (1.0 / s).astype(np.float32)
    if (
        only_group
        and producer is not None
        and producer.op_type == "Mul"
        and producer.domain in ("", "ai.onnx")
    ):
        k = len(s)
        for idx, operand in enumerate(producer.inputs):
            c = resolve_constant(operand)
            other = producer.inputs[1 - idx]
            if c is None or resolve_constant(other) is not None:
                continue
            if not (c.size == 1 or (c.size == k and c.shape[-1] == k)):
                continue
            folded = (np.broadcast_to(c.reshape(-1), (k,)) * inv).astype(c.dtype)
            name = namer(f"{operand.name or 'awq'}_awq")
            new = ir.Value(name=name, const_value=ir.Tensor(folded, name=name))
            new.shape, new.dtype = ir.Shape([k]), ir.DataType.from_numpy(folded.dtype)
            graph.register_initializer(new)
            producer.replace_input_with(idx, new)
            if operand.is_initializer() and not operand.uses() and not operand.is_graph_output():
                graph.initializers.pop(operand.name, None)  # nothing reads the old constant now
            return f"into {producer.name} (constant {operand.name})"
        for operand in producer.inputs:  # Mul(a, MatMul(y, W_up)): scale W_up's output columns
            where = _fold_into_matmul(operand, x, inv, targets, weight, arrays)
            if where:
                return where
    if only_group and producer is not None:
        where = _fold_into_matmul(x, x, inv, targets, weight, arrays)
        if where:
            return where
    node = ir.node("Mul", [x, None], name=namer(f"{x.name}_awq/Mul"))
    inv_name = namer(f"{x.name}_awq_inv_scale")
    dtype = x.dtype or ir.DataType.FLOAT
    inv_v = ir.Value(name=inv_name, const_value=ir.Tensor(inv.astype(dtype.numpy()), name=inv_name))
    inv_v.shape, inv_v.dtype = ir.Shape([len(s)]), dtype
    graph.register_initializer(inv_v)
    node.replace_input_with(1, inv_v)
    node.outputs[0].name = namer(f"{x.name}_awq")
    node.outputs[0].shape, node.outputs[0].dtype = x.shape, dtype
    first = min((n for name in group for n in targets[name].readers), key=_order(graph))
    graph.insert_before(first, node)
    for name in group:
        for r in targets[name].readers:
            r.replace_input_with(0, node.outputs[0])
    return f"Mul {node.name} inserted"


def _fold_into_matmul(v: ir.Value | None, x: ir.Value, inv, targets, weight, arrays) -> str:
    """Scale the output columns of the constant weight of the MatMul producing ``v`` (only read
    there, ``v`` only read on the way to ``x``)."""
    if v is None:
        return ""
    mm = v.producer()
    if mm is None or mm.op_type != "MatMul" or len(v.uses()) != 1 or v.is_graph_output():
        return ""
    w_v = mm.inputs[1]
    if w_v is None or w_v.const_value is None or len(w_v.uses()) != 1 or w_v.shape is None:
        return ""
    if len(w_v.shape) != 2 or w_v.shape[1] != len(inv):
        return ""
    if w_v.name in targets and not targets[w_v.name].transposed:
        arrays[w_v.name] = weight(w_v.name) * inv[None, :]
    else:
        _write_back(w_v, np.asarray(w_v.const_value.numpy(), np.float32) * inv[None, :])
    return f"into the output columns of {w_v.name} ({mm.name})"


def _write_back(value: ir.Value, array: np.ndarray) -> None:
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    value.const_value = ir.Tensor(np.ascontiguousarray(array.astype(dtype)), name=value.name)


def _order(graph: ir.Graph) -> Callable[[ir.Node], int]:
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda n: order[id(n)]


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
