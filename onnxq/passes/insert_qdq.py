"""QuantizeLinear/DequantizeLinear pairs inserted where the plan says.

Guarantees: every tensor in the plan gets one QuantizeLinear and one DequantizeLinear per use that
reads it quantized (ONNX Runtime fuses a node only when each of its inputs has its own DQ); an
exclusive tensor has all its uses rewired, so its producer feeds only the Q. Scales and zero points
are explicit constant initializers (scalars per tensor, 1-D per channel). Weights get a Q on the
float initializer here; ``PrequantizeWeights`` then folds it into an integer initializer.
Activations without a usable calibrated range (never reached, non-finite or sentinel-sized) are
dropped from the plan and stay float, with the reason recorded. A planned exclusive tensor that is
a model output (targets that quantize every op) keeps its name on the final DequantizeLinear's
output, so the model's interface is unchanged.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from onnxq.passes._util import Namer, add_initializer, release
from onnxq.plan import SENTINEL_MAGNITUDE, QuantPlan, TensorPlan
from onnxq.qmath import channel_range, int_type, scale_zero_point

log = logging.getLogger(__name__)

QParams = tuple[np.ndarray, np.ndarray, int | None]


class InsertQDQ(ir.passes.InPlacePass):
    """Insert Q/DQ pairs for ``plan`` with activation ranges from ``ranges``."""

    def __init__(self, plan: QuantPlan, ranges: dict[str, tuple[float, float]]) -> None:
        super().__init__()
        self.plan = plan
        self.ranges = ranges

    def _drop_unusable(self) -> None:
        for name, tensor in list(self.plan.activations.items()):
            if tensor.kind != "activation":
                continue
            lo, hi = self.ranges.get(name, (math.nan, math.nan))
            if math.isnan(lo) and math.isnan(hi):
                self.plan.drop_activation(
                    name, f"{name} was not computed on the calibration data (a branch or loop that never ran)"
                )
            elif not (math.isfinite(lo) and math.isfinite(hi)):
                self.plan.drop_activation(name, f"no finite calibrated range for {name}")
            elif max(abs(lo), abs(hi)) >= SENTINEL_MAGNITUDE:
                self.plan.drop_activation(
                    name, f"{name} holds sentinel values (range {lo:.3g}..{hi:.3g}); kept float"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._drop_unusable()
        graph = model.graph
        namer = Namer(graph)
        values = {v.name: v for v in graph.inputs}
        values.update(graph.initializers)
        for node in graph:  # inputs too: a body's reads from outer scopes (weights, activations)
            values.update((v.name, v) for v in (*node.inputs, *node.outputs) if v is not None)
        nodes = {n.name: n for n in graph}
        params: dict[str, QParams] = {}
        for key, tensor in self.plan.weights.items():
            params[key] = self._weight_params(values[tensor.name], tensor)
        for name, tensor in self.plan.activations.items():
            if tensor.kind == "activation":
                lo, hi = self.ranges[name]
                scale, zp = scale_zero_point(lo, hi, int_type(tensor.spec.dtype), tensor.spec.symmetric)
                params[name] = (scale, zp, None)
            elif tensor.kind == "fixed" and tensor.fixed is not None:
                qtype = int_type(tensor.spec.dtype)
                scale, zp = tensor.fixed
                params[name] = (np.asarray(scale, np.float32), np.asarray(zp, qtype.np_dtype), None)
        for name, tensor in self.plan.activations.items():
            if tensor.kind == "inherit":
                params[name] = self._inherited(tensor, params)
        modified = False
        for key, tensor in [*self.plan.weights.items(), *self.plan.activations.items()]:
            if key not in params:
                continue
            value = values[tensor.name]
            uses = (
                [(u.node, u.idx) for u in value.uses()]
                if tensor.exclusive
                else [(nodes[n], i) for n, i in tensor.consumers if n in nodes]
            )
            output = tensor.exclusive and value.is_graph_output()
            if not uses and not output:
                continue
            self._insert(graph, namer, value, params[key], uses, output)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _inherited(self, tensor: TensorPlan, params: dict[str, QParams]) -> QParams:
        source = tensor.source
        seen = set()
        while source in self.plan.activations and self.plan.activations[source].kind == "inherit":
            if source in seen:
                break
            seen.add(source)
            source = self.plan.activations[source].source
        scale, zp, _ = params[source]  # type: ignore[index]
        return scale, zp, None

    @staticmethod
    def _weight_params(value: ir.Value, tensor: TensorPlan) -> QParams:
        array = value.const_value.numpy()  # type: ignore[union-attr]
        lo, hi = channel_range(array.astype(np.float32, copy=False), tensor.axis)
        del array
        release(value)
        scale, zp = scale_zero_point(lo, hi, int_type(tensor.spec.dtype), tensor.spec.symmetric)
        return scale, zp, tensor.axis

    @staticmethod
    def _insert(
        graph: ir.Graph, namer: Namer, value: ir.Value, qparams: QParams, uses, output: bool = False
    ) -> None:
        scale, zp, axis = qparams
        if output:  # the model output's name moves to the last DequantizeLinear's output
            name = value.name
            value.name = namer(f"{name}_float")
            uses = [*uses, (None, name)]
        float_dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        base = value.name
        scale_v = add_initializer(graph, namer(f"{base}_scale"), scale.astype(float_dtype))
        zp_v = add_initializer(graph, namer(f"{base}_zero_point"), zp)
        attrs = {"axis": axis} if axis is not None else {}
        q = ir.node(
            "QuantizeLinear", [value, scale_v, zp_v], attributes=attrs, name=namer(f"{base}_QuantizeLinear")
        )
        q.outputs[0].name = namer(f"{base}_quantized")
        q.outputs[0].dtype = ir.DataType.from_numpy(zp.dtype)
        q.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, q)
        else:
            graph.insert_before(next(iter(graph)), q)
        for i, (node, index) in enumerate(uses):
            dq = ir.node(
                "DequantizeLinear",
                [q.outputs[0], scale_v, zp_v],
                attributes=attrs,
                name=namer(f"{base}_DequantizeLinear{'_' + str(i) if i else ''}"),
            )
            dq.outputs[0].name = namer(f"{base}_dequantized{'_' + str(i) if i else ''}")
            dq.outputs[0].dtype = value.dtype
            dq.outputs[0].shape = value.shape
            graph.insert_after(q, dq)
            if node is None:  # a model output
                dq.outputs[0].name = index
                graph.outputs[graph.outputs.index(value)] = dq.outputs[0]
            else:
                node.replace_input_with(index, dq.outputs[0])
