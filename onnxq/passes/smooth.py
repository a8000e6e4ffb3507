"""SmoothQuant: move per-channel activation outliers into the following MatMul weights.

``X @ W == (X · s⁻¹) @ (diag(s) · W)`` for any positive per-channel ``s``. Dividing the channels of
``X`` that carry outliers and multiplying the matching rows of ``W`` leaves the float result as it
was, but makes ``X`` far easier to quantize per tensor while ``W`` is quantized per output column.

Guarantees: only activations whose every quantized use is a MatMul's first input with a constant,
quantized, unshared 2-D weight are candidates; their other (float) uses keep reading ``X``. Where
the MatMuls are ``X``'s only readers and ``X`` comes out of a per-channel affine step, ``s⁻¹`` is
folded into it and the graph gains no op: a LayerNorm/RMSNorm's ``gamma`` (and ``beta``) — as a
``LayerNormalization`` node or decomposed into ``Mul(·, gamma)`` [``Add(·, beta)``] — or, for
``X = a · b`` (a gated MLP's ``silu(gate) · up``), the output columns of the constant-weight MatMul
(and bias) that produces ``b``. Otherwise the smoothed tensor is a new ``Mul(X, s⁻¹)`` that takes
over ``X``'s place in the plan. Either way its range is the exact MinMax range of ``X · s⁻¹`` from
per-channel statistics. A tensor is smoothed only when
the expected squared error of its quantized MatMuls (activation rounding plus weight rounding,
from per-channel mean squares) goes down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.calibrate import ChannelStats
from onnxq.config import PerTensor, SmoothQuant
from onnxq.passes._util import Namer, SpillFile, add_initializer, release
from onnxq.plan import QuantPlan
from onnxq.qmath import IntType, int_type, scale_zero_point

log = logging.getLogger(__name__)

_MIN_SCALE = 1e-5
# Ops that read only a tensor's shape: scaling its values does not concern them.
_SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class Candidate:
    """The MatMuls that read an activation that could be smoothed, and their weights."""

    nodes: list[ir.Node]
    weights: list[ir.Value]


def find_candidates(model: ir.Model, plan: QuantPlan) -> dict[str, Candidate]:
    """Activations read quantized only by MatMuls (as input A) with constant, quantized, 2-D weights
    that nothing else uses."""
    nodes = {n.name: n for n in model.graph}
    planned_weights = {t.name for t in plan.weights.values()}
    out: dict[str, Candidate] = {}
    for name, tensor in plan.activations.items():
        if tensor.kind != "activation" or tensor.exclusive or not tensor.consumers:
            continue
        users = [nodes.get(n) for n, _ in tensor.consumers]
        if any(u is None or u.op_type != "MatMul" for u in users) or any(i != 0 for _, i in tensor.consumers):
            continue
        weights = [u.inputs[1] for u in users]  # type: ignore[union-attr]
        value = users[0].inputs[0]  # type: ignore[union-attr]
        shape = value.shape if value is not None else None
        k = shape[-1] if shape is not None and len(shape) >= 2 else None
        ok = isinstance(k, int) and all(
            w is not None
            and w.is_initializer()
            and w.const_value is not None
            and w.name in planned_weights
            and len(w.const_value.shape) == 2
            and w.const_value.shape[0] == k
            and {use.node.name for use in w.uses()} <= {u.name for u in users}  # type: ignore[union-attr]
            for w in weights
        )
        if ok:
            out[name] = Candidate(users, list(dict.fromkeys(weights)))  # type: ignore[arg-type]
    return out


def smoothed_range(stats: ChannelStats, s: np.ndarray) -> tuple[float, float]:
    """The exact MinMax range of ``X / s`` from ``X``'s per-channel extremes."""
    return float(np.min(stats.min / s)), float(np.max(stats.max / s))


def _expected_error(
    s: np.ndarray,
    stats: ChannelStats,
    abs_w: np.ndarray,
    sq_w: np.ndarray,
    act: tuple[IntType, bool],
    per_channel: bool,
) -> float:
    """Expected squared output error (summed over output columns) of quantized ``(X/s) @ (diag(s) W)``."""
    qtype, symmetric = act
    lo, hi = smoothed_range(stats, s)
    scale, _ = scale_zero_point(lo, hi, qtype, symmetric)  # widens the range to include 0
    act_noise = float(scale) ** 2 / 12.0 * float(np.dot(s**2, sq_w))
    scaled = abs_w * s[:, None].astype(abs_w.dtype)
    col_max = scaled.max(axis=0) if per_channel else np.full(abs_w.shape[1], scaled.max())
    w_step = col_max / 127.0
    weight_noise = float(np.sum(w_step**2) / 12.0 * np.dot(stats.mean_square(), 1.0 / s**2))
    return act_noise + weight_noise


def choose_scales(
    candidates: dict[str, Candidate],
    stats: dict[str, ChannelStats],
    plan: QuantPlan,
    config: SmoothQuant,
) -> dict[str, tuple[np.ndarray, float]]:
    """Per candidate, the smoothing factors ``s`` and the α chosen; tensors not worth it are absent."""
    weight_specs = {t.name: t for t in plan.weights.values()}
    chosen: dict[str, tuple[np.ndarray, float]] = {}
    for name, cand in candidates.items():
        st = stats.get(name)
        if st is None or st.min is None or st.rows == 0:
            continue
        a = st.absmax()
        median = float(np.median(a))
        if median <= 0 or float(a.max()) < config.min_outlier_ratio * median:
            continue
        # float32 copies (a gate/up pair of a 4096-wide model is 360 MB); sums in float64
        w = np.concatenate([c.const_value.numpy().astype(np.float32) for c in cand.weights], axis=1)
        for c in cand.weights:
            release(c)
        sq_w = np.einsum("ij,ij->i", w, w, dtype=np.float64)
        abs_w = np.abs(w, out=w)
        del w
        w_max = np.maximum(abs_w.max(axis=1), _MIN_SCALE)
        spec = plan.activations[name].spec
        act = (int_type(spec.dtype), spec.symmetric)
        per_channel = not isinstance(weight_specs[cand.weights[0].name].spec.granularity, PerTensor)
        ones = np.ones_like(a)
        best_s, best_alpha = ones, -1.0
        best_err = _expected_error(ones, st, abs_w, sq_w, act, per_channel)
        alphas = (config.alpha,) if config.alpha is not None else config.alphas
        for alpha in alphas:
            s = np.maximum(np.maximum(a, _MIN_SCALE) ** alpha / w_max ** (1.0 - alpha), _MIN_SCALE)
            err = _expected_error(s, st, abs_w, sq_w, act, per_channel)
            if err < best_err:
                best_s, best_alpha, best_err = s, alpha, err
        if best_alpha >= 0:
            chosen[name] = (best_s, best_alpha)
    return chosen


def _per_channel_constant(value: ir.Value | None, k: int) -> np.ndarray | None:
    """The array of a constant that scales/shifts the last axis channel by channel (size ``k``)."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.dtype.kind != "f" or array.shape[-1:] != (k,) or array.size != k:
        return None
    return array


def _only_use(value: ir.Value | None, node: ir.Node) -> bool:
    return value is not None and not value.is_graph_output() and [u.node for u in value.uses()] == [node]


def _divide(
    graph: ir.Graph,
    namer: Namer,
    node: ir.Node,
    index: int,
    s: np.ndarray,
    axis: int = -1,
    spill: SpillFile | None = None,
) -> None:
    """Divide constant input ``index`` of ``node`` by ``s`` along ``axis``: in place when ``node`` is
    its only reader (the name, which the plan may refer to, is kept), else as a new initializer so
    the other readers see the constant as it was."""
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    array = value.const_value.numpy()
    shape = [1] * array.ndim
    shape[axis] = s.size
    scaled = (array / s.reshape(shape)).astype(array.dtype)
    del array
    if [u.node for u in value.uses()] == [node]:
        old = value.const_value
        value.const_value = ir.Tensor(scaled, name=value.name)
        if isinstance(old, ir.ExternalTensor):
            old.release()
    else:
        value = add_initializer(graph, namer(f"{value.name}_smoothed"), scaled)
        node.replace_input_with(index, value)
    del scaled
    if spill is not None:
        spill.take(value)


def fold_into_producer(
    graph: ir.Graph,
    namer: Namer,
    x: ir.Value,
    readers: list[ir.Node],
    s: np.ndarray,
    spill: SpillFile | None = None,
) -> str | None:
    """Divide ``x``'s channels by ``s`` inside the node that produces it (see the module docstring);
    returns what was folded into, or None when no fold applies (nothing is changed then)."""
    value_readers = [u.node for u in x.uses() if u.node.op_type not in _SHAPE_ONLY]
    if x.is_graph_output() or sorted(map(id, value_readers)) != sorted(map(id, readers)):
        return None
    node, k = x.producer(), s.size
    if node is None:
        return None
    if node.op_type == "LayerNormalization" and node.attributes.get_int("axis", -1) in (
        -1,
        len(x.shape or ()) - 1,
    ):
        extra = [i for i in (1, 2) if len(node.inputs) > i and node.inputs[i] is not None]
        if all(_per_channel_constant(node.inputs[i], k) is not None for i in extra):
            for i in extra:
                _divide(graph, namer, node, i, s, spill=spill)
            return f"LayerNormalization {node.name}"
    if node.op_type == "Add":
        for c in (0, 1):
            other = node.inputs[1 - c]
            mul = other.producer() if other is not None else None
            if (
                _per_channel_constant(node.inputs[c], k) is not None
                and mul is not None
                and mul.op_type == "Mul"
                and _only_use(other, node)
            ):
                g = next((i for i in (0, 1) if _per_channel_constant(mul.inputs[i], k) is not None), None)
                if g is not None:
                    _divide(graph, namer, node, c, s, spill=spill)
                    _divide(graph, namer, mul, g, s, spill=spill)
                    return f"norm {mul.name} + {node.name}"
    if node.op_type == "Mul":
        g = next((i for i in (0, 1) if _per_channel_constant(node.inputs[i], k) is not None), None)
        if g is not None:
            _divide(graph, namer, node, g, s, spill=spill)
            return f"norm scale {node.name}"
        for i in (0, 1):  # X = a · b: scale b's producing MatMul (and its bias)
            b = node.inputs[i]
            producer = b.producer() if b is not None else None
            if producer is None or not _only_use(b, node):
                continue
            bias = None
            if producer.op_type == "Add":
                c = next(
                    (j for j in (0, 1) if _per_channel_constant(producer.inputs[j], k) is not None), None
                )
                inner = producer.inputs[1 - c] if c is not None else None
                matmul = inner.producer() if inner is not None else None
                if c is None or matmul is None or not _only_use(inner, producer):
                    continue
                bias = (producer, c)
            else:
                matmul = producer
            w = matmul.inputs[1] if matmul.op_type == "MatMul" and len(matmul.inputs) > 1 else None
            if (
                w is None
                or w.const_value is None
                or not w.is_initializer()
                or w.const_value.shape[-1:] != (k,)
            ):
                continue
            if len(w.const_value.shape) != 2:
                continue
            _divide(graph, namer, matmul, 1, s, axis=1, spill=spill)
            if bias is not None:
                _divide(graph, namer, bias[0], bias[1], s, spill=spill)
            return f"MatMul {matmul.name}"
    return None


class SmoothActivations(ir.passes.InPlacePass):
    """Scale the chosen MatMuls' weights by ``s`` and divide their input by ``s``: folded into its
    producer where possible, else by a new ``Mul(X, 1/s)``; the plan and ranges follow."""

    def __init__(
        self,
        plan: QuantPlan,
        ranges: dict[str, tuple[float, float]],
        candidates: dict[str, Candidate],
        scales: dict[str, tuple[np.ndarray, float]],
        stats: dict[str, ChannelStats],
    ) -> None:
        super().__init__()
        self.plan, self.ranges, self.stats = plan, ranges, stats
        self.candidates, self.scales = candidates, scales
        self.folded: dict[str, str] = {}  # smoothed tensor -> the node its 1/s was folded into
        self.spill: SpillFile | None = None  # where smoothed weights wait for the save, if set

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.scales:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        namer = Namer(graph)
        for name, (s, alpha) in self.scales.items():
            cand = self.candidates[name]
            x = cand.nodes[0].inputs[0]
            assert x is not None
            for weight in cand.weights:
                old = weight.const_value
                w = old.numpy()
                weight.const_value = ir.Tensor((w * s[:, None]).astype(w.dtype), name=weight.name)
                del w
                if isinstance(old, ir.ExternalTensor):
                    old.release()
                if self.spill is not None:
                    self.spill.take(weight)
            folded = fold_into_producer(graph, namer, x, cand.nodes, s, self.spill)
            if folded is not None:
                self.ranges[name] = smoothed_range(self.stats[name], s)
                self.folded[name] = folded
                log.info("smoothed %s (alpha %.2f) folded into %s", name, alpha, folded)
                continue
            inv = add_initializer(graph, namer(f"{name}_smooth_inv"), (1.0 / s).astype(np.float32))
            mul = ir.node("Mul", [x, inv], name=namer(f"{name}_smooth"))
            mul.outputs[0].name = namer(f"{name}_smoothed")
            mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
            graph.insert_before(cand.nodes[0], mul)  # the first reader in topological order
            for node in cand.nodes:
                node.replace_input_with(0, mul.outputs[0])
            new = mul.outputs[0].name
            tensor = self.plan.activations.pop(name)
            tensor.name = new
            self.plan.activations[new] = tensor
            self.ranges[new] = smoothed_range(self.stats[name], s)
            log.info("smoothed %s (alpha %.2f, max factor %.3g)", name, alpha, float(s.max()))
        return ir.passes.PassResult(model, True)
