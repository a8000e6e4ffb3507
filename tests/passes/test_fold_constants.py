"""FoldConstants: constant subgraphs in front of weights become plain initializers."""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxq.passes.fold_constants import FoldConstants
from tests.helpers import initializers, make_model, op_types, run, tensor_info, to_ir, to_proto

RNG = np.random.default_rng(1)


def test_transposed_weight_becomes_initializer() -> None:
    w = RNG.normal(size=(6, 4)).astype(np.float32)  # stored [N, K], transposed to [K, N]
    proto = make_model(
        [
            helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "Wt"], ["y"]),
        ],
        [tensor_info("x", shape=[3, 4])],
        [tensor_info("y", shape=[3, 6])],
        {"W": w},
    )
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    want = run(proto, {"x": x})[0]
    model = to_ir(proto)
    assert FoldConstants()(model).modified
    assert op_types(model) == ["MatMul"]
    matmul = next(iter(model.graph))
    weight = matmul.inputs[1]
    assert weight.is_initializer()
    np.testing.assert_array_equal(weight.const_value.numpy(), w.T)
    folded = to_proto(model)
    assert [a.shape for a in initializers(folded).values()] == [(4, 6)]
    np.testing.assert_array_equal(run(folded, {"x": x})[0], want)


def test_chain_of_constant_ops_is_folded_but_inputs_are_not() -> None:
    w = RNG.normal(size=(4, 6)).astype(np.float16)
    proto = make_model(
        [
            helper.make_node("Cast", ["W"], ["Wf"], to=1),
            helper.make_node("Reshape", ["Wf", "shape"], ["Wr"]),
            helper.make_node("MatMul", ["x", "Wr"], ["m"]),
            helper.make_node("Relu", ["m"], ["y"]),
        ],
        [tensor_info("x", shape=[3, 4])],
        [tensor_info("y", shape=[3, 6])],
        {"W": w, "shape": np.array([4, 6], np.int64)},
    )
    model = to_ir(proto)
    FoldConstants()(model)
    assert op_types(model) == ["MatMul", "Relu"]
    weight = next(iter(model.graph)).inputs[1]
    np.testing.assert_array_equal(weight.const_value.numpy(), w.astype(np.float32))
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["y"]
