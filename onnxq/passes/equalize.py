"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction"): balance the per-channel weight ranges of consecutive layers.

For a producer ``P`` (Conv, or Gemm / MatMul with a constant weight) whose output reaches a consumer
``C`` (Conv, or Gemm / MatMul reading it as input A with a constant weight) only through positively
homogeneous, channel-wise ops (Relu, LeakyRelu, MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool, and Flatten where the spatial dimensions are all 1, i.e. the channel mapping is 1:1),
``f(x / s) = f(x) / s`` for every positive per-channel ``s``. So output channel ``c`` of ``P`` (its
weight slice and bias) can be divided by ``s_c`` and input channel ``c`` of ``C`` multiplied by
``s_c`` without changing the float function. With ``r1_c`` the range (max |w|) of ``P``'s output
channel ``c`` and ``r2_c`` that of ``C``'s input channel ``c``, ``s_c = sqrt(r1_c / r2_c)`` makes both
ranges ``sqrt(r1_c · r2_c)``: per-tensor weight quantization then wastes no levels on a few wide
channels. A layer in the middle of a chain belongs to two pairs, so the pairs are swept again until
no factor moves by more than ``tolerance`` (or ``max_iterations`` sweeps).

Guarantees: the float function is unchanged up to float32 rounding; every intermediate tensor of a
pair has exactly one reader and is no model output (anything else would see the scaled values);
weights are rewritten as new initializers (a weight shared with another node keeps its old value for
that node); grouped and depthwise Convs are handled on both sides (input channel ``c`` of a Conv with
``group`` g reads the weight slice ``[group(c) rows, c mod C/g]``); a channel whose range is 0 on
either side keeps ``s_c = 1``. Pairs it does not rewrite, and why, are listed in
``CrossLayerEqualize.skipped``. Data-free: no calibration data is read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.config import CrossLayerEqualization
from onnxq.passes._util import Namer, add_initializer, constant_array

log = logging.getLogger(__name__)

# Channel-wise ops that commute with a positive per-channel scale: op(x / s) = op(x) / s.
HOMOGENEOUS_OPS = {"Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


@dataclass
class Layer:
    """A Conv / Gemm / MatMul with a constant weight, seen as ``out[c] = sum W[c, in] * x[in] + b[c]``.

    ``weight`` and ``bias`` are float64 working copies, written back once at the end.
    """

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    scalar_bias: bool = False  # a Gemm bias given as a scalar / [1] (broadcast): expanded on write
    changed: bool = False

    @property
    def op(self) -> str:
        return self.node.op_type

    def out_view(self) -> np.ndarray:
        """The weight as ``[out_channels, everything else]`` (a copy for transposed layouts)."""
        w = self.weight
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1)
        if self.op == "Gemm" and self.node.attributes.get_int("transB", 0):
            return w
        return w.T  # Gemm transB=0 / MatMul: [K, N]

    def in_view(self) -> np.ndarray:
        """The weight as ``[input_channels, everything else]``."""
        w = self.weight
        if self.op == "Conv":
            group = self.node.attributes.get_int("group", 1)
            m, cg = w.shape[0], w.shape[1]
            per_group = w.reshape(group, m // group, cg, -1)  # [g, M/g, C/g, k]
            return per_group.transpose(0, 2, 1, 3).reshape(group * cg, -1)
        if self.op == "Gemm" and self.node.attributes.get_int("transB", 0):
            return w.T
        return w

    def out_channels(self) -> int:
        return self.out_view().shape[0]

    def in_channels(self) -> int:
        return self.in_view().shape[0]

    def scale_outputs(self, factor: np.ndarray) -> None:
        """Multiply output channel ``c`` (weights and bias) by ``factor[c]``."""
        if self.op == "Conv":
            self.weight = self.weight * factor.reshape(-1, *([1] * (self.weight.ndim - 1)))
        elif self.op == "Gemm" and self.node.attributes.get_int("transB", 0):
            self.weight = self.weight * factor[:, None]
        else:
            self.weight = self.weight * factor[None, :]
        if self.bias is not None:
            self.bias = self.bias * factor
        self.changed = True

    def scale_inputs(self, factor: np.ndarray) -> None:
        """Multiply input channel ``c`` of the weight by ``factor[c]``."""
        if self.op == "Conv":
            group = self.node.attributes.get_int("group", 1)
            m, cg = self.weight.shape[0], self.weight.shape[1]
            f = factor.reshape(group, 1, cg)  # [g, 1, C/g] against the [g, M/g, C/g, k] view
            w = self.weight.reshape(group, m // group, cg, -1) * f[..., None]
            self.weight = w.reshape(self.weight.shape)
        elif self.op == "Gemm" and self.node.attributes.get_int("transB", 0):
            self.weight = self.weight * factor[None, :]
        else:
            self.weight = self.weight * factor[:, None]
        self.changed = True


@dataclass
class Pair:
    """A producer whose output reaches ``consumer`` through channel-wise homogeneous ops only."""

    producer: Layer
    consumer: Layer
    path: list[str] = field(default_factory=list)  # op types in between


def _layer(node: ir.Node, layers: dict[int, Layer], role: str) -> Layer | str:
    """The :class:`Layer` of ``node`` (cached), or why it cannot take part as ``role``."""
    if id(node) in layers:
        return layers[id(node)]
    op = node.op_type
    if not _is_default_domain(node) or op not in ("Conv", "Gemm", "MatMul"):
        return f"{op} is not a Conv/Gemm/MatMul"
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype not in (np.float32, np.float64):
        return f"{op} {node.name} has no constant float weight"
    if op == "Conv" and weight.ndim < 3:
        return f"Conv {node.name} weight has rank {weight.ndim}"
    if op in ("Gemm", "MatMul") and weight.ndim != 2:
        return f"{op} {node.name} weight is not 2-D"
    if op == "Gemm" and node.attributes.get_int("transA", 0):
        return f"Gemm {node.name} has transA=1"
    bias = None
    scalar_bias = False
    if op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None:
            return f"{op} {node.name} has a computed bias"
        n = weight.shape[0] if op == "Conv" or node.attributes.get_int("transB", 0) else weight.shape[1]
        if bias.size == 1 and n != 1:
            scalar_bias = True
            bias = np.full(n, float(bias.reshape(-1)[0]))
        elif bias.size != n or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
            return f"{op} {node.name} bias of shape {list(bias.shape)} is not per output channel"
        bias = bias.reshape(-1).astype(np.float64)
    layer = Layer(node, weight.astype(np.float64), bias, scalar_bias)
    layers[id(node)] = layer
    return layer


def _flatten_keeps_channels(node: ir.Node) -> bool:
    """Flatten(axis=1) of ``[N, C, 1, ..., 1]``: channel ``c`` stays channel ``c``."""
    if node.attributes.get_int("axis", 1) != 1:
        return False
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is None or len(shape) < 2:
        return False
    return all(d == 1 for d in list(shape)[2:])


def find_pairs(model: ir.Model) -> tuple[list[Pair], list[str]]:
    """Every producer → (homogeneous ops) → consumer pair, and why other candidate chains were skipped."""
    layers: dict[int, Layer] = {}
    pairs: list[Pair] = []
    skipped: list[str] = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not _is_default_domain(node):
            continue
        value = node.outputs[0]
        path: list[str] = []
        consumer: ir.Node | None = None
        reason = ""
        while True:
            uses = value.uses()
            if value.is_graph_output():
                reason = f"{value.name} is a model output"
                break
            if len(uses) != 1:
                reason = f"{value.name} has {len(uses)} readers" if uses else ""
                break
            user, index = uses[0].node, uses[0].idx
            if not _is_default_domain(user):
                reason = ""
                break
            if user.op_type in ("Conv", "Gemm", "MatMul"):
                if index != 0:
                    reason = f"{value.name} is not the data input of {user.name}"
                else:
                    consumer = user
                break
            homogeneous = user.op_type in HOMOGENEOUS_OPS or (
                user.op_type == "Flatten" and _flatten_keeps_channels(user)
            )
            if not homogeneous or index != 0:
                reason = ""  # an op that does not commute with channel scales: not a chain
                break
            if len(user.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in user.outputs[1:]):
                reason = f"{user.op_type} {user.name} has a second output in use"
                break
            path.append(user.op_type)
            value = user.outputs[0]
        if consumer is None:
            if reason and path:
                skipped.append(f"{node.name}: {reason}")
            continue
        first = _layer(node, layers, "producer")
        second = _layer(consumer, layers, "consumer")
        if isinstance(first, str) or isinstance(second, str):
            skipped.append(f"{node.name} -> {consumer.name}: {first if isinstance(first, str) else second}")
            continue
        if node.op_type == "Conv" and consumer.op_type in ("Gemm", "MatMul") and "Flatten" not in path:
            skipped.append(f"{node.name} -> {consumer.name}: no channel-preserving Flatten in between")
            continue
        if node.op_type != "Conv" and any(op in HOMOGENEOUS_OPS - {"Relu", "LeakyRelu"} for op in path):
            skipped.append(f"{node.name} -> {consumer.name}: pooling over a {node.op_type} output's channels")
            continue
        if first.out_channels() != second.in_channels():
            skipped.append(
                f"{node.name} -> {consumer.name}: {first.out_channels()} output channels vs "
                f"{second.in_channels()} input channels"
            )
            continue
        pairs.append(Pair(first, second, path))
    return pairs, skipped


def _ranges(view: np.ndarray) -> np.ndarray:
    return np.abs(view).max(axis=1) if view.shape[1] else np.zeros(view.shape[0])


def equalize_pairs(pairs: list[Pair], config: CrossLayerEqualization) -> int:
    """Sweep ``pairs`` until converged; return the number of sweeps made."""
    for sweep in range(1, config.max_iterations + 1):
        moved = 0.0
        for pair in pairs:
            r1 = _ranges(pair.producer.out_view())
            r2 = _ranges(pair.consumer.in_view())
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if not np.all(np.isfinite(s)):
                continue
            pair.producer.scale_outputs(1.0 / s)
            pair.consumer.scale_inputs(s)
            moved = max(moved, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
        if moved <= math.log1p(config.tolerance):
            return sweep
    return config.max_iterations


class CrossLayerEqualize(ir.passes.InPlacePass):
    """Equalize the weight ranges of every Conv/Gemm chain (see the module docstring)."""

    def __init__(self, config: CrossLayerEqualization | None = None) -> None:
        super().__init__()
        self.config = config or CrossLayerEqualization()
        self.pairs: list[tuple[str, str]] = []
        self.skipped: list[str] = []
        self.sweeps = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs, self.skipped = find_pairs(model)
        for reason in self.skipped:
            log.info("equalization skipped %s", reason)
        if not pairs:
            return ir.passes.PassResult(model, False)
        self.sweeps = equalize_pairs(pairs, self.config)
        self.pairs = [(p.producer.node.name or "", p.consumer.node.name or "") for p in pairs]
        graph = model.graph
        namer = Namer(graph)
        layers = {id(p.producer): p.producer for p in pairs} | {id(p.consumer): p.consumer for p in pairs}
        for layer in layers.values():
            if layer.changed:
                _write_back(graph, namer, layer)
        log.info("equalized %d layer pairs in %d sweeps", len(pairs), self.sweeps)
        return ir.passes.PassResult(model, True)


def _write_back(graph: ir.Graph, namer: Namer, layer: Layer) -> None:
    node = layer.node
    old_w = node.inputs[1]
    dtype = old_w.const_value.numpy().dtype  # type: ignore[union-attr]
    new_w = add_initializer(graph, namer(f"{old_w.name}_equalized"), layer.weight.astype(dtype))
    node.replace_input_with(1, new_w)
    _drop_if_unused(graph, old_w)
    if layer.bias is not None:
        old_b = node.inputs[2]
        assert old_b is not None
        shape = layer.bias.shape
        if not layer.scalar_bias:
            shape = old_b.const_value.numpy().shape  # type: ignore[union-attr]
        bias = layer.bias.reshape(shape).astype(old_b.const_value.numpy().dtype)  # type: ignore[union-attr]
        new_b = add_initializer(graph, namer(f"{old_b.name}_equalized"), bias)
        node.replace_input_with(2, new_b)
        _drop_if_unused(graph, old_b)


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def equalize_model(
    model: ir.Model, config: CrossLayerEqualization, notes: list[str] | None = None
) -> CrossLayerEqualize:
    """Run :class:`CrossLayerEqualize` on ``model`` in place; what it did goes to ``notes``."""
    cle = CrossLayerEqualize(config)
    cle(model)
    if notes is not None:
        if cle.pairs:
            notes.append(
                f"cross-layer equalization: {len(cle.pairs)} layer pairs in {cle.sweeps} sweeps "
                f"({', '.join(f'{a}->{b}' for a, b in cle.pairs)})"
            )
        else:
            notes.append("cross-layer equalization: no Conv/Gemm chain to equalize")
        if cle.skipped:
            notes.append(f"cross-layer equalization skipped: {'; '.join(cle.skipped)}")
    return cle
