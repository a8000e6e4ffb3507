"""Weight-only quantization: block math, emitted forms, ORT fusion, tied embeddings, codebooks, streaming."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxq
from onnxq import codebook as cb
from onnxq.config import Codebook, PerBlock, QuantConfig, QuantSpec
from onnxq.lowbit import WEIGHT_TYPES, dequantize_blocks, quantize_blocks
from tests.helpers import matmul_model

INT_TYPES = ["int8", "int4", "int2"]
ALL_TYPES = ["int8", "uint8", "int4", "uint4", "int2", "uint2", "float8e4m3fn", "float4e2m1"]


def _weight(k: int = 128, n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


# --- block math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_blocks_match_onnx_reference_dequantize(dtype: str) -> None:
    wt = WEIGHT_TYPES[dtype]
    w = _weight(96, 40)  # 96 = 3 blocks of 32 along K (axis 0)
    q, scale, zp = quantize_blocks(w, wt, 0, 32, wt.signed or wt.is_float)
    assert scale.shape == (3, 40) and q.shape == w.shape
    inputs = ["q", "s"] + (["z"] if zp is not None else [])
    inits = [
        numpy_helper.from_array(q, "q")
        if wt.bits == 8 and not wt.is_float
        else helper.make_tensor("q", wt.ir_dtype.value, q.shape, q.astype(np.float32).ravel().tolist()),
        numpy_helper.from_array(scale, "s"),
    ]
    if zp is not None:
        inits.append(
            helper.make_tensor("z", wt.ir_dtype.value, zp.shape, zp.astype(np.float32).ravel().tolist())
        )
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", inputs, ["y"], axis=0, block_size=32)],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", wt.min_opset)], ir_version=11)
    ref = ReferenceEvaluator(model).run(None, {})[0]
    ours = dequantize_blocks(q, scale, zp, 0, 32)
    np.testing.assert_allclose(ref, ours, rtol=1e-6, atol=1e-7)
    # blocks run along K: each block's error is bounded by its own scale
    step = np.abs(np.repeat(scale, 32, axis=0))
    err = np.abs(ours - w)
    bound = step * (1.0 if not wt.is_float else wt.qmax / 2) + 1e-6  # 1 step: +qmax saturation
    assert (err <= bound).all()


def test_round_half_to_even_and_saturation() -> None:
    wt = WEIGHT_TYPES["int4"]
    # block extremum -8 → scale 1: 2.5 → 2, 3.5 → 4, -0.5 → 0; 7.6 → 8 saturates to 7
    w = np.array([[-8.0], [2.5], [3.5], [-0.5], [7.6], [1.5], [0.0], [7.0]] * 2, np.float32)
    q, scale, _ = quantize_blocks(w, wt, 0, 16, True)
    assert scale.item() == 1.0
    assert q[:8, 0].astype(np.int8).tolist() == [-8, 2, 4, 0, 7, 2, 0, 7]
    # the signed extremum maps exactly to qmin (scale may be negative)
    q, scale, _ = quantize_blocks(np.array([[4.0], [-1.0]], np.float32), wt, 0, 2, True)
    assert scale.item() == pytest.approx(-0.5) and q.astype(np.int8).ravel().tolist() == [-8, 2]
    # fp8 saturates at 448 and rounds to nearest even
    q8, s8, _ = quantize_blocks(
        np.array([[448.0], [-448.0], [17.0]], np.float32), WEIGHT_TYPES["float8e4m3fn"], 0, 3, True
    )
    assert s8.item() == 1.0 and q8.astype(np.float32).ravel().tolist() == [448.0, -448.0, 16.0]
    q4, _, _ = quantize_blocks(
        np.array([[6.0], [2.5], [5.0]], np.float32), WEIGHT_TYPES["float4e2m1"], 0, 3, True
    )
    assert q4.astype(np.float32).ravel().tolist() == [6.0, 2.0, 4.0]


# --- end to end on tiny models -------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _outputs(path, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize(
    ("config", "min_cos", "max_size"),
    [
        (QuantConfig.weight_only("int4", 32), 0.98, 0.30),
        (QuantConfig.weight_only("int4", 32, weight_format="matmul_nbits"), 0.98, 0.30),
        (QuantConfig.weight_only("uint4", 32), 0.98, 0.30),
        (QuantConfig.weight_only("int8", None), 0.999, 0.40),
        (QuantConfig.weight_only("float8e4m3fn", 32), 0.995, 0.40),
        (QuantConfig.weight_only("int2", 32), 0.75, 0.25),
        (QuantConfig.weight_only(codebook=Codebook("nf4", 32)), 0.98, 0.30),
        (QuantConfig.weight_only(codebook=Codebook("log", 32)), 0.95, 0.30),
        (QuantConfig.weight_only(codebook=Codebook("kmeans", None, bits=6, vector_size=2)), 0.95, 0.30),
    ],
    ids=["int4", "int4-nbits", "uint4", "int8-channel", "fp8", "int2", "nf4", "log", "kmeans-vq"],
)
def test_end_to_end_tiny(tmp_path, name, config, min_cos, max_size) -> None:
    import models

    fp32 = models.build(name)
    feeds = models.sample_inputs(name, 2)
    out = tmp_path / "wo.onnx"
    result = onnxq.quantize(fp32, config=config, output=out, progress=False)  # no calibration data
    s = result.summary
    assert not s.float_nodes, s.float_nodes
    assert s.quantized_nodes.get("Gather", 0) >= 1 and s.calibration_samples == 0
    assert s.size_after / s.size_before <= max_size
    for ref, got in zip(_outputs(fp32, feeds), _outputs(out, feeds), strict=True):
        assert _cosine(ref, got) >= min_cos


def test_ort_fuses_blocked_dq_into_matmulnbits(tmp_path) -> None:
    import models

    fp32 = models.build("tiny-llama")
    out = tmp_path / "wo.onnx"
    onnxq.quantize(fp32, config=QuantConfig.weight_only("int4", 32), output=out, progress=False)
    written = onnx.load(str(out))
    assert (
        sum(
            n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
            for n in written.graph.node
        )
        >= 15
    )
    assert not any(n.domain == "com.microsoft" for n in written.graph.node)  # standard ONNX only
    feeds = models.sample_inputs("tiny-llama", 1)
    fused = _outputs(out, feeds, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 15  # every MatMul weight (lm_head included)
    unfused = _outputs(out, feeds, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert _cosine(fused[0], unfused[0]) > 0.999


def test_tied_embedding_stored_once(tmp_path) -> None:
    import models

    fp32 = models.build("tiny-gpt2")  # transformer.wte.weight: Gather + Transpose → MatMul (lm_head)
    for fmt in ("dequantize_linear", "matmul_nbits"):
        out = tmp_path / f"{fmt}.onnx"
        onnxq.quantize(
            fp32, config=QuantConfig.weight_only("int4", 32, weight_format=fmt), output=out, progress=False
        )
        model = onnx.load(str(out))
        inits = {i.name: i for i in model.graph.initializer}
        assert "transformer.wte.weight" not in inits
        packed = [n for n in inits if n.startswith("transformer.wte.weight_packed")]
        assert len(packed) == 1 and tuple(inits[packed[0]].dims) == (1000, 32)  # [V, H/2] bytes
        readers = {n.op_type for n in model.graph.node if packed[0] in n.input}
        assert readers >= {"Gather"} and len(readers) == 2, (
            readers
        )  # Gather + (Cast | Reshape for MatMulNBits)
        float_big = [
            i
            for i in model.graph.initializer
            if i.data_type == TensorProto.FLOAT and np.prod(i.dims) >= 64000
        ]
        assert not float_big


def test_codebook_runs_on_cpu_and_matches_numpy(tmp_path) -> None:
    w = _weight(128, 64)
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    for spec in (
        Codebook("nf4", 32),
        Codebook("log", 64, bits=3),
        Codebook("kmeans", None, bits=4),
        Codebook("kmeans", None, 8, 4),
    ):
        out = tmp_path / "cb.onnx"
        onnxq.quantize(
            matmul_model(w), config=QuantConfig.weight_only(codebook=spec), output=out, progress=False
        )
        decoded = cb.encode(w, spec, 0).decode(w.shape)
        y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ decoded, rtol=1e-4, atol=1e-4)
        assert _cosine(decoded, w) > 0.9
        types = {i.data_type for i in onnx.load(str(out)).graph.initializer if np.prod(i.dims) > 1024}
        assert types <= {TensorProto.UINT4, TensorProto.UINT8}, types


def test_fp4_runs_in_onnx_reference(tmp_path) -> None:
    """ORT 1.32's CPU EP has no DequantizeLinear-23 kernel for FLOAT4E2M1: checked with onnx.reference."""
    w = _weight(64, 16)
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    out = tmp_path / "fp4.onnx"
    onnxq.quantize(
        matmul_model(w), config=QuantConfig.weight_only("float4e2m1", 32), output=out, progress=False
    )
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 23
    q, s, _ = quantize_blocks(w, WEIGHT_TYPES["float4e2m1"], 0, 32, True)
    y = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize_blocks(q, s, None, 0, 32), rtol=1e-4, atol=1e-4)
    assert q.dtype == ml_dtypes.float4_e2m1fn


def test_config_json_round_trip_and_errors() -> None:
    from onnxq.errors import ConfigError

    for c in (
        QuantConfig.weight_only(),
        QuantConfig(
            activations=None, weights=QuantSpec("uint4", False, PerBlock(64)), weight_format="matmul_nbits"
        ),
        QuantConfig.weight_only(codebook=Codebook("kmeans", None, 8, 2)),
    ):
        assert QuantConfig.from_json(c.to_json()) == c
    assert QuantConfig.weight_only().smoothing is None
    with pytest.raises(ConfigError, match="weight-only"):
        QuantConfig(weights=QuantSpec("int4", True, PerBlock(32)))
    with pytest.raises(ConfigError):
        PerBlock(1)
    with pytest.raises(ConfigError):
        Codebook("nf4", bits=3)


def test_streaming_holds_about_one_weight(tmp_path) -> None:
    """Eight file-backed 4 MB weights: numpy allocations peak near one weight, not eight."""
    k, n, layers = 1024, 1024, 8
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}"))
        inits.append(
            numpy_helper.from_array((rng.standard_normal((k, n)) * 0.03).astype(np.float32), f"w{i}")
        )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, [1, n])],
        inits,
    )
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    one = k * n * 4
    tracemalloc.start()
    try:
        onnxq.quantize(
            path, config=QuantConfig.weight_only("int4", 128), output=tmp_path / "q.onnx", progress=False
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3.0 * one, f"peak {peak / 1e6:.1f} MB for {layers} weights of {one / 1e6:.1f} MB"


def test_quantized_weights_wait_for_the_save_in_a_file_not_in_memory(
    model_path, tmp_path, monkeypatch
) -> None:
    """With an output path, each quantized weight goes to a private spill file as it is made; the
    saved bytes are those of the in-memory route, the result's weights then read from the saved file,
    and no spill file is left behind."""
    import onnx_ir as ir

    from onnxq.model_io import save_model
    from onnxq.passes import weight_only

    monkeypatch.setattr(weight_only.SpillFile, "MIN_BYTES", 0)  # spill every tensor of the tiny model
    config = QuantConfig.weight_only("int4", 32)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    result = onnxq.quantize(model_path("tiny-llama"), config=config, output=out, progress=False)
    in_memory = onnxq.quantize(model_path("tiny-llama"), config=config, progress=False)
    save_model(in_memory.model, tmp_path / "reference.onnx")
    assert out.read_bytes() == (tmp_path / "reference.onnx").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    external = [
        v.const_value
        for v in result.model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]
    assert external and all(t.path == str(out.resolve()) for t in external)
    assert all(t.numpy() is not None for t in external)  # still readable from the saved file
