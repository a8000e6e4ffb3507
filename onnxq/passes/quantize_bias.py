"""Conv/Gemm biases stored as int32 with scale ``input_scale × weight_scale``.

Guarantees: for every node of ``ops`` (Conv and Gemm by default; targets that quantize every op add
LayerNormalization, whose bias scale is ``input_scale × gamma_scale``) whose data and weight inputs
come from DequantizeLinear with constant parameters and whose bias is a float constant, the bias
becomes an int32 initializer (zero point 0) behind its own DequantizeLinear — the form ORT fuses into
QLinearConv/QGemm (and QNN-HTP requires), which take the raw int32 values as being in units of
``input_scale × weight_scale``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes._util import Namer, add_initializer, constant_array
from onnxq.qmath import quantize_bias

log = logging.getLogger(__name__)


def _dq_scale(value: ir.Value | None) -> np.ndarray | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    return constant_array(producer.inputs[1])


class QuantizeBias(ir.passes.InPlacePass):
    """Turn float biases of quantized Conv/Gemm (or ``ops``) into int32 initializers."""

    def __init__(self, ops: tuple[str, ...] = ("Conv", "Gemm")) -> None:
        super().__init__()
        self.ops = ops

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        modified = False
        for node in list(graph):
            if node.op_type not in self.ops or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
                continue
            x_scale, w_scale = _dq_scale(node.inputs[0]), _dq_scale(node.inputs[1])
            bias_value = node.inputs[2]
            bias = constant_array(bias_value)
            if x_scale is None or w_scale is None or bias is None or bias.ndim != 1:
                continue
            scale = (x_scale.astype(np.float32) * w_scale.astype(np.float32)).astype(np.float32)
            if scale.size not in (1, bias.size):
                continue
            q = quantize_bias(bias, scale)
            if np.any(np.abs(np.rint(bias.astype(np.float64) / scale)) > np.iinfo(np.int32).max):
                log.warning("bias of %s saturates int32; its values were clipped", node.name)
            base = bias_value.name
            q_v = add_initializer(graph, namer(f"{base}_quantized"), q)
            s_v = add_initializer(
                graph, namer(f"{base}_scale"), scale.reshape(-1) if scale.size > 1 else scale.reshape(())
            )
            zp_v = add_initializer(graph, namer(f"{base}_zero_point"), np.zeros(s_v.shape.numpy(), np.int32))
            attrs = {"axis": 0} if scale.size > 1 else {}
            dq = ir.node(
                "DequantizeLinear", [q_v, s_v, zp_v], attributes=attrs, name=namer(f"{base}_DequantizeLinear")
            )
            dq.outputs[0].name = namer(f"{base}_dequantized")
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(bias.shape)
            graph.insert_before(node, dq)
            node.replace_input_with(2, dq.outputs[0])
            if (
                not bias_value.uses()
                and bias_value.name in graph.initializers
                and not bias_value.is_graph_output()
            ):
                graph.initializers.pop(bias_value.name)
            modified = True
        return ir.passes.PassResult(model, modified)
