"""InsertQDQ driven by the planner: per-channel axes for every weight layout, 1-D weights, Gemm
transA, and weights held in Constant nodes."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxq
from onnxq.config import PerChannel, PerTensor, QuantConfig, QuantSpec
from onnxq.passes.insert_qdq import InsertQDQ
from onnxq.pipeline import prepare
from onnxq.plan import Planner
from tests.helpers import (
    get_attr,
    initializers,
    make_model,
    op_types,
    run,
    tensor_info,
    to_proto,
    weight_source,
)

RNG = np.random.default_rng(5)
K, N = 4, 6  # distinct so that a wrong channel axis gives a wrong number of scales


def layout_model(layout: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], int]:
    """A one-compute-node model, its feeds, and the expected per-channel axis of its weight."""
    if layout == "MatMul":
        w, node = RNG.normal(size=(K, N)), helper.make_node("MatMul", ["x", "W"], ["y"], name="op")
        x_shape, y_shape, axis = [3, K], [3, N], 1
    elif layout == "MatMul3D":  # batched activations, 2-D weight
        w, node = RNG.normal(size=(K, N)), helper.make_node("MatMul", ["x", "W"], ["y"], name="op")
        x_shape, y_shape, axis = [2, 3, K], [2, 3, N], 1
    elif layout == "Gemm-transB1":
        w = RNG.normal(size=(N, K))
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="op", transB=1)
        x_shape, y_shape, axis = [3, K], [3, N], 0
    elif layout == "Gemm-transB0":
        w = RNG.normal(size=(K, N))
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="op", transB=0)
        x_shape, y_shape, axis = [3, K], [3, N], 1
    elif layout == "Gemm-transA1":
        w = RNG.normal(size=(K, N))
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="op", transA=1)
        x_shape, y_shape, axis = [K, 3], [3, N], 1
    elif layout == "Conv":
        w = RNG.normal(size=(N, K, 3, 3))
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="op")
        x_shape, y_shape, axis = [1, K, 5, 5], [1, N, 3, 3], 0
    elif layout == "ConvTranspose":
        w = RNG.normal(size=(K, N, 3, 3))
        node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="op")
        x_shape, y_shape, axis = [1, K, 5, 5], [1, N, 7, 7], 1
    else:  # pragma: no cover
        raise AssertionError(layout)
    # channels with very different magnitudes: per-channel scales must differ
    w = w.astype(np.float32)
    inits = {"W": w, "B": RNG.normal(size=N).astype(np.float32)}
    proto = make_model([node], [tensor_info("x", shape=x_shape)], [tensor_info("y", shape=y_shape)], inits)
    if "B" not in node.input:
        proto.graph.initializer.pop()
    feeds = {"x": RNG.normal(size=x_shape).astype(np.float32)}
    return proto, feeds, axis


LAYOUTS = ["MatMul", "MatMul3D", "Gemm-transB1", "Gemm-transB0", "Gemm-transA1", "Conv", "ConvTranspose"]


def _plan_and_insert(proto: onnx.ModelProto, config: QuantConfig | None = None):
    model, _ = prepare(proto)
    plan = Planner(config or QuantConfig()).plan(model)
    ranges = {name: (-4.0, 4.0) for name in plan.calibration_tensors()}
    assert InsertQDQ(plan, ranges)(model).modified
    return plan, to_proto(model)


def _weight_q(out: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "W")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_channel_axis_for_each_layout(layout: str) -> None:
    proto, _, axis = layout_model(layout)
    plan, out = _plan_and_insert(proto)
    assert plan.nodes["op"].quantized
    [weight_plan] = plan.weights.values()
    assert weight_plan.axis == axis
    q = _weight_q(out)
    assert get_attr(q, "axis") == axis
    inits = initializers(out)
    scale, zp = inits[q.input[1]], inits[q.input[2]]
    w = initializers(proto)["W"]
    assert scale.shape == (w.shape[axis],) and zp.shape == (w.shape[axis],)
    assert zp.dtype == np.int8 and not zp.any()
    absmax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
    np.testing.assert_allclose(scale, (absmax / 127).astype(np.float32), rtol=1e-6)
    # every DequantizeLinear of the weight uses the same axis
    for dq in (n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[1] == q.input[1]):
        assert get_attr(dq, "axis") == axis


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_layout_runs_and_matches_float(layout: str, tmp_path) -> None:
    proto, feeds, axis = layout_model(layout)
    calib = [{"x": RNG.normal(size=feeds["x"].shape).astype(np.float32)} for _ in range(8)]
    result = onnxq.quantize(proto, [feeds, *calib], output=tmp_path / "q.onnx", progress=False)
    out = onnx.load(str(result.output_path))
    node = next(n for n in out.graph.node if n.name == "op")
    src = weight_source(out, node)
    assert src is not None, "the weight must be read through DequantizeLinear(int8 initializer)"
    dq, q = src
    assert q.dtype == np.int8 and get_attr(dq, "axis") == axis
    want = run(proto, feeds)[0]
    got = run(out, feeds)[0]
    assert got.shape == want.shape
    cos = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want)))
    assert cos > 0.999, cos


def test_explicit_per_channel_axis_is_used() -> None:
    proto, _, _ = layout_model("MatMul")
    config = QuantConfig(weights=QuantSpec("int8", True, PerChannel(axis=0)))
    _, out = _plan_and_insert(proto, config)
    q = _weight_q(out)
    assert get_attr(q, "axis") == 0
    assert initializers(out)[q.input[1]].shape == (K,)


def test_per_tensor_weights_have_scalar_scale() -> None:
    proto, _, _ = layout_model("Conv")
    _, out = _plan_and_insert(proto, QuantConfig(weights=QuantSpec("int8", True, PerTensor())))
    q = _weight_q(out)
    assert get_attr(q, "axis") is None
    assert initializers(out)[q.input[1]].shape == ()


def test_one_dimensional_weight_is_per_tensor_without_warnings(tmp_path, caplog) -> None:
    w = RNG.normal(size=(K,)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="op")],
        [tensor_info("x", shape=[3, K])],
        [tensor_info("y", shape=[3])],
        {"W": w},
    )
    calib = [{"x": RNG.normal(size=(3, K)).astype(np.float32)} for _ in range(4)]
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        plan, inserted = _plan_and_insert(proto)
        result = onnxq.quantize(proto, calib, output=tmp_path / "q.onnx", progress=False)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    [weight_plan] = plan.weights.values()
    assert weight_plan.axis is None
    q = _weight_q(inserted)
    assert get_attr(q, "axis") is None and initializers(inserted)[q.input[1]].shape == ()
    out = onnx.load(str(result.output_path))
    dq, qw = weight_source(out, next(n for n in out.graph.node if n.name == "op"))
    assert qw.dtype == np.int8 and qw.shape == (K,)
    assert get_attr(dq, "axis") is None
    np.testing.assert_allclose(run(out, calib[0])[0], run(proto, calib[0])[0], atol=0.1)


def test_weight_in_constant_node_is_quantized(tmp_path) -> None:
    w = RNG.normal(size=(16, 32)).astype(np.float32)
    proto = make_model(
        [
            helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w, "W")),
            helper.make_node("MatMul", ["x", "W"], ["y"], name="op"),
        ],
        [tensor_info("x", shape=[2, 16])],
        [tensor_info("y", shape=[2, 32])],
    )
    assert not proto.graph.initializer
    calib = [{"x": RNG.normal(size=(2, 16)).astype(np.float32)} for _ in range(4)]
    result = onnxq.quantize(proto, calib, output=tmp_path / "q.onnx", progress=False)
    assert result.summary.quantized_nodes.get("MatMul") == 1
    out = onnx.load(str(result.output_path))
    assert "Constant" not in op_types(out)
    inits = initializers(out)
    assert [a for a in inits.values() if a.dtype == np.float32 and a.size >= w.size] == []
    int8 = [a for a in inits.values() if a.dtype == np.int8 and a.ndim == 2]  # not the zero points
    assert [a.shape for a in int8] == [w.shape]
    _, qw = weight_source(out, next(n for n in out.graph.node if n.name == "op"))
    assert qw.dtype == np.int8
    np.testing.assert_allclose(run(out, calib[0])[0], run(proto, calib[0])[0], atol=0.15)


def test_weight_shared_by_quantized_and_float_nodes(tmp_path) -> None:
    """A weight also read by an op onnxq leaves in float keeps its float initializer for that op."""
    w = RNG.normal(size=(K, K)).astype(np.float32)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"], name="op"),
            helper.make_node("Sub", ["m", "W"], ["y"], name="sub"),
        ],
        [tensor_info("x", shape=[K, K])],
        [tensor_info("y", shape=[K, K])],
        {"W": w},
    )
    calib = [{"x": RNG.normal(size=(K, K)).astype(np.float32)} for _ in range(4)]
    result = onnxq.quantize(proto, calib, output=tmp_path / "q.onnx", progress=False)
    out = onnx.load(str(result.output_path))
    inits = initializers(out)
    sub = next(n for n in out.graph.node if n.name == "sub")
    np.testing.assert_array_equal(inits[sub.input[1]], w)
    assert weight_source(out, next(n for n in out.graph.node if n.name == "op"))[1].dtype == np.int8
