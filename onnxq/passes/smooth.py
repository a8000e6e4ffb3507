"""SmoothQuant: move per-channel activation outliers into the following MatMul weights.

``X @ W == (X · s⁻¹) @ (diag(s) · W)`` for any positive per-channel ``s``. Dividing the channels of
``X`` that carry outliers and multiplying the matching rows of ``W`` leaves the float result as it
was, but makes ``X`` far easier to quantize per tensor while ``W`` is quantized per output column.

Guarantees: only activations whose every quantized use is a MatMul's first input with a constant,
quantized, unshared 2-D weight are candidates; their other (float) uses keep reading ``X``. The
smoothed tensor ``X · s⁻¹`` is a new ``Mul`` output that takes over ``X``'s place in the plan, with
the exact MinMax range of ``X · s⁻¹`` from per-channel statistics. A tensor is smoothed only when
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
from onnxq.passes._util import Namer, add_initializer
from onnxq.plan import QuantPlan
from onnxq.qmath import IntType, int_type, scale_zero_point

log = logging.getLogger(__name__)

_MIN_SCALE = 1e-5


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
    scaled = abs_w * s[:, None]
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
        w = np.concatenate([c.const_value.numpy().astype(np.float64) for c in cand.weights], axis=1)
        abs_w = np.abs(w)
        sq_w = np.sum(w * w, axis=1)
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


class SmoothActivations(ir.passes.InPlacePass):
    """Insert ``Mul(X, 1/s)`` before the chosen MatMuls, scale their weights, update plan and ranges."""

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

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.scales:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        namer = Namer(graph)
        for name, (s, alpha) in self.scales.items():
            cand = self.candidates[name]
            x = cand.nodes[0].inputs[0]
            assert x is not None
            inv = add_initializer(graph, namer(f"{name}_smooth_inv"), (1.0 / s).astype(np.float32))
            mul = ir.node("Mul", [x, inv], name=namer(f"{name}_smooth"))
            mul.outputs[0].name = namer(f"{name}_smoothed")
            mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
            graph.insert_before(cand.nodes[0], mul)  # the first reader in topological order
            for node in cand.nodes:
                node.replace_input_with(0, mul.outputs[0])
            for weight in cand.weights:
                w = weight.const_value.numpy()
                weight.const_value = ir.Tensor((w * s[:, None]).astype(w.dtype), name=weight.name)
            new = mul.outputs[0].name
            tensor = self.plan.activations.pop(name)
            tensor.name = new
            self.plan.activations[new] = tensor
            self.ranges[new] = smoothed_range(self.stats[name], s)
            log.info("smoothed %s (alpha %.2f, max factor %.3g)", name, alpha, float(s.max()))
        return ir.passes.PassResult(model, True)
