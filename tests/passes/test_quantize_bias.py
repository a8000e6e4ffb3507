"""QuantizeBias: a float Conv/Gemm bias becomes int32 with scale x_scale × w_scale."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxq.passes.quantize_bias import QuantizeBias
from tests.helpers import get_attr, initializers, make_model, producers, run, tensor_info, to_ir, to_proto

RNG = np.random.default_rng(3)


def qdq_conv_model(w_scale: np.ndarray, x_scale: float = 0.05, op: str = "Conv", trans_b: int = 1):
    c_out = 4
    if op == "Conv":
        w = RNG.integers(-127, 128, size=(c_out, 3, 3, 3)).astype(np.int8)
        x_shape, y_shape, attrs = [1, 3, 5, 5], [1, c_out, 3, 3], {}
    else:
        w = RNG.integers(-127, 128, size=(c_out, 3) if trans_b else (3, c_out)).astype(np.int8)
        x_shape, y_shape, attrs = [2, 3], [2, c_out], {"transB": trans_b}
    w_axis = {} if w_scale.ndim == 0 else {"axis": 0 if op == "Conv" or trans_b else 1}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xdq"]),
        helper.make_node("DequantizeLinear", ["Wq", "ws", "wzp"], ["wdq"], **w_axis),
        helper.make_node(op, ["xdq", "wdq", "B"], ["y"], name="node", **attrs),
    ]
    inits = {
        "xs": np.asarray(x_scale, np.float32),
        "xzp": np.uint8(128),
        "Wq": w,
        "ws": w_scale,
        "wzp": np.zeros(w_scale.shape, np.int8),
        "B": RNG.normal(size=c_out).astype(np.float32),
    }
    return make_model(nodes, [tensor_info("x", shape=x_shape)], [tensor_info("y", shape=y_shape)], inits)


def _bias_dq(proto):
    node = next(n for n in proto.graph.node if n.name == "node")
    dq = producers(proto).get(node.input[2])
    assert dq is not None and dq.op_type == "DequantizeLinear"
    return dq


@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_bias_becomes_int32(per_channel: bool) -> None:
    w_scale = RNG.uniform(0.001, 0.01, 4).astype(np.float32) if per_channel else np.asarray(np.float32(0.004))
    proto = qdq_conv_model(w_scale)
    bias = initializers(proto)["B"]
    x = RNG.normal(size=(1, 3, 5, 5)).astype(np.float32)
    want = run(proto, {"x": x})[0]
    model = to_ir(proto)
    assert QuantizeBias()(model).modified
    out = to_proto(model)
    inits = initializers(out)
    dq = _bias_dq(out)
    q, scale, zp = (inits[name] for name in dq.input)
    assert q.dtype == np.int32 and zp.dtype == np.int32
    assert not zp.any()
    expected_scale = (np.float32(0.05) * w_scale).astype(np.float32)
    np.testing.assert_array_equal(scale, expected_scale)
    np.testing.assert_array_equal(q, np.rint(bias.astype(np.float64) / expected_scale).astype(np.int32))
    if per_channel:
        assert scale.shape == (4,) and get_attr(dq, "axis") == 0
    else:
        assert scale.shape == ()
    assert "B" not in inits  # the float bias is gone
    np.testing.assert_allclose(run(out, {"x": x})[0], want, atol=float(expected_scale.max()))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_per_channel_bias(trans_b: int) -> None:
    w_scale = RNG.uniform(0.001, 0.01, 4).astype(np.float32)
    proto = qdq_conv_model(w_scale, op="Gemm", trans_b=trans_b)
    model = to_ir(proto)
    assert QuantizeBias()(model).modified
    out = to_proto(model)
    dq = _bias_dq(out)
    inits = initializers(out)
    np.testing.assert_array_equal(inits[dq.input[1]], (np.float32(0.05) * w_scale).astype(np.float32))
    assert get_attr(dq, "axis") == 0
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(proto, {"x": x})[0], atol=1e-3)


def test_float_conv_bias_is_untouched() -> None:
    proto = make_model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"])],
        [tensor_info("x", shape=[1, 3, 5, 5])],
        [tensor_info("y", shape=[1, 4, 3, 3])],
        {"W": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "B": np.ones(4, np.float32)},
    )
    model = to_ir(proto)
    assert not QuantizeBias()(model).modified
