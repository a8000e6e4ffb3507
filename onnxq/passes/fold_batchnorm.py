"""BatchNormalization folded into the Conv before it.

Guarantees: for every ``Conv → BatchNormalization`` (inference mode, all parameters constant, the
Conv output used only by the BN) the BN disappears and the Conv gets scaled weights and a bias,
``W' = W·γ/√(σ²+ε)``, ``b' = (b−μ)·γ/√(σ²+ε) + β``; outputs are unchanged up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.passes._util import Namer, add_initializer, constant_array


class FoldBatchNorm(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into a preceding Conv."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            if len(bn.outputs) != 1 and any(o.uses() for o in bn.outputs[1:]):
                continue
            if bn.attributes.get_int("training_mode", 0):
                continue
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if conv is None or conv.op_type != "Conv" or len(bn.inputs[0].uses()) != 1:
                continue
            if bn.inputs[0].is_graph_output():
                continue
            params = [constant_array(v) for v in bn.inputs[1:5]]
            weight = constant_array(conv.inputs[1])
            if weight is None or any(p is None for p in params):
                continue
            bias = (
                constant_array(conv.inputs[2])
                if len(conv.inputs) > 2 and conv.inputs[2] is not None
                else None
            )
            if len(conv.inputs) > 2 and conv.inputs[2] is not None and bias is None:
                continue
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
            eps = bn.attributes.get_float("epsilon", 1e-5)
            factor = gamma / np.sqrt(var + eps)
            dtype = weight.dtype
            new_w = (weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(dtype)
            b = bias.astype(np.float64) if bias is not None else np.zeros_like(mean)
            new_b = ((b - mean) * factor + beta).astype(dtype)
            w_val = add_initializer(graph, namer(f"{conv.inputs[1].name}_bnfolded"), new_w)
            b_val = add_initializer(graph, namer(f"{conv.name}_bias_bnfolded"), new_b)
            conv.replace_input_with(1, w_val)
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            conv.replace_input_with(2, b_val)
            out = bn.outputs[0]
            conv_out = conv.outputs[0]
            was_output = out.is_graph_output()
            out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
            if was_output:
                conv_out.name, out.name = out.name, conv_out.name
            graph.remove(bn, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
