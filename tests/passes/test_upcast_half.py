"""UpcastHalf: float16/bfloat16 models compute in float32 inside, with the same interface."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxq.passes.upcast_half import UpcastHalf
from tests.helpers import make_model, run, tensor_info, to_ir, to_proto

RNG = np.random.default_rng(0)


def half_model() -> onnx.ModelProto:
    """x (fp16) @ W (fp16) + ConstantOfShape(0.5 as fp16) → Cast(fp16) → Relu; outputs y and h."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["bias"],
            value=helper.make_tensor("v", TensorProto.FLOAT16, [1], [0.5]),
        ),
        helper.make_node("Add", ["h", "bias"], ["a"]),
        helper.make_node("Cast", ["a"], ["c"], to=TensorProto.FLOAT16),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = {"W": RNG.normal(size=(8, 4)).astype(np.float16), "shape": np.array([4], np.int64)}
    return make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT16, [2, 8])],
        [tensor_info("y", TensorProto.FLOAT16, [2, 4]), tensor_info("h", TensorProto.FLOAT16, [2, 4])],
        inits,
    )


def bf16_model() -> onnx.ModelProto:
    w = helper.make_tensor("W", TensorProto.BFLOAT16, [8, 4], RNG.normal(size=32).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "bf16",
        [tensor_info("x", TensorProto.BFLOAT16, [2, 8])],
        [tensor_info("y", TensorProto.BFLOAT16, [2, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_float16_model_computes_in_float32_with_the_same_interface() -> None:
    model = half_model()
    ir_model = to_ir(model)
    result = UpcastHalf()(ir_model)
    assert result.modified
    out = to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [TensorProto.FLOAT16]
    assert [o.name for o in out.graph.output] == ["y", "h"]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT16 for o in out.graph.output)
    assert all(i.data_type == TensorProto.FLOAT for i in out.graph.initializer if i.name == "W")
    x = RNG.normal(size=(2, 8)).astype(np.float16)
    w = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")).astype(
        np.float32
    )
    h = x.astype(np.float32) @ w
    y, h_out = run(out, {"x": x})
    assert y.dtype == np.float16 and h_out.dtype == np.float16
    np.testing.assert_allclose(h_out, h.astype(np.float16), rtol=1e-3)
    np.testing.assert_allclose(y, np.maximum(h + 0.5, 0).astype(np.float16), rtol=1e-3)


def test_bfloat16_model_is_upcast() -> None:
    result = UpcastHalf()(to_ir(bf16_model()))
    assert result.modified
    out = to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.BFLOAT16


def test_float32_model_is_untouched() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", shape=[2])], [tensor_info("y", shape=[2])]
    )
    assert not UpcastHalf()(to_ir(model)).modified


def test_opset13_float16_model_quantizes_and_runs(tmp_path) -> None:
    import onnxq

    model = half_model()
    model.opset_import[0].version = 13
    model.ir_version = 8
    feeds = [{"x": RNG.normal(size=(2, 8)).astype(np.float16)} for _ in range(4)]
    result = onnxq.quantize(model, feeds, output=tmp_path / "q.onnx", progress=False)
    y, h = run(str(result.output_path), feeds[0])
    assert y.dtype == np.float16 and h.dtype == np.float16
    assert all(f.cosine > 0.99 for f in result.summary.fidelity)
