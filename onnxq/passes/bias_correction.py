"""Bias correction (Nagel et al. 2019; Finkelstein et al. 2019): remove the expected output shift
that weight rounding adds to each quantized Conv/Gemm.

A quantized layer computes ``Ŵ x`` instead of ``W x``; over the data its outputs move on average by
``E[(Ŵ - W) x] = (Ŵ - W) E[x]`` per output channel. That shift is subtracted from the float bias,
which ``QuantizeBias`` then stores as int32 (a layer without a bias gets one).

Which ``E[x]``: statistics of the layer's fp32 input, gathered by ``calibrate`` in the same
streaming pass as the activation ranges (one small vector per layer, whatever the number of
samples). This is the "analytic" variant in the sense of fp32 statistics; the empirical variant (the
quantized model's own inputs) would need a second pass over the calibration data, which a one-shot
generator cannot give, and differs only by the upstream shifts, which are corrected too.

Gemm: ``shift_n = alpha · Σ_k ΔB[k, n] · E[a_k]`` (per-channel mean of ``A``), subtracted from
``C`` as ``shift / beta``.

Conv: the shift of output channel ``m`` is ``Σ_{c, tap} ΔW[m, c, tap] · E[patch_{c, tap}]``, where
``E[patch_{c, tap}]`` is the mean, over samples and output positions, of the input value that tap
reads (0 where it reads the zero padding). These patch means are the per-channel means of a
temporary depthwise Conv with one-hot kernels (``C · kh · kw`` outputs, the Conv's own pads,
strides and dilations) added to the calibration graph and removed afterwards, so zero padding,
strides and spatially varying inputs (digit images: background at the border) are all exact, not
approximated by one mean per channel. It costs one such depthwise Conv per corrected layer during
calibration (its output is ``kh · kw`` times the layer's input, one sample at a time).

Guarantees: runs after ``InsertQDQ`` and before ``PrequantizeWeights``; only nodes whose weight is
read through QuantizeLinear → DequantizeLinear of a constant are touched, with ``Ŵ`` computed exactly
as ONNX's Q/DQ would; a layer whose input mean was not gathered, or does not match its channels, is
left as it was. The float function of the fp32 model is not involved: only biases change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.calibrate import ChannelMean
from onnxq.config import BiasCorrection
from onnxq.passes._util import Namer, add_initializer, constant_array
from onnxq.plan import QuantPlan
from onnxq.qmath import dequantize, quantize

log = logging.getLogger(__name__)


class BiasStatistics:
    """The tensors whose per-channel means bias correction needs, added to ``model`` on construction
    (the patch Convs) and taken out again by :meth:`remove`.

    ``tensors``: tensor → channel axis, for ``calibrate(means=...)``; ``inputs``: corrected node →
    (its statistics tensor, axis), for :class:`CorrectBias`.
    """

    def __init__(self, model: ir.Model, plan: QuantPlan, config: BiasCorrection) -> None:
        self.model = model
        self.inputs: dict[str, tuple[str, int]] = {}
        self.nodes: list[ir.Node] = []
        self.constants: list[str] = []
        weighted = {node for t in plan.weights.values() for node, index in t.consumers if index == 1}
        graph = model.graph
        namer = Namer(graph)
        for node in list(graph):
            if node.op_type not in config.ops or node.domain not in ("", "ai.onnx"):
                continue
            data = node.inputs[0]
            if node.name not in weighted or data is None or data.name not in plan.activations:
                continue
            if data.shape is None:
                continue
            if node.op_type == "Gemm":
                if len(data.shape) == 2:
                    self.inputs[node.name] = (data.name, 0 if node.attributes.get_int("transA", 0) else 1)
                continue
            patches = self._patch_conv(graph, namer, node, data)
            if patches is not None:
                self.inputs[node.name] = (patches, 1)

    @property
    def tensors(self) -> dict[str, int]:
        return dict(self.inputs.values())

    def _patch_conv(self, graph: ir.Graph, namer: Namer, node: ir.Node, data: ir.Value) -> str | None:
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        channels = data.shape[1] if data.shape is not None and len(data.shape) >= 3 else None
        if weight is None or weight.ndim < 3 or not isinstance(channels, int):
            return None
        kernel = weight.shape[2:]
        taps = int(np.prod(kernel))
        eye = np.eye(taps, dtype=np.float32).reshape(taps, 1, *kernel)
        one_hot = np.tile(eye, (channels, 1, *([1] * len(kernel))))  # [C * taps, 1, *kernel]
        kernel_value = add_initializer(graph, namer(f"{node.name}_patch_kernel"), one_hot)
        self.constants.append(kernel_value.name)
        attrs = {
            k: v
            for k, v in node.attributes.items()
            if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")
        }
        patch = ir.node("Conv", [data, kernel_value], name=namer(f"{node.name}_patch_mean"))
        for attr in attrs.values():
            patch.attributes[attr.name] = attr
        patch.attributes["group"] = ir.AttrInt64("group", channels)
        patch.outputs[0].name = namer(f"{node.name}_patches")
        patch.outputs[0].dtype = data.dtype
        patch.outputs[0].shape = ir.Shape([None] * len(data.shape))
        graph.insert_after(node, patch)
        self.nodes.append(patch)
        return patch.outputs[0].name

    def remove(self) -> None:
        """Take the patch Convs and their kernels out of the model again."""
        graph = self.model.graph
        for node in self.nodes:
            graph.remove(node, safe=True)
        for name in self.constants:
            graph.initializers.pop(name, None)
        self.nodes, self.constants = [], []


def _quantized_weight(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W, Ŵ)`` for a weight read through DequantizeLinear(QuantizeLinear(constant))."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
    if q is None or q.op_type != "QuantizeLinear":
        return None
    w = constant_array(q.inputs[0])
    scale = constant_array(q.inputs[1])
    zp = constant_array(q.inputs[2]) if len(q.inputs) > 2 else None
    if w is None or scale is None or zp is None:
        return None
    axis = q.attributes.get_int("axis", 1) if scale.ndim == 1 and scale.size > 1 else None
    if axis is not None and axis < 0:
        axis += w.ndim
    w_hat = dequantize(quantize(w, scale, zp, axis), scale, zp, axis)
    return w.astype(np.float64), w_hat.astype(np.float64)


def conv_shift(node: ir.Node, delta: np.ndarray, patch_mean: np.ndarray) -> np.ndarray | None:
    """Expected output shift per output channel of a Conv with weight error ``delta``, from the mean
    input patch ``patch_mean`` (``[C * taps]``, channel-major, zero padding included)."""
    m, cg = delta.shape[0], delta.shape[1]
    group = node.attributes.get_int("group", 1)
    taps = int(np.prod(delta.shape[2:]))
    if patch_mean.size != cg * group * taps or m % group:
        return None
    patches = patch_mean.reshape(group, cg * taps)[np.arange(m) // (m // group)]  # [M, C/g * taps]
    return (delta.reshape(m, -1) * patches).sum(axis=1)


def gemm_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Expected output shift per output column of a Gemm with weight error ``delta``."""
    kn = delta.T if node.attributes.get_int("transB", 0) else delta
    if mean.shape[0] != kn.shape[0]:
        return None
    return node.attributes.get_float("alpha", 1.0) * (mean @ kn)


class CorrectBias(ir.passes.InPlacePass):
    """Subtract each quantized Conv/Gemm's expected output shift from its float bias."""

    def __init__(
        self,
        config: BiasCorrection,
        inputs: Mapping[str, tuple[str, int]],
        means: Mapping[str, ChannelMean | np.ndarray],
    ) -> None:
        super().__init__()
        self.config = config
        self.inputs = dict(inputs)
        self.means = dict(means)
        self.corrected: dict[str, float] = {}  # node → largest |shift| removed

    def _mean(self, node: ir.Node) -> tuple[np.ndarray, str] | None:
        entry = self.inputs.get(node.name or "")
        if entry is None:
            return None
        mean = self.means.get(entry[0])
        if isinstance(mean, ChannelMean):
            mean = mean.mean()
        return None if mean is None else (np.asarray(mean, np.float64), entry[0])  # type: ignore[return-value]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        for node in list(graph):
            if node.op_type not in self.config.ops:
                continue
            found = self._mean(node)
            weights = _quantized_weight(node.inputs[1]) if len(node.inputs) > 1 else None
            if found is None or weights is None:
                continue
            mean, _ = found
            w, w_hat = weights
            delta = w_hat - w
            if node.op_type == "Conv":
                shift = conv_shift(node, delta, mean)
            else:
                beta = node.attributes.get_float("beta", 1.0)
                shift = gemm_shift(node, delta, mean)
                if shift is not None and beta == 0.0:
                    shift = None
                elif shift is not None:
                    shift = shift / beta
            if shift is None or not np.all(np.isfinite(shift)):
                log.info("bias correction skipped %s: input mean does not match its channels", node.name)
                continue
            if not self._apply(graph, namer, node, shift):
                continue
            self.corrected[node.name or ""] = float(np.max(np.abs(shift))) if shift.size else 0.0
        if self.corrected:
            log.info("bias correction on %d layers", len(self.corrected))
        return ir.passes.PassResult(model, bool(self.corrected))

    @staticmethod
    def _apply(graph: ir.Graph, namer: Namer, node: ir.Node, shift: np.ndarray) -> bool:
        old = node.inputs[2] if len(node.inputs) > 2 else None
        bias = constant_array(old) if old is not None else np.zeros(shift.shape, np.float32)
        if bias is None or bias.size not in (1, shift.size):
            return False  # a computed or oddly shaped bias: nothing to fold the shift into
        dtype = bias.dtype if np.issubdtype(bias.dtype, np.floating) else np.float32
        shape = bias.shape if bias.size == shift.size else shift.shape
        new = (np.broadcast_to(bias.astype(np.float64).reshape(-1), shift.shape) - shift).reshape(shape)
        base = old.name if old is not None else f"{node.name}_bias"
        value = add_initializer(graph, namer(f"{base}_corrected"), new.astype(dtype))
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        if old is not None and not old.uses() and not old.is_graph_output():
            graph.initializers.pop(old.name, None)
        return True
