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

Float channels (main graph only): the few channels :func:`float_channels` picks are computed by a
float ``Gather(X, c, axis=-1) → MatMul(·, diag(s) W[c]) → Add`` beside each quantized MatMul,
whose weight rows ``c`` become zero; their ``s_c`` places them inside the range of the other
channels, so they widen nothing. Where no other channel is smoothed there is no ``Mul``: ``X`` is
quantized with its other channels' range, and the float channels saturate, which their zero
weight rows make harmless. The ``Add`` takes the MatMul output's name (the plan's name for
it); the quantized MatMul's own output is renamed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.calibrate import ChannelStats
from onnxq.config import PerTensor, QuantSpec, SmoothQuant
from onnxq.passes._util import Namer, SpillFile, add_float_channels, add_initializer, release
from onnxq.plan import BodyPlan, QuantPlan
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


@dataclass
class BodyMember:
    """One activation inside an If/Loop/Scan body, and the MatMuls that read it."""

    body: BodyPlan
    name: str
    nodes: list[ir.Node]


@dataclass
class BodyCandidate:
    """Activations in bodies that read the same weights (a merged decoder's two branches read one
    set): they are smoothed together, by one ``s`` from their pooled statistics."""

    members: list[BodyMember]
    weights: list[ir.Value]


def _matmul_readers(
    graph: ir.Graph, plan: QuantPlan, any_shape: bool = False
) -> Iterator[tuple[str, list[ir.Node], list[ir.Value]]]:
    """Activations of ``plan`` read quantized only by MatMuls (as input A) with constant, quantized,
    2-D ``[K, N]`` weights, K the activation's last dimension; with those MatMuls and weights. With
    ``any_shape``, an activation of unknown shape counts too (its last dimension is the weights' K,
    as MatMul requires): shape inference often stops inside bodies, at a ``ReduceMean`` whose axes
    are an outer-scope constant it cannot read."""
    nodes = {n.name: n for n in graph}
    planned_weights = {t.name for t in plan.weights.values()}
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
        if any_shape and shape is None and weights[0] is not None and weights[0].const_value is not None:
            k = weights[0].const_value.shape[0]
        ok = isinstance(k, int) and all(
            w is not None
            and w.is_initializer()
            and w.const_value is not None
            and w.name in planned_weights
            and len(w.const_value.shape) == 2
            and w.const_value.shape[0] == k
            for w in weights
        )
        if ok:
            yield name, users, weights  # type: ignore[misc]


def find_candidates(model: ir.Model, plan: QuantPlan) -> dict[str, Candidate]:
    """Activations of the main graph read quantized only by MatMuls (as input A) with constant,
    quantized, 2-D weights that nothing else uses."""
    out: dict[str, Candidate] = {}
    for name, users, weights in _matmul_readers(model.graph, plan):
        readers = {u.name for u in users}
        if all({use.node.name for use in w.uses()} <= readers for w in weights):
            out[name] = Candidate(users, list(dict.fromkeys(weights)))
    return out


def find_body_candidates(bodies: list[BodyPlan]) -> dict[str, BodyCandidate]:
    """Activations inside bodies read as :func:`find_candidates` says, grouped by the weights they
    read: a group is a candidate when its MatMuls are all those weights' readers. Keyed
    ``<body label>/<activation>`` of the group's first member."""
    groups: dict[frozenset[int], BodyCandidate] = {}
    for body in bodies:
        for name, users, weights in _matmul_readers(body.graph, body.plan, any_shape=True):
            unique = list(dict.fromkeys(weights))
            group = groups.setdefault(frozenset(map(id, unique)), BodyCandidate([], unique))
            group.members.append(BodyMember(body, name, users))
    out: dict[str, BodyCandidate] = {}
    for group in groups.values():
        readers = {id(n) for m in group.members for n in m.nodes}
        if all({id(use.node) for use in w.uses()} <= readers for w in group.weights):
            first = group.members[0]
            out[f"{first.body.label}/{first.name}"] = group
    return out


@dataclass(frozen=True)
class Smoothing:
    """What SmoothQuant chose for one activation: the factors ``s`` (``X / s`` is quantized), the α
    they came from (``None``: no smoothing, only float channels, and ``s`` all ones) and the
    channels computed in float (ascending indices, possibly none)."""

    s: np.ndarray
    alpha: float | None
    float_channels: np.ndarray


def float_channels(absmax: np.ndarray, config: SmoothQuant) -> np.ndarray:
    """The channels (ascending) whose largest magnitude exceeds ``config.float_channel_ratio`` times
    that of the ``r+1``-th largest of the ``K`` channels, ``r = min(2n, K // 2)`` with
    ``n = config.float_channels``; at most ``min(n, K // 4)`` of them, the largest."""
    n = min(config.float_channels, absmax.size // 4)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-absmax, kind="stable")
    reference = max(float(absmax[order[min(2 * config.float_channels, absmax.size // 2)]]), _MIN_SCALE)
    top = order[:n]
    return np.sort(top[absmax[top] > config.float_channel_ratio * reference]).astype(np.int64)


def _subset(stats: ChannelStats, keep: np.ndarray) -> ChannelStats:
    return ChannelStats(stats.min[keep], stats.max[keep], stats.sumsq[keep], stats.rows)  # type: ignore[index]


def _inside(stats: ChannelStats, channels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Factors that bring ``channels`` inside ``[lo, hi]`` (or, where one side is empty, inside
    ``±max(|lo|, |hi|)``)."""
    cmin, cmax = stats.min[channels], stats.max[channels]  # type: ignore[index]
    up = np.where(cmax > 0, cmax / hi if hi > 0 else np.inf, 0.0)
    down = np.where(cmin < 0, cmin / lo if lo < 0 else np.inf, 0.0)
    s = np.maximum(np.maximum(up, down), _MIN_SCALE)
    fallback = np.maximum(np.abs(cmin), np.abs(cmax)) / max(abs(lo), abs(hi), _MIN_SCALE)
    return np.where(np.isfinite(s), s, np.maximum(fallback, _MIN_SCALE))


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


def _best_alpha(
    st: ChannelStats,
    abs_w: np.ndarray,
    sq_w: np.ndarray,
    act: tuple[IntType, bool],
    per_channel: bool,
    config: SmoothQuant,
) -> tuple[np.ndarray, float | None, float]:
    """The factors, α (``None``: no smoothing) and expected error of the best α for ``st``."""
    a = st.absmax()
    w_max = np.maximum(abs_w.max(axis=1), _MIN_SCALE)
    best_s, best_alpha = np.ones_like(a), None
    best_err = _expected_error(best_s, st, abs_w, sq_w, act, per_channel)
    median = float(np.median(a))
    if median <= 0 or float(a.max()) < config.min_outlier_ratio * median:
        return best_s, best_alpha, best_err
    for alpha in (config.alpha,) if config.alpha is not None else config.alphas:
        s = np.maximum(np.maximum(a, _MIN_SCALE) ** alpha / w_max ** (1.0 - alpha), _MIN_SCALE)
        err = _expected_error(s, st, abs_w, sq_w, act, per_channel)
        if err < best_err:
            best_s, best_alpha, best_err = s, alpha, err
    return best_s, best_alpha, best_err


def choose_scale(
    weights: list[ir.Value],
    st: ChannelStats | None,
    act_spec: QuantSpec,
    per_channel: bool,
    config: SmoothQuant,
) -> Smoothing | None:
    """The smoothing factors ``s``, the α chosen and the float channels for an activation with
    statistics ``st`` read by MatMuls with ``weights``; None when smoothing does not lower the
    expected error and no channel goes to float. Outlier channels (:func:`float_channels`) go to
    float only when that divides the expected error by ``config.float_channel_gain``."""
    if st is None or st.min is None or st.rows == 0:
        return None
    a = st.absmax()
    median = float(np.median(a))
    outliers = float_channels(a, config)
    if (median <= 0 or float(a.max()) < config.min_outlier_ratio * median) and not outliers.size:
        return None
    # float32 copies (a gate/up pair of a 4096-wide model is 360 MB); sums in float64
    w = np.concatenate([c.const_value.numpy().astype(np.float32) for c in weights], axis=1)  # type: ignore[union-attr]
    for c in weights:
        release(c)
    sq_w = np.einsum("ij,ij->i", w, w, dtype=np.float64)
    abs_w = np.abs(w, out=w)
    del w
    act = (int_type(act_spec.dtype), act_spec.symmetric)
    s, alpha, err = _best_alpha(st, abs_w, sq_w, act, per_channel, config)
    if outliers.size:
        keep = np.ones(a.size, dtype=bool)
        keep[outliers] = False
        kept = _subset(st, keep)
        s_kept, alpha_kept, err_kept = _best_alpha(kept, abs_w[keep], sq_w[keep], act, per_channel, config)
        if err > config.float_channel_gain * err_kept:
            s = np.ones_like(a)
            if alpha_kept is not None:
                s[keep] = s_kept
                s[outliers] = _inside(st, outliers, *smoothed_range(kept, s_kept))
            return Smoothing(s, alpha_kept, outliers)
    return Smoothing(s, alpha, np.zeros(0, dtype=np.int64)) if alpha is not None else None


def summary_fields(chosen: dict[str, Smoothing]) -> dict[str, dict[str, float] | dict[str, int]]:
    """The summary's ``smoothed`` (activation → α) and ``float_channels`` (activation → count)."""
    return {
        "smoothed": {name: c.alpha for name, c in chosen.items() if c.alpha is not None},
        "float_channels": {n: c.float_channels.size for n, c in chosen.items() if c.float_channels.size},
    }


def _per_channel_weights(plan: QuantPlan) -> dict[str, bool]:
    """Weight name → whether ``plan`` quantizes it per channel."""
    return {t.name: not isinstance(t.spec.granularity, PerTensor) for t in plan.weights.values()}


def choose_scales(
    candidates: dict[str, Candidate],
    stats: dict[str, ChannelStats],
    plan: QuantPlan,
    config: SmoothQuant,
) -> dict[str, Smoothing]:
    """Per candidate, what :func:`choose_scale` chose; tensors not worth it are absent."""
    per_channel = _per_channel_weights(plan)
    chosen: dict[str, Smoothing] = {}
    for name, cand in candidates.items():
        spec = plan.activations[name].spec
        found = choose_scale(cand.weights, stats.get(name), spec, per_channel[cand.weights[0].name], config)
        if found is not None:
            chosen[name] = found
    return chosen


def choose_body_scales(
    candidates: dict[str, BodyCandidate],
    stats: dict[int, dict[str, ChannelStats]],
    config: SmoothQuant,
) -> dict[str, Smoothing]:
    """:func:`choose_scales` for body candidates, each from its members' pooled statistics (members
    that never ran add nothing); no float channels in bodies."""
    config = dataclasses.replace(config, float_channels=0)
    per_channel: dict[int, dict[str, bool]] = {}
    chosen: dict[str, Smoothing] = {}
    for key, cand in candidates.items():
        pooled = ChannelStats()
        for m in cand.members:
            pooled.merge(stats.get(id(m.body.graph), {}).get(m.name, ChannelStats()))
        first = cand.members[0]
        spec = first.body.plan.activations[first.name].spec
        specs = per_channel.setdefault(id(first.body.graph), _per_channel_weights(first.body.plan))
        found = choose_scale(cand.weights, pooled, spec, specs[cand.weights[0].name], config)
        if found is not None:
            chosen[key] = found
    return chosen


def body_channels(candidates: dict[str, BodyCandidate]) -> dict[int, list[tuple[str, int]]]:
    """Body id → ``(activation, channels)`` whose per-channel statistics the candidates need (what
    :func:`onnxq.calibrate.calibrate` takes as ``body_channels``)."""
    wanted: dict[int, list[tuple[str, int]]] = {}
    for cand in candidates.values():
        k = cand.weights[0].const_value.shape[0]  # type: ignore[union-attr]
        for m in cand.members:
            wanted.setdefault(id(m.body.graph), []).append((m.name, k))
    return wanted


def smooth_bodies(
    candidates: dict[str, BodyCandidate],
    stats: dict[int, dict[str, ChannelStats]],
    ranges: dict[int, dict[str, tuple[float, float]]],
    config: SmoothQuant | None,
) -> SmoothBodies:
    """The :class:`SmoothBodies` pass for ``candidates`` with the scales ``config`` chooses from
    ``stats`` (none without ``config``); its ``scales`` hold them."""
    scales = choose_body_scales(candidates, stats, config) if config is not None else {}
    return SmoothBodies(candidates, scales, stats, ranges)


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


Division = tuple[ir.Node, int]  # (node, input index of a constant divided along its last axis)


def _divide(
    graph: ir.Graph,
    namer: Namer,
    targets: list[Division],
    s: np.ndarray,
    spill: SpillFile | None = None,
) -> None:
    """Divide the constant read by every ``(node, index)`` in ``targets`` (one constant) by ``s``
    along its last axis: in place when they are its only readers (the name, which the plan may
    refer to, is kept), else as a new initializer of ``graph`` per target so the other readers see
    the constant as it was."""
    node, index = targets[0]
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    array = value.const_value.numpy()
    scaled = (array / s).astype(array.dtype)
    del array
    if sorted((id(u.node), u.idx) for u in value.uses()) == sorted((id(n), i) for n, i in targets):
        old = value.const_value
        value.const_value = ir.Tensor(scaled, name=value.name)
        if isinstance(old, ir.ExternalTensor):
            old.release()
        made = [value]
    else:
        made = []
        for node, index in targets:
            made.append(add_initializer(graph, namer(f"{value.name}_smoothed"), scaled))
            node.replace_input_with(index, made[-1])
    del scaled
    if spill is not None:
        for value in made:
            spill.take(value)


def _divide_all(
    graph: ir.Graph, namer: Namer, targets: list[Division], s: np.ndarray, spill: SpillFile | None
) -> None:
    """:func:`_divide` once per constant among ``targets`` (those reading one constant together)."""
    by_constant: dict[int, list[Division]] = {}
    for node, index in targets:
        by_constant.setdefault(id(node.inputs[index]), []).append((node, index))
    for group in by_constant.values():
        _divide(graph, namer, group, s, spill)


def fold_targets(x: ir.Value, readers: list[ir.Node], k: int) -> tuple[str, list[Division]] | None:
    """Where ``x``'s channel division folds (see the module docstring): what it folds into and the
    constants to divide, or None when no fold applies."""
    value_readers = [u.node for u in x.uses() if u.node.op_type not in _SHAPE_ONLY]
    if x.is_graph_output() or sorted(map(id, value_readers)) != sorted(map(id, readers)):
        return None
    node = x.producer()
    if node is None:
        return None
    if node.op_type == "LayerNormalization" and node.attributes.get_int("axis", -1) in (
        -1,
        len(x.shape or ()) - 1,
    ):
        extra = [i for i in (1, 2) if len(node.inputs) > i and node.inputs[i] is not None]
        if all(_per_channel_constant(node.inputs[i], k) is not None for i in extra):
            return f"LayerNormalization {node.name}", [(node, i) for i in extra]
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
                    return f"norm {mul.name} + {node.name}", [(node, c), (mul, g)]
    if node.op_type == "Mul":
        g = next((i for i in (0, 1) if _per_channel_constant(node.inputs[i], k) is not None), None)
        if g is not None:
            return f"norm scale {node.name}", [(node, g)]
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
            targets: list[Division] = [(matmul, 1)]
            if bias is not None:
                targets.append(bias)
            return f"MatMul {matmul.name}", targets
    return None


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
    found = fold_targets(x, readers, s.size)
    if found is None:
        return None
    _divide_all(graph, namer, found[1], s, spill)
    return found[0]


def _replace_constant(weight: ir.Value, array: np.ndarray, spill: SpillFile | None) -> None:
    """``weight`` holds ``array`` from now on (its name kept); the old tensor's mapping is released
    and, with a spill file, the new one waits there for the save."""
    old = weight.const_value
    weight.const_value = ir.Tensor(array, name=weight.name)
    if isinstance(old, ir.ExternalTensor):
        old.release()
    if spill is not None:
        spill.take(weight)


def _scale_rows(weight: ir.Value, s: np.ndarray, spill: SpillFile | None) -> None:
    """Multiply row ``k`` of the 2-D constant ``weight`` by ``s[k]``, in place."""
    assert weight.const_value is not None
    w = weight.const_value.numpy()
    scaled = (w * s[:, None]).astype(w.dtype)
    del w  # a view of the old tensor's mapping, which is released next
    _replace_constant(weight, scaled, spill)


def _take_rows(weight: ir.Value, rows: np.ndarray, spill: SpillFile | None) -> np.ndarray:
    """Set ``rows`` of the 2-D constant ``weight`` to zero, in place; returns them as they were."""
    assert weight.const_value is not None
    w = weight.const_value.numpy().copy()
    taken = w[rows].copy()
    w[rows] = 0
    _replace_constant(weight, w, spill)
    return taken


def _insert_inverse(
    graph: ir.Graph,
    constants: ir.Graph,
    namer: Namer,
    name: str,
    readers: list[ir.Node],
    s: np.ndarray,
) -> ir.Value:
    """A new ``Mul(x, 1/s)`` in ``graph`` before ``readers[0]`` (the first reader in topological
    order), read by ``readers`` instead of ``x``; ``1/s`` is an initializer of ``constants``."""
    x = readers[0].inputs[0]
    assert x is not None
    inv = add_initializer(constants, namer(f"{name}_smooth_inv"), (1.0 / s).astype(np.float32))
    mul = ir.node("Mul", [x, inv], name=namer(f"{name}_smooth"))
    mul.outputs[0].name = namer(f"{name}_smoothed")
    mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
    graph.insert_before(readers[0], mul)
    for node in readers:
        node.replace_input_with(0, mul.outputs[0])
    return mul.outputs[0]


def _rename(plan: QuantPlan, old: str, new: str) -> None:
    tensor = plan.activations.pop(old)
    tensor.name = new
    plan.activations[new] = tensor


class SmoothActivations(ir.passes.InPlacePass):
    """Scale the chosen MatMuls' weights by ``s`` and divide their input by ``s``: folded into its
    producer where possible, else by a new ``Mul(X, 1/s)``; the plan and ranges follow."""

    def __init__(
        self,
        plan: QuantPlan,
        ranges: dict[str, tuple[float, float]],
        candidates: dict[str, Candidate],
        scales: dict[str, Smoothing],
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
        for name, choice in self.scales.items():
            cand = self.candidates[name]
            s, alpha, channels = choice.s, choice.alpha, choice.float_channels
            x = cand.nodes[0].inputs[0]
            assert x is not None
            what = f"alpha {alpha:.2f}" if alpha is not None else "not smoothed"
            if channels.size:
                what += f", {channels.size} channels in float"
            if alpha is None:
                # Only float channels: no Mul. X is quantized with the other channels' range, the
                # float channels saturate, and their weight rows (zero) make that harmless.
                keep = np.ones(s.size, dtype=bool)
                keep[channels] = False
                self.ranges[name] = smoothed_range(_subset(self.stats[name], keep), s[keep])
                log.info("%s: %s, quantized with the other channels' range", name, what)
                continue
            for weight in cand.weights:
                _scale_rows(weight, s, self.spill)
            folded = fold_into_producer(graph, namer, x, cand.nodes, s, self.spill)
            if folded is not None:
                self.ranges[name] = smoothed_range(self.stats[name], s)
                self.folded[name] = folded
                log.info("smoothed %s (%s) folded into %s", name, what, folded)
            else:
                new = _insert_inverse(graph, graph, namer, name, cand.nodes, s).name
                assert new is not None
                _rename(self.plan, name, new)
                self.ranges[new] = smoothed_range(self.stats[name], s)
                log.info("smoothed %s (%s, max factor %.3g)", name, what, float(s.max()))
        # after every fold: a fold may divide the columns of a weight whose rows go to float here
        for name, choice in self.scales.items():
            if choice.float_channels.size:
                cand = self.candidates[name]
                rows = {id(w): _take_rows(w, choice.float_channels, self.spill) for w in cand.weights}
                add_float_channels(graph, namer, cand.nodes, choice.float_channels, rows, self.spill)
        return ir.passes.PassResult(model, True)


class SmoothBodies(ir.passes.InPlacePass):
    """:class:`SmoothActivations` for the candidates inside If/Loop/Scan bodies: each group's shared
    weights are scaled once, and each member's ``1/s`` folded into its producer (a constant read by
    the producers of every member, as a merged decoder's shared norm weights are, is divided once)
    or applied by a ``Mul`` in its body; the bodies' plans and ranges follow. Constants made here
    live in the main graph."""

    def __init__(
        self,
        candidates: dict[str, BodyCandidate],
        scales: dict[str, Smoothing],
        stats: dict[int, dict[str, ChannelStats]],
        ranges: dict[int, dict[str, tuple[float, float]]],
    ) -> None:
        super().__init__()
        self.candidates, self.scales, self.stats, self.ranges = candidates, scales, stats, ranges
        self.spill: SpillFile | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.scales:
            return ir.passes.PassResult(model, False)
        namer = Namer(model.graph)  # every name in the model, bodies included
        for key, choice in self.scales.items():
            s, alpha = choice.s, choice.alpha
            cand = self.candidates[key]
            for weight in cand.weights:
                _scale_rows(weight, s, self.spill)
            folds = []
            for m in cand.members:
                x = m.nodes[0].inputs[0]
                assert x is not None
                folds.append(fold_targets(x, m.nodes, s.size))
            _divide_all(model.graph, namer, [t for f in folds if f is not None for t in f[1]], s, self.spill)
            for m, fold in zip(cand.members, folds, strict=True):
                body = id(m.body.graph)
                stats = self.stats.get(body, {}).get(m.name)
                ranges = self.ranges.setdefault(body, {})
                name = m.name
                if fold is None:
                    name = _insert_inverse(m.body.graph, model.graph, namer, m.name, m.nodes, s).name or ""
                    _rename(m.body.plan, m.name, name)
                    ranges.pop(m.name, None)
                if stats is not None and stats.min is not None:  # else never ran: no range, kept float
                    ranges[name] = smoothed_range(stats, s)
            log.info("smoothed %s and %d more in bodies (alpha %.2f)", key, len(cand.members) - 1, alpha)
        return ir.passes.PassResult(model, True)
