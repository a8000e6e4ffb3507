"""FoldBatchNorm: Conv → BatchNormalization becomes a single Conv with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxq.passes.fold_batchnorm import FoldBatchNorm
from tests.helpers import make_model, op_types, run, tensor_info, to_ir, to_proto

RNG = np.random.default_rng(0)


def _bn_params(c: int) -> dict[str, np.ndarray]:
    return {
        "gamma": RNG.uniform(0.5, 2.0, c).astype(np.float32),
        "beta": RNG.normal(size=c).astype(np.float32),
        "mean": RNG.normal(size=c).astype(np.float32),
        "var": RNG.uniform(0.1, 3.0, c).astype(np.float32),
    }


def conv_bn_model(*, bias: bool = True, group: int = 1, second_use: bool = False, eps: float = 1e-3):
    c_in, c_out = 4, 6
    inits = {"W": RNG.normal(size=(c_out, c_in // group, 3, 3)).astype(np.float32), **_bn_params(c_out)}
    conv_inputs = ["x", "W"]
    if bias:
        inits["B"] = RNG.normal(size=c_out).astype(np.float32)
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=eps
        ),
    ]
    outputs = [tensor_info("y", shape=[2, c_out, 5, 5])]
    if second_use:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(tensor_info("r", shape=[2, c_out, 5, 5]))
    return make_model(nodes, [tensor_info("x", shape=[2, c_in, 5, 5])], outputs, inits)


X = RNG.normal(size=(2, 4, 5, 5)).astype(np.float32)


@pytest.mark.parametrize(("bias", "group"), [(True, 1), (False, 1), (True, 2)])
def test_conv_bn_becomes_one_conv(bias: bool, group: int) -> None:
    proto = conv_bn_model(bias=bias, group=group)
    want = run(proto, {"x": X})
    model = to_ir(proto)
    result = FoldBatchNorm()(model)
    assert result.modified
    folded = to_proto(result.model)
    assert op_types(folded) == ["Conv"]
    conv = folded.graph.node[0]
    assert len(conv.input) == 3 and conv.input[2]  # a bias was added or updated
    assert [o.name for o in folded.graph.output] == ["y"]  # the model output keeps its name
    got = run(folded, {"x": X})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_conv_output_used_twice_is_not_folded() -> None:
    proto = conv_bn_model(second_use=True)
    want = run(proto, {"x": X})
    model = to_ir(proto)
    result = FoldBatchNorm()(model)
    assert not result.modified
    after = to_proto(result.model)
    assert op_types(after).count("BatchNormalization") == 1
    got = run(after, {"x": X})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_bn_with_non_constant_params_is_not_folded() -> None:
    proto = conv_bn_model()
    # make the mean a graph input: the fold needs every BN parameter constant
    mean = next(i for i in proto.graph.initializer if i.name == "mean")
    proto.graph.initializer.remove(mean)
    proto.graph.input.append(tensor_info("mean", shape=[6]))
    model = to_ir(proto)
    assert not FoldBatchNorm()(model).modified
    assert "BatchNormalization" in op_types(model)


def test_bn_after_non_conv_is_left_alone() -> None:
    inits = {"W": RNG.normal(size=(4, 4)).astype(np.float32), **_bn_params(4)}
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("BatchNormalization", ["m", "gamma", "beta", "mean", "var"], ["y"]),
        ],
        [tensor_info("x", shape=[2, 4])],
        [tensor_info("y", shape=[2, 4])],
        inits,
    )
    model = to_ir(proto)
    assert not FoldBatchNorm()(model).modified
    assert op_types(model) == ["MatMul", "BatchNormalization"]
