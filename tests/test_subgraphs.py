"""Static quantization inside If/Loop/Scan bodies: calibrated inside the body, quantized there,
fused by ONNX Runtime, and accurate; on hand-built graphs and on a real model merged the way
decoder exports merge their with-past and without-past graphs (one If, weights shared)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxq
from tests.helpers import make_model, tensor_info

RNG = np.random.default_rng(0)
H = 64


def _weights(*names: str) -> dict[str, np.ndarray]:
    return {n: (RNG.normal(size=(H, H)) / np.sqrt(H)).astype(np.float32) for n in names}


def _relative_error(path: Path, quant: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(quant), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed in feeds:
        for want, got in zip(fp32.run(None, feed), q.run(None, feed), strict=True):
            if want.size:
                worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return worst


def _optimized_ops(path: Path) -> dict[str, list[str]]:
    """Op types of each graph of the model as ORT's CPU EP optimizes it (``main`` and per body)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(so.optimized_model_filepath)
    found = {"main": [n.op_type for n in model.graph.node]}

    def walk(graph: onnx.GraphProto, prefix: str) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    found[f"{prefix}{node.name}/{attr.name}"] = [n.op_type for n in attr.g.node]
                    walk(attr.g, f"{prefix}{node.name}/{attr.name}/")

    walk(model.graph, "")
    return found


def _loop_model(path: Path) -> list[dict[str, np.ndarray]]:
    """``h = x; for n iterations: m = h @ W; h = tanh(m + b); ys += relu(m)``; W and b outer."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["h", "W"], ["m"], name="loop_mm"),
            helper.make_node("Add", ["m", "b"], ["a"], name="loop_add"),
            helper.make_node("Tanh", ["a"], ["h_out"], name="loop_tanh"),
            helper.make_node("Relu", ["m"], ["y"], name="loop_relu"),
        ],
        "body",
        [
            tensor_info("i", TensorProto.INT64, []),
            tensor_info("cond", TensorProto.BOOL, []),
            tensor_info("h", shape=[4, H]),
        ],
        [
            tensor_info("cond_out", TensorProto.BOOL, []),
            tensor_info("h_out", shape=[4, H]),
            tensor_info("y", shape=[4, H]),
        ],
    )
    model = make_model(
        [
            helper.make_node(
                "Constant", [], ["true"], value=helper.make_tensor("t", TensorProto.BOOL, [], [1])
            ),
            helper.make_node("Loop", ["n", "true", "x"], ["h_final", "ys"], name="loop", body=body),
        ],
        [tensor_info("x", shape=[4, H]), tensor_info("n", TensorProto.INT64, [])],
        [tensor_info("h_final", shape=[4, H]), tensor_info("ys", shape=["n", 4, H])],
        {**_weights("W"), "b": RNG.normal(size=H).astype(np.float32)},
    )
    onnx.save(model, path)
    return [{"x": RNG.normal(size=(4, H)).astype(np.float32), "n": np.array(3, np.int64)} for _ in range(4)]


def _scan_model(path: Path) -> list[dict[str, np.ndarray]]:
    """A gated RNN as a Scan: ``s = tanh(x_t @ Wx) * sigmoid(s @ Ws)`` over 5 steps, every state a
    scan output."""
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "Wx"], ["mx"], name="scan_mm_x"),
            helper.make_node("MatMul", ["s", "Ws"], ["ms"], name="scan_mm_s"),
            helper.make_node("Tanh", ["mx"], ["candidate"], name="scan_tanh"),
            helper.make_node("Sigmoid", ["ms"], ["gate"], name="scan_gate"),
            helper.make_node("Mul", ["candidate", "gate"], ["s_new"], name="scan_mul"),
            helper.make_node("Identity", ["s_new"], ["y_t"], name="scan_out"),
        ],
        "body",
        [tensor_info("s", shape=[1, H]), tensor_info("x_t", shape=[1, H])],
        [tensor_info("s_new", shape=[1, H]), tensor_info("y_t", shape=[1, H])],
    )
    model = make_model(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], name="rnn", body=body, num_scan_inputs=1)],
        [tensor_info("s0", shape=[1, H]), tensor_info("xs", shape=[5, 1, H])],
        [tensor_info("s_final", shape=[1, H]), tensor_info("ys", shape=[5, 1, H])],
        _weights("Wx", "Ws"),
    )
    onnx.save(model, path)
    return [
        {"s0": np.zeros((1, H), np.float32), "xs": RNG.normal(size=(5, 1, H)).astype(np.float32)}
        for _ in range(4)
    ]


def _nested_model(path: Path) -> list[dict[str, np.ndarray]]:
    """A Loop whose body holds an If: even iterations ``h @ W1``, odd ones ``h @ W2``, then tanh."""
    branches = {
        key: helper.make_graph(
            [helper.make_node("MatMul", ["h", w], [out], name=f"{key}_mm")],
            key,
            [],
            [tensor_info(out, shape=[4, H])],
        )
        for key, w, out in (("then_branch", "W1", "t"), ("else_branch", "W2", "e"))
    }
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond"], ["cond_out"], name="keep_going"),
            helper.make_node("Mod", ["i", "two"], ["parity"], name="parity"),
            helper.make_node("Equal", ["parity", "zero"], ["even"], name="is_even"),
            helper.make_node("If", ["even"], ["m"], name="pick", **branches),
            helper.make_node("Tanh", ["m"], ["h_out"], name="tanh"),
        ],
        "body",
        [
            tensor_info("i", TensorProto.INT64, []),
            tensor_info("cond", TensorProto.BOOL, []),
            tensor_info("h", shape=[4, H]),
        ],
        [tensor_info("cond_out", TensorProto.BOOL, []), tensor_info("h_out", shape=[4, H])],
    )
    model = make_model(
        [
            helper.make_node(
                "Constant", [], ["true"], value=helper.make_tensor("t", TensorProto.BOOL, [], [1])
            ),
            helper.make_node("Loop", ["n", "true", "x"], ["h_final"], name="loop", body=body),
        ],
        [tensor_info("x", shape=[4, H]), tensor_info("n", TensorProto.INT64, [])],
        [tensor_info("h_final", shape=[4, H])],
        {**_weights("W1", "W2"), "two": np.array(2, np.int64), "zero": np.array(0, np.int64)},
    )
    onnx.save(model, path)
    return [{"x": RNG.normal(size=(4, H)).astype(np.float32), "n": np.array(4, np.int64)} for _ in range(4)]


@pytest.mark.parametrize(
    ("build", "matmuls", "bound"),
    [(_loop_model, 1, 0.03), (_scan_model, 2, 0.03), (_nested_model, 2, 0.03)],
    ids=["loop", "scan", "loop-if"],
)
def test_static_quantization_inside_bodies(build, matmuls, bound, tmp_path) -> None:
    """Every MatMul inside the bodies is quantized with ranges calibrated inside them, ORT's CPU EP
    runs it as an integer kernel, the outputs stay within int8 error of fp32, and the outer float
    weights are gone (stored once as int8 in the main graph)."""
    feeds = build(tmp_path / "m.onnx")
    result = onnxq.quantize(tmp_path / "m.onnx", feeds, output=tmp_path / "q.onnx", progress=False)
    assert result.summary.quantized_nodes.get("MatMul") == matmuls
    assert not [n for n in result.summary.float_nodes if n.op_type == "MatMul"]
    assert _relative_error(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds) < bound
    written = onnx.load(str(tmp_path / "q.onnx"))
    weights = [t.data_type for t in written.graph.initializer if len(t.dims) == 2]
    assert weights == [TensorProto.INT8] * matmuls
    optimized = _optimized_ops(tmp_path / "q.onnx")
    assert all("MatMul" not in ops for ops in optimized.values()), optimized
    assert sum(ops.count("MatMulIntegerToFloat") for ops in optimized.values()) == matmuls


def test_a_body_that_never_ran_stays_float_and_says_why(tmp_path) -> None:
    """A loop that runs zero times on every calibration sample has no ranges: its MatMul stays float
    with the reason, and the model still runs (and is exact) when the loop does run."""
    feeds = _loop_model(tmp_path / "m.onnx")
    never = [{**f, "n": np.array(0, np.int64)} for f in feeds]
    result = onnxq.quantize(tmp_path / "m.onnx", never, output=tmp_path / "q.onnx", progress=False)
    reasons = {n.name: n.reason for n in result.summary.float_nodes}
    assert "not computed on the calibration data" in reasons["loop/body/loop_mm"]
    assert _relative_error(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds) < 1e-6


def _branched_model(
    path: Path,
    branch: Callable[[str, str], list[onnx.NodeProto]],
    x_shape: list[int],
    y_shape: list[int],
    weights: dict[str, np.ndarray],
) -> list[dict[str, np.ndarray]]:
    """``y = If(flag, then, else)`` saved at ``path``, ``branch(key, out)`` giving the nodes of each
    branch (ending in ``out``), weights in the main graph; returns 4 feeds alternating branches."""
    branches = {
        key: helper.make_graph(branch(key, out), key, [], [tensor_info(out, shape=y_shape)])
        for key, out in (("then_branch", "t"), ("else_branch", "e"))
    }
    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], name="merged", **branches)],
        [tensor_info("x", shape=x_shape), tensor_info("flag", TensorProto.BOOL, [])],
        [tensor_info("y", shape=y_shape)],
        weights,
    )
    onnx.save(model, path)
    return [
        {"x": RNG.normal(size=x_shape).astype(np.float32), "flag": np.array(i % 2 == 0)} for i in range(4)
    ]


def _quantized_branches(
    tmp_path: Path, branch: Callable[[str, str], list[onnx.NodeProto]]
) -> tuple[list[dict[str, np.ndarray]], onnxq.QuantizationResult, onnx.ModelProto]:
    """:func:`_branched_model` on ``x [4, H]`` and a shared weight ``W`` at ``tmp_path / "m.onnx"``,
    quantized with the default config to ``tmp_path / "q.onnx"``: the feeds, the result, the file."""
    feeds = _branched_model(tmp_path / "m.onnx", branch, [4, H], [4, H], _weights("W"))
    result = onnxq.quantize(tmp_path / "m.onnx", feeds, output=tmp_path / "q.onnx", progress=False)
    return feeds, result, onnx.load(str(tmp_path / "q.onnx"))


def test_weight_shared_by_both_branches_is_stored_once(tmp_path) -> None:
    """An If whose two branches read the same outer weight (a merged decoder's layout): one int8
    copy in the main graph, both branches quantized and fused."""
    activation = {"then_branch": "Relu", "else_branch": "Tanh"}
    feeds, result, written = _quantized_branches(
        tmp_path,
        lambda key, out: [
            helper.make_node("MatMul", ["x", "W"], [f"{key}_m"], name=f"{key}_mm"),
            helper.make_node(activation[key], [f"{key}_m"], [out], name=f"{key}_act"),
        ],
    )
    assert result.summary.quantized_nodes == {"MatMul": 2}
    assert [(t.name, t.data_type) for t in written.graph.initializer if len(t.dims) == 2] == [
        ("W_quantized_1", TensorProto.INT8)
    ]
    assert _relative_error(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds) < 0.03
    optimized = _optimized_ops(tmp_path / "q.onnx")
    assert optimized["merged/then_branch"].count("MatMulIntegerToFloat") == 1
    assert optimized["merged/else_branch"].count("MatMulIntegerToFloat") == 1


def test_merged_decoder_quantizes_both_branches_like_the_plain_model(
    model_path, calib_feeds, tmp_path
) -> None:
    """tiny-llama (exported by torch, with past key values) merged the way decoder exports merge
    their with-past and without-past graphs: every MatMul of both branches is quantized and fused
    by ORT, the int8 weights are stored once (as many bytes as the plain model's), and both branches
    are as close to fp32 as the plain model's quantization is."""
    from models.merged import branch_feed, merge_into_if

    plain = model_path("tiny-llama")
    onnx.save(merge_into_if(onnx.load(str(plain))), tmp_path / "merged.onnx")
    feeds = calib_feeds("tiny-llama", 8)
    merged_feeds = [branch_feed(f, i) for i, f in enumerate(feeds)]
    base = onnxq.quantize(plain, feeds, output=tmp_path / "plain_q.onnx", progress=False)
    result = onnxq.quantize(
        tmp_path / "merged.onnx", merged_feeds, output=tmp_path / "merged_q.onnx", progress=False
    )

    assert result.summary.quantized_nodes == {k: 2 * v for k, v in base.summary.quantized_nodes.items()}
    assert result.summary.fidelity[0].cosine >= base.summary.fidelity[0].cosine - 1e-4

    def int8_bytes(path: Path) -> int:  # weights, not zero points
        model = onnx.load(str(path))
        return sum(
            len(t.raw_data)
            for t in model.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) >= 2
        )

    assert int8_bytes(tmp_path / "merged_q.onnx") == int8_bytes(tmp_path / "plain_q.onnx")

    def vectors(path: Path) -> int:  # per-channel weight scales and zero points
        return sum(
            1
            for t in onnx.load(str(path)).graph.initializer
            if len(t.dims) == 1 and re.search(r"_(scale|zero_point)(_\d+)?$", t.name)
        )

    assert vectors(tmp_path / "merged_q.onnx") <= vectors(tmp_path / "plain_q.onnx")  # not one per branch
    written = onnx.load(str(tmp_path / "merged_q.onnx"))
    float_2d = [
        t.name for t in written.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
    ]
    assert all(n.endswith("_row_scale") for n in float_2d)  # no float weight left: only per-row table scales

    held_out = [branch_feed(f, i) for f in feeds[:2] for i in (0, 1)]
    assert _relative_error(tmp_path / "merged.onnx", tmp_path / "merged_q.onnx", held_out) < 0.1
    fused = _optimized_ops(tmp_path / "plain_q.onnx")["main"].count("MatMulIntegerToFloat")
    optimized = _optimized_ops(tmp_path / "merged_q.onnx")
    assert fused > 0
    assert optimized["merged_decoder/then_branch"].count("MatMulIntegerToFloat") == fused
    assert optimized["merged_decoder/else_branch"].count("MatMulIntegerToFloat") == fused


def test_constants_folded_inside_branches_are_stored_once(tmp_path) -> None:
    """Both branches read ``Transpose(W)`` (a tied embedding's lm_head in a merged decoder): the
    folded weight moves to the main graph once, so the quantized file holds one int8 copy."""
    feeds, result, written = _quantized_branches(
        tmp_path,
        lambda key, out: [
            helper.make_node("Transpose", ["W"], [f"{key}_wt"], name=f"{key}_transpose", perm=[1, 0]),
            helper.make_node("MatMul", ["x", f"{key}_wt"], [out], name=f"{key}_mm"),
        ],
    )
    assert result.summary.quantized_nodes == {"MatMul": 2}
    weights = [t for t in written.graph.initializer if len(t.dims) == 2]
    assert [(t.data_type, list(t.dims)) for t in weights] == [(TensorProto.INT8, [H, H])]
    for attr in written.graph.node[0].attribute:
        assert not [t for t in attr.g.initializer if len(t.dims) == 2]
    assert _relative_error(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds) < 0.03


@pytest.mark.parametrize("target", ["cpu", "tensorrt", "openvino"])
def test_quantized_branch_with_matmul_add_loads_in_ort(target, tmp_path) -> None:
    """A branch computing ``x[1,1,6,6] @ W + b``: ORT rewrites MatMul+Add into Gemm inside the body,
    which mistyped the QuantizeLinear when its zero point was a body initializer and refused the
    model (found by the fuzzer); onnxq keeps those in the main graph, so the model loads and runs."""
    feeds = _branched_model(
        tmp_path / "m.onnx",
        lambda key, out: [
            helper.make_node("MatMul", ["x", "W"], [f"{key}_m"], name=f"{key}_mm"),
            helper.make_node("Add", [f"{key}_m", "b"], [out], name=f"{key}_add"),
        ],
        [1, 1, 6, 6],
        [1, 1, 6, 1],
        {"W": RNG.normal(size=(6, 1)).astype(np.float32), "b": RNG.normal(size=1).astype(np.float32)},
    )
    config = onnxq.QuantConfig(target=target)
    result = onnxq.quantize(
        tmp_path / "m.onnx", feeds, config=config, output=tmp_path / "q.onnx", progress=False
    )
    assert result.summary.quantized_nodes["MatMul"] == 2
    assert _relative_error(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds) < 0.05


def test_merged_model_bytes_do_not_depend_on_the_hash_seed(model_path, calib_feeds, tmp_path) -> None:
    """Identical inputs give identical bytes across processes too: the names made for the bodies
    leave them in a fixed order (string hashing differs from one interpreter to the next)."""
    import subprocess
    import sys

    from models.merged import branch_feed, merge_into_if

    onnx.save(merge_into_if(onnx.load(str(model_path("tiny-llama")))), tmp_path / "merged.onnx")
    feeds = [branch_feed(f, i) for i, f in enumerate(calib_feeds("tiny-llama", 4))]
    np.savez(tmp_path / "calib.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"q{seed}.onnx"
        model, calib = str(tmp_path / "merged.onnx"), str(tmp_path / "calib.npz")
        code = (
            f"import numpy as np, onnxq; data = np.load({calib!r}); "
            "feeds = [{k: data[k][i] for k in data.files} for i in range(len(data['input_ids']))]; "
            f"onnxq.quantize({model!r}, feeds, output={str(out)!r}, progress=False)"
        )
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_static_shape_target_keeps_the_rank_of_an_if_output(tmp_path) -> None:
    """A target that fixes shapes (qnn) forgets symbolic dimensions and infers them again; an If
    output whose branches give no shape keeps its rank (a model output needs a shape)."""
    feeds = _branched_model(
        tmp_path / "m.onnx",
        lambda key, out: [
            helper.make_node("MatMul", ["x", "W"], [f"{key}_m"], name=f"{key}_mm"),
            helper.make_node("Unsqueeze", [f"{key}_m", "axes"], [f"{key}_u"], name=f"{key}_unsq"),
            helper.make_node("Transpose", [f"{key}_u"], [f"{key}_t"], perm=[0, 1, 3, 2], name=f"{key}_tr"),
            helper.make_node("MatMul", [f"{key}_u", f"{key}_t"], [out], name=f"{key}_att"),
        ],
        [1, 4, H],
        ["a", "b", "c", "d"],
        {**_weights("W"), "axes": np.array([0], np.int64)},
    )
    result = onnxq.quantize(
        tmp_path / "m.onnx",
        feeds,
        config=onnxq.QuantConfig(target="qnn"),
        output=tmp_path / "q.onnx",
        progress=False,
    )
    written = onnx.load(tmp_path / "q.onnx")
    assert len(written.graph.output[0].type.tensor_type.shape.dim) == 4
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for feed in feeds:
        want, got = fp32.run(None, feed)[0], session.run(None, feed)[0]
        assert got.shape == want.shape == (1, 1, 4, 4)
    assert result.summary.fidelity[0].cosine > 0.99


@pytest.mark.parametrize("config", [onnxq.QuantConfig(), onnxq.QuantConfig(calibration=onnxq.Dynamic())])
def test_a_branch_returning_an_outer_value_keeps_its_identity(tmp_path, config) -> None:
    """A body output must be made in the body: the Identity that returns a value of the main graph
    is not eliminated, or ONNX Runtime refuses the model."""
    branches = {
        "then_branch": helper.make_graph(
            [helper.make_node("Identity", ["r"], ["t"])], "then", [], [tensor_info("t", shape=[4, H])]
        ),
        "else_branch": helper.make_graph(
            [helper.make_node("MatMul", ["r", "W"], ["e"])], "else", [], [tensor_info("e", shape=[4, H])]
        ),
    }
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("If", ["flag"], ["y"], **branches)],
        [tensor_info("x", shape=[4, H]), tensor_info("flag", TensorProto.BOOL, [])],
        [tensor_info("y", shape=[4, H])],
        _weights("W"),
    )
    feeds = [
        {"x": RNG.normal(size=(4, H)).astype(np.float32), "flag": np.array(i % 2 == 0)} for i in range(4)
    ]
    result = onnxq.quantize(model, feeds, config=config, output=tmp_path / "q.onnx", progress=False)
    assert result.summary.quantized_nodes == {"MatMul": 1}
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds[0])[0], np.maximum(feeds[0]["x"], 0))


def _plain_and_merged_tiny_llama(model_path, calib_feeds, tmp_path: Path, config: onnxq.QuantConfig):
    """tiny-llama and its merged layout (``merged.onnx``) quantized with ``config`` on 4 samples (the
    merged model's alternate branches): ``(feeds, plain result, merged result)``, written to
    ``plain_q.onnx`` and ``merged_q.onnx``."""
    from models.merged import branch_feed, merge_into_if

    plain = model_path("tiny-llama")
    onnx.save(merge_into_if(onnx.load(str(plain))), tmp_path / "merged.onnx")
    feeds = calib_feeds("tiny-llama", 4)
    base = onnxq.quantize(plain, feeds, config=config, output=tmp_path / "plain_q.onnx", progress=False)
    result = onnxq.quantize(
        tmp_path / "merged.onnx",
        [branch_feed(f, i) for i, f in enumerate(feeds)],
        config=config,
        output=tmp_path / "merged_q.onnx",
        progress=False,
    )
    return feeds, base, result


@pytest.mark.parametrize("weight_format", ["dequantize_linear", "matmul_nbits"])
def test_merged_decoder_weight_only_stores_shared_weights_once(
    model_path, calib_feeds, tmp_path, weight_format
) -> None:
    """Weight-only int4 of tiny-llama merged into an If: the embedding table is quantized in both
    branches (rows decoded in each) and stored once; with MatMulNBits every MatMul weight is stored
    once too (ORT pre-packs it from the main graph), so the integers equal the plain model's; the
    DequantizeLinear form copies MatMul weights into each branch (ORT's fusion needs them local)."""
    from models.merged import branch_feed

    config = onnxq.QuantConfig.weight_only("int4", 32, weight_format=weight_format)
    feeds, base, result = _plain_and_merged_tiny_llama(model_path, calib_feeds, tmp_path, config)
    assert result.summary.quantized_nodes == {k: 2 * v for k, v in base.summary.quantized_nodes.items()}
    assert not result.summary.float_nodes

    def integers(path: Path) -> dict[str, int]:  # packed int4 bytes, main graph and bodies
        model = onnx.load(str(path))
        graphs = [model.graph, *(a.g for n in model.graph.node for a in n.attribute if a.g.name)]
        found: dict[str, int] = {}
        for g in graphs:
            for t in g.initializer:
                if t.data_type in (TensorProto.INT4, TensorProto.UINT8) and len(t.dims) >= 2:
                    found[t.name] = found.get(t.name, 0) + len(t.raw_data)
        return found

    plain_bytes, merged_bytes = integers(tmp_path / "plain_q.onnx"), integers(tmp_path / "merged_q.onnx")
    table = [n for n in merged_bytes if n.startswith("model.embed_tokens")]
    assert table and all(merged_bytes[n] == plain_bytes[n] for n in table)  # the table once
    if weight_format == "matmul_nbits":
        assert sum(merged_bytes.values()) == sum(plain_bytes.values())
    else:
        assert sum(merged_bytes.values()) > sum(plain_bytes.values())
    session = ort.InferenceSession(str(tmp_path / "merged_q.onnx"), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    plain_q = ort.InferenceSession(str(tmp_path / "plain_q.onnx"), providers=["CPUExecutionProvider"])
    for feed in feeds[:2]:
        for branch in (0, 1):
            merged_feed = branch_feed(feed, branch)
            got = session.run(None, merged_feed)[0]
            np.testing.assert_allclose(got, plain_q.run(None, feed)[0], rtol=1e-4, atol=1e-4)
            assert np.isfinite(fp32.run(None, merged_feed)[0]).all()


def test_merged_decoder_dynamic_plans_each_branch(model_path, calib_feeds, tmp_path) -> None:
    """Dynamic quantization of tiny-llama merged into an If: both branches hold nodes of the same
    names, so each body gets a plan of its own (one plan keyed by name counted them once)."""
    config = onnxq.QuantConfig(calibration=onnxq.Dynamic())
    _, base, result = _plain_and_merged_tiny_llama(model_path, calib_feeds, tmp_path, config)
    assert result.summary.quantized_nodes == {k: 2 * v for k, v in base.summary.quantized_nodes.items()}
    assert result.summary.fidelity[0].cosine == pytest.approx(base.summary.fidelity[0].cosine, abs=1e-6)


@pytest.mark.parametrize("weight_format", ["dequantize_linear", "matmul_nbits"])
def test_tied_table_read_inside_branches_is_quantized_once(tmp_path, weight_format) -> None:
    """A tied embedding read in both branches of an If, as rows (Gather) and as the lm_head
    (``Transpose`` → MatMul): stored once as int4 in the main graph, with the same outputs as the
    plain model's weight-only quantization."""
    from models.merged import branch_feed, merge_into_if

    vocab, hidden = 64, 32
    table = RNG.normal(size=(vocab, hidden)).astype(np.float32)
    plain = make_model(
        [
            helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
            helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head"),
        ],
        [tensor_info("ids", TensorProto.INT64, [1, 8])],
        [tensor_info("logits", shape=[1, 8, vocab])],
        {"E": table},
    )
    feeds = [{"ids": RNG.integers(0, vocab, size=(1, 8))} for _ in range(4)]
    config = onnxq.QuantConfig.weight_only("int4", 16, weight_format=weight_format)
    base = onnxq.quantize(plain, feeds, config=config, output=tmp_path / "plain_q.onnx", progress=False)
    result = onnxq.quantize(
        merge_into_if(plain),
        [branch_feed(f, i) for i, f in enumerate(feeds)],
        config=config,
        output=tmp_path / "merged_q.onnx",
        progress=False,
    )
    assert not result.summary.float_nodes
    assert result.summary.quantized_nodes == {k: 2 * v for k, v in base.summary.quantized_nodes.items()}
    written = onnx.load(str(tmp_path / "merged_q.onnx"))
    float_tables = [list(t.dims) for t in written.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert [vocab, hidden] not in float_tables and [hidden, vocab] not in float_tables
    packed = [t for t in written.graph.initializer if t.name.startswith("E_packed")]
    assert len(packed) == 1
    for attr in written.graph.node[-1].attribute:
        assert not [t for t in attr.g.initializer if len(t.dims) == 2]
    session = ort.InferenceSession(str(tmp_path / "merged_q.onnx"), providers=["CPUExecutionProvider"])
    plain_q = ort.InferenceSession(str(tmp_path / "plain_q.onnx"), providers=["CPUExecutionProvider"])
    for feed in feeds:
        for branch in (0, 1):
            np.testing.assert_allclose(
                session.run(None, branch_feed(feed, branch))[0],
                plain_q.run(None, feed)[0],
                rtol=1e-5,
                atol=1e-5,
            )
