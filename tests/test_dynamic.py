"""Dynamic quantization: ``QuantConfig(calibration=Dynamic())`` (``onnxq.passes.dynamic``)."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import models
import onnxq
from onnxq.config import (
    Dynamic,
    MinMax,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
)
from onnxq.errors import CalibrationDataError, ConfigError
from onnxq.openvino import DEFAULT_VENV, ENV_VAR
from onnxq.passes.dynamic import ATTENTION_REASON, CONV_REASON
from tests.helpers import make_model, tensor_info

DYNAMIC = QuantConfig(calibration=Dynamic())


def _ops(model: onnx.ModelProto | str) -> collections.Counter:
    model = onnx.load(model) if isinstance(model, str | os.PathLike) else model
    return collections.Counter(n.op_type for n in model.graph.node)


def _optimized_ops(path, tmp_path) -> collections.Counter:
    """Op types of the graph ORT's CPU EP actually runs (all optimisations, saved after fusion)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _ops(str(tmp_path / "optimized.onnx"))


def _outputs(path, feeds: list[dict]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pooled_cosine(ref: list[np.ndarray], got: list[np.ndarray], feeds: list[dict]) -> float:
    """Mean cosine of mean-pooled (over real tokens) sentence embeddings, as sentence-transformers pools."""
    values = []
    for a, b, f in zip(ref, got, feeds, strict=True):
        keep = f["attention_mask"].astype(bool)
        values.append(_cosine(a[keep].mean(0), b[keep].mean(0)))
    return float(np.mean(values))


# --- the ORT CPU form ---------------------------------------------------------------------------------
def test_no_data_needed_and_ort_fuses_the_pattern(model_path, tmp_path) -> None:
    out = tmp_path / "model.dyn.onnx"
    result = onnxq.quantize(model_path("tiny-bert"), config=DYNAMIC, output=out, progress=False)
    summary = result.summary
    assert summary.dynamic and summary.calibration_samples == 0 and summary.fidelity == ()
    assert "calibration: dynamic" in summary.to_text()
    assert summary.quantized_nodes == {"Gather": 3, "MatMul": 12}
    assert {(f.op_type, f.reason) for f in summary.float_nodes} == {("MatMul", ATTENTION_REASON)}
    written = _ops(str(out))
    assert written["DynamicQuantizeLinear"] == 8 and written["MatMulInteger"] == 12
    assert written["QuantizeLinear"] == 0
    fused = _optimized_ops(out, tmp_path)
    assert fused["DynamicQuantizeMatMul"] > 0 and fused["MatMulIntegerToFloat"] > 0
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 12
    assert fused["MatMulInteger"] == 0  # every one fused: no unfused integer MatMul, Cast and Mul left


def test_data_is_used_for_fidelity_only_and_validated(model_path, calib_feeds, tmp_path) -> None:
    feeds = calib_feeds("tiny-bert", 4)
    out = tmp_path / "model.dyn.onnx"
    result = onnxq.quantize(model_path("tiny-bert"), feeds, config=DYNAMIC, output=out, progress=False)
    assert result.summary.calibration_samples == 4 and result.summary.fidelity_samples == 4
    assert result.summary.fidelity[0].cosine > 0.9999
    assert "4 samples used for the fidelity check only" in result.summary.to_text()
    bad = [{k: v.astype(np.float32) for k, v in feeds[0].items()}]
    with pytest.raises(CalibrationDataError, match="astype"):
        onnxq.quantize(model_path("tiny-bert"), bad, config=DYNAMIC, progress=False)


def test_without_data_a_static_config_still_needs_it(model_path) -> None:
    with pytest.raises(CalibrationDataError, match=r"needs calibration data.*Dynamic\(\)"):
        onnxq.quantize(model_path("tiny-bert"), progress=False)


def test_real_minilm_fidelity(tmp_path) -> None:
    """On the real all-MiniLM-L6-v2 with real text: sentence embeddings within 0.99 cosine of fp32, and
    at least as close as ORT's ``quantize_dynamic`` with its defaults (per-tensor weights)."""
    if not models.is_built("minilm-real"):
        pytest.skip("minilm-real is not built (python -m models build minilm-real)")
    from onnxruntime.quantization import quantize_dynamic

    fp32 = models.model_dir("minilm-real") / "model.onnx"
    feeds = models.sample_inputs("minilm-real", 8, seed=5)
    out = tmp_path / "model.dyn.onnx"
    result = onnxq.quantize(fp32, feeds[:4], config=DYNAMIC, output=out, progress=False)
    assert result.summary.fidelity[0].cosine > 0.98  # per token, real positions
    ref, got = _outputs(fp32, feeds), _outputs(out, feeds)
    pooled = _pooled_cosine(ref, got, feeds)
    assert pooled >= 0.99
    ort_out = tmp_path / "model.ort.onnx"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # ORT's quantizer may leave files in the working directory
    try:
        quantize_dynamic(fp32, ort_out)
    finally:
        os.chdir(cwd)
    assert pooled >= _pooled_cosine(ref, _outputs(ort_out, feeds), feeds)
    assert out.stat().st_size < 0.3 * fp32.stat().st_size


def _gemm_model(trans_b: int, alpha: float, beta: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 24) if trans_b else (24, 16)).astype(np.float32)
    c = rng.normal(size=(16,)).astype(np.float32)
    node = helper.make_node(
        "Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta
    )
    return make_model(
        [node], [tensor_info("x", shape=[4, 24])], [tensor_info("y", shape=[4, 16])], {"w": w, "c": c}
    )


@pytest.mark.parametrize("target", ["cpu", "openvino"])
@pytest.mark.parametrize(("trans_b", "alpha", "beta"), [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_becomes_the_dynamic_form(target, trans_b, alpha, beta, tmp_path) -> None:
    model = _gemm_model(trans_b, alpha, beta)
    x = np.random.default_rng(1).normal(size=(4, 24)).astype(np.float32)
    out = tmp_path / "gemm.onnx"
    config = QuantConfig(target=target, calibration=Dynamic())
    result = onnxq.quantize(model, [{"x": x}], config=config, output=out, progress=False)
    assert result.summary.quantized_nodes == {"Gemm": 1}
    assert _ops(str(out))["Gemm"] == 0
    assert result.summary.fidelity[0].sqnr_db > 30


# --- the dynamic QDQ form (openvino) -----------------------------------------------------------------
def test_dynamic_qdq_form_passes_the_checker_and_runs_on_cpu(model_path, calib_feeds, tmp_path) -> None:
    feeds = calib_feeds("tiny-bert", 2)
    out = tmp_path / "model.ov.onnx"
    config = QuantConfig(target="openvino", calibration=Dynamic())
    result = onnxq.quantize(model_path("tiny-bert"), feeds, config=config, output=out, progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    ops = _ops(str(out))
    assert ops["DynamicQuantizeLinear"] == 8 and ops["MatMulInteger"] == 0
    assert ops["DequantizeLinear"] == 8 + 12  # activations, weights
    assert ops["Cast"] >= 3  # the 3 embedding tables: integer rows gathered, cast, scaled per row
    assert result.summary.fidelity[0].cosine > 0.9999
    assert _outputs(out, feeds)[0].shape == _outputs(model_path("tiny-bert"), feeds)[0].shape


def test_openvino_ep_runs_the_dynamic_qdq_form_whole(model_path, calib_feeds, tmp_path) -> None:
    if not (os.environ.get(ENV_VAR) or DEFAULT_VENV.exists()):
        pytest.skip("no OpenVINO environment (make providers)")
    feeds = calib_feeds("tiny-bert", 2)
    out = tmp_path / "model.ov.onnx"
    config = QuantConfig(target="openvino", calibration=Dynamic())
    onnxq.quantize(model_path("tiny-bert"), config=config, output=out, progress=False)
    report = onnxq.validate(
        model_path("tiny-bert"), [out], feeds, providers="openvino", timed=False, progress=False
    )
    row = next(r for r in report.rows if r.role == "candidate")
    assert row.status == "ok", row.reason
    assert row.placement.fallback == () and set(row.placement.kernels) == {"OpenVINOExecutionProvider"}


# --- what stays float --------------------------------------------------------------------------------
def test_conv_stays_float(model_path) -> None:
    result = onnxq.quantize(model_path("cnn-digits"), config=DYNAMIC, progress=False)
    reasons = {f.reason for f in result.summary.float_nodes if f.op_type == "Conv"}
    assert reasons == {CONV_REASON}
    assert "ConvInteger" not in {n.op_type for n in result.model.graph}


def test_mask_sentinels_and_integer_positions_stay_float() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["mask", "neg"], ["bias"], name="mask_mul"),
        helper.make_node("Add", ["x", "bias"], ["masked"], name="mask_add"),
        helper.make_node("MatMul", ["masked", "w"], ["y"], name="masked_matmul"),
        helper.make_node("Cast", ["pos"], ["posf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["posf", "w"], ["z"], name="position_matmul"),
        helper.make_node("MatMul", ["x", "w"], ["u"], name="plain_matmul"),
    ]
    model = make_model(
        nodes,
        [
            tensor_info("x", shape=[2, 8]),
            tensor_info("mask", shape=[2, 8]),
            tensor_info("pos", TensorProto.INT64, [2, 8]),
        ],
        [tensor_info(n, shape=[2, 8]) for n in ("y", "z", "u")],
        {"w": w, "neg": np.array(np.finfo(np.float32).min, np.float32)},
    )
    summary = onnxq.quantize(model, config=DYNAMIC, progress=False).summary
    reasons = {f.name: f.reason for f in summary.float_nodes}
    assert "sentinel" in reasons["masked_matmul"]
    assert "integers" in reasons["position_matmul"]
    assert summary.quantized_nodes == {"MatMul": 1}


# --- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["cpu", "openvino"])
def test_json_round_trip(target, tmp_path) -> None:
    config = QuantConfig(target=target, calibration=Dynamic(), exclude_nodes=("*/layer.0/*",))
    assert config.activations == QuantSpec("uint8", False, PerTensor()) and config.smoothing is None
    assert QuantConfig.from_json(config.to_json(tmp_path / "q.json")) == config
    assert QuantConfig.from_json(tmp_path / "q.json").calibration == Dynamic()
    static = config.with_changes(calibration=MinMax())  # back to static: the target's preset again
    assert static == QuantConfig(target=target, exclude_nodes=("*/layer.0/*",))
    assert static.with_changes(calibration=Dynamic()) == config


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"target": "qnn"}, "calibrate statically"),
        ({"target": "tensorrt"}, "calibrate statically"),
        ({"activations": QuantSpec("int8", True)}, "leave activations unset"),
        ({"weights": QuantSpec("int16", True)}, "weights=QuantSpec('int8'"),
        ({"smoothing": SmoothQuant()}, "smoothing=None"),
    ],
)
def test_bad_combinations_name_the_fix(kwargs, fix) -> None:
    with pytest.raises(ConfigError, match=fix.replace("(", r"\(")):
        QuantConfig(calibration=Dynamic(), **kwargs)


def test_bad_per_tensor_and_axis_settings_name_the_fix(model_path) -> None:
    with pytest.raises(ConfigError, match=r"QuantConfig\(calibration=Dynamic\(\)\)"):
        QuantSpec(calibration=Dynamic())
    config = QuantConfig(calibration=Dynamic(), weights=QuantSpec("int8", True, PerChannel(axis=0)))
    with pytest.raises(ConfigError, match=r"use PerChannel\(\) or PerTensor\(\)"):
        onnxq.quantize(model_path("tiny-bert"), config=config, progress=False)
