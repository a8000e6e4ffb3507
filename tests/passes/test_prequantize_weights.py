"""PrequantizeWeights: QuantizeLinear of a constant becomes an integer initializer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxq.passes.prequantize_weights import PrequantizeWeights
from tests.helpers import initializers, make_model, op_types, run, tensor_info, to_ir, to_proto

RNG = np.random.default_rng(2)


def qdq_matmul_model(w, scale, zp, axis=None, *, float_user: bool = False):
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["W", "s", "zp"], ["Wq"], name="q", **attrs),
        helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wdq"], name="dq", **attrs),
        helper.make_node("MatMul", ["x", "Wdq"], ["y"], name="mm"),
    ]
    outputs = [tensor_info("y", shape=[2, w.shape[1]])]
    if float_user:  # the same float weight also feeds a float op
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y_float"], name="mm_float"))
        outputs.append(tensor_info("y_float", shape=[2, w.shape[1]]))
    return make_model(
        nodes, [tensor_info("x", shape=[2, w.shape[0]])], outputs, {"W": w, "s": scale, "zp": zp}
    )


def reference_q(w, scale, zp, axis):
    attrs = {} if axis is None else {"axis": axis}
    proto = make_model(
        [helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["q"], **attrs)],
        [tensor_info("w", shape=list(w.shape))],
        [tensor_info("q", helper.np_dtype_to_tensor_dtype(zp.dtype), list(w.shape))],
        {"s": scale, "zp": zp},
    )
    return ReferenceEvaluator(proto).run(None, {"w": w})[0]


CASES = {
    "per-tensor-int8": (np.float32(0.02), np.int8(0), None),
    "per-tensor-uint8": (np.float32(0.013), np.uint8(131), None),
    "per-channel-axis1": (RNG.uniform(0.005, 0.03, 6).astype(np.float32), np.zeros(6, np.int8), 1),
    "per-channel-axis0": (RNG.uniform(0.005, 0.03, 5).astype(np.float32), np.zeros(5, np.int8), 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_q_of_constant_becomes_integer_initializer(case: str) -> None:
    scale, zp, axis = CASES[case]
    scale, zp = np.asarray(scale), np.asarray(zp)
    w = RNG.normal(size=(5, 6)).astype(np.float32)
    w[0, 0] = 7.0  # saturates for the small scales
    proto = qdq_matmul_model(w, scale, zp, axis)
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    want = run(proto, {"x": x})[0]
    model = to_ir(proto)
    assert PrequantizeWeights()(model).modified
    out = to_proto(model)
    assert "QuantizeLinear" not in op_types(out)
    inits = initializers(out)
    assert "W" not in inits  # the float weight had no other user
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    q = inits[dq.input[0]]
    assert q.dtype == zp.dtype
    np.testing.assert_array_equal(q, reference_q(w, scale, zp, axis))
    np.testing.assert_array_equal(run(out, {"x": x})[0], want)


def test_weight_shared_with_float_consumer_keeps_float_initializer() -> None:
    w = RNG.normal(size=(4, 3)).astype(np.float32)
    proto = qdq_matmul_model(w, np.float32(0.01), np.int8(0), float_user=True)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    want = run(proto, {"x": x})
    model = to_ir(proto)
    assert PrequantizeWeights()(model).modified
    out = to_proto(model)
    inits = initializers(out)
    assert "W" in inits
    np.testing.assert_array_equal(inits["W"], w)
    assert inits["W"].dtype == np.float32
    float_mm = next(n for n in out.graph.node if n.name == "mm_float")
    assert float_mm.input[1] == "W"
    got = run(out, {"x": x})
    for g, e in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, e)


def test_q_of_activation_is_kept() -> None:
    proto = make_model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"]),
        ],
        [tensor_info("x", shape=[3])],
        [tensor_info("y", TensorProto.FLOAT, [3])],
        {"s": np.float32(0.1), "zp": np.uint8(3)},
    )
    model = to_ir(proto)
    assert not PrequantizeWeights()(model).modified
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear"]


def test_every_file_backed_weight_is_unmapped_as_soon_as_it_is_quantized(
    model_path, calib_feeds, tmp_path, monkeypatch
) -> None:
    """``release`` must succeed for every weight (no numpy view of the mapped bytes still alive),
    otherwise every weight of a large model stays mapped until the end of the run."""
    import onnxq
    from onnxq.passes import prequantize_weights

    released = []

    def strict_release(value):  # like passes._util.release, but a live view is an error
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()  # raises BufferError while a view of its mapping is alive
            released.append(value.name)

    monkeypatch.setattr(prequantize_weights, "release", strict_release)
    onnxq.quantize(
        model_path("tiny-bert"), calib_feeds("tiny-bert", 2), output=tmp_path / "q.onnx", progress=False
    )
    assert len(released) > 10
