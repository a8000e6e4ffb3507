"""cleanup.DropQDQAroundDataMovement: DQ → data movement → Q with equal parameters runs on integers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxq.passes.cleanup import Cleanup, DropQDQAroundDataMovement
from tests.helpers import make_model, op_types, run, tensor_info, to_ir, to_proto

RNG = np.random.default_rng(4)


def sandwich(
    op: str, *, out_scale=0.05, out_zp=120, extra_inputs=(), attrs=None, out_shape, infer: bool = True
):
    """x → Q → DQ → op → Q → DQ → Relu → y, with the second Q's parameters configurable."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["xq"], name="q1"),
        helper.make_node("DequantizeLinear", ["xq", "s1", "z1"], ["xdq"], name="dq1"),
        helper.make_node(op, ["xdq", *extra_inputs], ["moved"], name="move", **(attrs or {})),
        helper.make_node("QuantizeLinear", ["moved", "s2", "z2"], ["mq"], name="q2"),
        helper.make_node("DequantizeLinear", ["mq", "s2", "z2"], ["mdq"], name="dq2"),
        helper.make_node("Relu", ["mdq"], ["y"], name="relu"),
    ]
    inits = {
        "s1": np.float32(0.05),
        "z1": np.uint8(120),
        "s2": np.float32(out_scale),
        "z2": np.uint8(out_zp),
        "shape": np.array([4, 6], np.int64),
    }
    return make_model(
        nodes, [tensor_info("x", shape=[2, 3, 4])], [tensor_info("y", shape=out_shape)], inits, infer=infer
    )


X = (RNG.normal(size=(2, 3, 4)) * 3).astype(np.float32)

MOVES = {
    "Reshape": ({"extra_inputs": ["shape"], "out_shape": [4, 6]}),
    "Transpose": ({"attrs": {"perm": [2, 0, 1]}, "out_shape": [4, 2, 3]}),
    "Flatten": ({"attrs": {"axis": 1}, "out_shape": [2, 12]}),
}


@pytest.mark.parametrize("op", list(MOVES))
def test_matching_pair_is_removed_and_output_is_exact(op: str) -> None:
    proto = sandwich(op, **MOVES[op])
    want = run(proto, {"x": X})[0]
    model = to_ir(proto)
    assert DropQDQAroundDataMovement()(model).modified
    out = to_proto(model)
    assert op_types(out) == ["QuantizeLinear", op, "DequantizeLinear", "Relu"]
    move = next(n for n in out.graph.node if n.op_type == op)
    assert move.input[0] == "xq"  # the op reads the integers
    np.testing.assert_array_equal(run(out, {"x": X})[0], want)
    # the integer tensor between the op and the DQ is typed uint8
    assert model.graph.node(1).outputs[0].dtype.name == "UINT8"


@pytest.mark.parametrize(("scale", "zp"), [(0.07, 120), (0.05, 121)])
def test_different_parameters_are_kept(scale: float, zp: int) -> None:
    proto = sandwich("Reshape", out_scale=scale, out_zp=zp, **MOVES["Reshape"])
    want = run(proto, {"x": X})[0]
    model = to_ir(proto)
    assert not DropQDQAroundDataMovement()(model).modified
    out = to_proto(model)
    assert op_types(out).count("QuantizeLinear") == 2
    assert op_types(out).count("DequantizeLinear") == 2
    np.testing.assert_array_equal(run(out, {"x": X})[0], want)


def test_dq_with_a_second_user_is_kept() -> None:
    proto = sandwich("Reshape", **MOVES["Reshape"])
    proto.graph.node.append(helper.make_node("Neg", ["xdq"], ["other"], name="neg"))
    proto.graph.output.append(tensor_info("other", TensorProto.FLOAT, [2, 3, 4]))
    model = to_ir(proto)
    assert not DropQDQAroundDataMovement()(model).modified


def test_cleanup_removes_dead_nodes_and_sorts() -> None:
    proto = sandwich("Reshape", **MOVES["Reshape"])
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    # put the graph out of order: the Relu first
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([nodes[5], *nodes[:5], nodes[6]])
    model = to_ir(proto)
    assert Cleanup()(model).modified
    out = to_proto(model)
    assert op_types(out) == ["QuantizeLinear", "Reshape", "DequantizeLinear", "Relu"]


def test_graph_without_value_info() -> None:
    proto = sandwich("Reshape", infer=False, **MOVES["Reshape"])
    want = run(proto, {"x": X})[0]
    model = to_ir(proto)
    assert DropQDQAroundDataMovement()(model).modified
    np.testing.assert_array_equal(run(to_proto(model), {"x": X})[0], want)
