"""Target presets: config resolution, the QDQ structure each runtime needs, and QNN-HTP for real.

``qnn`` runs in HTP's emulator (``onnxruntime-qnn``) and must place every kernel on the QNN EP;
``tensorrt`` and ``openvino`` have no runtime here, so their structure is checked and the models
run on the CPU EP to check accuracy.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import models
import onnxq
from onnxq import QuantConfig
from onnxq.config import PRESETS, TARGETS, PerChannel, PerTensor, QuantSpec, SmoothQuant
from onnxq.errors import ConfigError
from onnxq.plan import COMPUTE_OPS
from tests.helpers import get_attr, make_model, run, tensor_info

QDQ = {"QuantizeLinear", "DequantizeLinear"}


# --- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_target_alone_gives_its_preset_and_round_trips(target) -> None:
    config = QuantConfig(target=target)
    preset = PRESETS[target]
    assert (config.activations, config.weights, config.smoothing, config.activation_matmuls) == (
        preset.activations,
        preset.weights,
        preset.smoothing,
        preset.activation_matmuls,
    )
    assert QuantConfig.for_target(target) == config
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_json(config.to_json()) == config
    assert QuantConfig.from_dict({"target": target}) == config


def test_presets_hold_what_each_runtime_needs() -> None:
    qnn, trt, ov = (QuantConfig(target=t) for t in ("qnn", "tensorrt", "openvino"))
    assert (qnn.activations.dtype, qnn.weights.dtype, qnn.smoothing) == ("uint16", "int8", None)
    assert trt.activations == QuantSpec("int8", True, PerTensor())
    assert trt.weights == QuantSpec("int8", True, PerChannel())
    assert ov.activations == QuantSpec("uint8", False, PerTensor())
    assert ov.weights == QuantSpec("int8", True, PerChannel())
    assert QuantConfig() == QuantConfig(target="cpu")
    assert QuantConfig().activations == QuantSpec("uint8", False, PerTensor())
    assert QuantConfig().smoothing == SmoothQuant()


def test_explicit_values_win_over_the_preset() -> None:
    a8 = QuantSpec("uint8", False, PerTensor())
    config = QuantConfig.for_target("qnn", activations=a8, smoothing=SmoothQuant(alpha=0.5))
    assert config.activations == a8 and config.smoothing == SmoothQuant(alpha=0.5)
    assert config.weights == PRESETS["qnn"].weights
    assert QuantConfig(target="cpu", smoothing=None).smoothing is None
    assert QuantConfig.from_dict({"target": "qnn", "smoothing": {"alpha": 0.5}}).smoothing == SmoothQuant(0.5)
    assert QuantConfig.from_dict({"target": "tensorrt", "smoothing": None}).smoothing is None
    round_trip = QuantConfig.from_dict(json.loads(config.to_json()))
    assert round_trip == config


def test_changing_target_moves_preset_values_and_keeps_explicit_ones() -> None:
    moved = QuantConfig().with_changes(target="qnn")
    assert moved == QuantConfig(target="qnn")
    a8 = QuantSpec("uint8", True, PerTensor())
    kept = QuantConfig(activations=a8).with_changes(target="qnn")
    assert kept.activations == a8 and kept.weights == PRESETS["qnn"].weights
    assert QuantConfig().with_changes(target="tensorrt", smoothing=None).smoothing is None


def test_attention_matmuls_are_float_on_cpu_only() -> None:
    """The cpu preset keeps activation x activation MatMuls float and says why in the plan; the other
    targets, and cpu with ``activation_matmuls=True``, quantize both inputs."""
    assert QuantConfig().activation_matmuls is False
    assert all(QuantConfig(target=t).activation_matmuls for t in ("qnn", "tensorrt", "openvino"))
    assert QuantConfig().with_changes(target="openvino").activation_matmuls is True
    assert QuantConfig(activation_matmuls=True).with_changes(target="qnn").activation_matmuls is True
    with pytest.raises(ConfigError, match="activation_matmuls must be true or false"):
        QuantConfig(activation_matmuls="yes")  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("MatMul", ["a", "w"], ["q"], name="proj"),
            helper.make_node("MatMul", ["q", "b"], ["y"], name="qk"),
        ],
        [tensor_info("a", shape=[4, 8]), tensor_info("b", shape=[8, 4])],
        [tensor_info("y", shape=[4, 4])],
        {"w": rng.normal(size=(8, 8)).astype(np.float32)},
    )
    data = [
        {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": rng.normal(size=(8, 4)).astype(np.float32)}
    ]
    default = onnxq.quantize(model, data * 4, progress=False).summary
    assert [(f.name, f.reason) for f in default.float_nodes if f.name == "qk"] == [
        ("qk", "activation x activation MatMul (attention): float on this target (activation_matmuls)")
    ]
    quantized = onnxq.quantize(model, data * 4, config=QuantConfig(activation_matmuls=True), progress=False)
    assert quantized.summary.quantized_nodes["MatMul"] == 2 and default.quantized_nodes["MatMul"] == 1


def test_unknown_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="supported targets: cpu, qnn, tensorrt, openvino"):
        QuantConfig(target="npu")  # type: ignore[arg-type]


# --- structure helpers ------------------------------------------------------------------------------
def _nodes(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _float_values(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    typed = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    floats = {v.name for v in typed if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return floats | {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}


def assert_every_op_in_qdq(model: onnx.ModelProto) -> None:
    """QNN form: every float input of a non-QDQ op comes from a DequantizeLinear, every float output
    feeds QuantizeLinear only, and the model outputs come from DequantizeLinear."""
    producers, consumers = _nodes(model)
    floats = _float_values(model)
    for node in model.graph.node:
        if node.op_type in QDQ:
            continue
        for name in node.input:
            if name in floats:
                producer = producers.get(name)
                assert producer is not None and producer.op_type == "DequantizeLinear", (node.name, name)
        for name in node.output:
            if name in floats:
                users = consumers.get(name, [])
                assert users and all(u.op_type == "QuantizeLinear" for u in users), (node.name, name)
    for out in model.graph.output:
        assert producers[out.name].op_type == "DequantizeLinear"


def assert_compute_inputs_only(model: onnx.ModelProto, act_dtype: int, act_symmetric: bool) -> None:
    """TensorRT/OpenVINO form: each DequantizeLinear feeds input 0 or 1 of Conv/MatMul/Gemm only,
    each QuantizeLinear feeds DequantizeLinears only, weights are int8 with zero point 0 (per
    channel for 2-D and larger weights), activations ``act_dtype``, biases float."""
    _, consumers = _nodes(model)
    inits = _inits(model)
    n_dq = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert all(u.op_type == "DequantizeLinear" for u in consumers[node.output[0]])
            zp = inits[node.input[2]]
            assert zp.dtype == onnx.helper.tensor_dtype_to_np_dtype(act_dtype)
            if act_symmetric:
                assert not zp.any()
        if node.op_type != "DequantizeLinear":
            continue
        n_dq += 1
        for user in consumers[node.output[0]]:
            assert user.op_type in COMPUTE_OPS, user.op_type
            assert list(user.input).index(node.output[0]) in (0, 1)
        zp = inits[node.input[2]]
        if node.input[0] in inits:  # a weight
            weight = inits[node.input[0]]
            assert weight.dtype == np.int8 and not zp.any()
            if weight.ndim >= 2:
                assert zp.size == inits[node.input[1]].size > 1
    assert n_dq
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32


# --- a tiny model ----------------------------------------------------------------------------------
def tiny_model() -> onnx.ModelProto:
    """Conv → Relu → MaxPool → Flatten → Gemm → Sigmoid, batch dimension symbolic."""
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1),
            helper.make_node("Sigmoid", ["y"], ["out"]),
        ],
        [tensor_info("x", shape=["batch", 1, 4, 4])],
        [tensor_info("out", shape=["batch", 3])],
        {
            "w": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
            "g": rng.normal(size=(3, 16)).astype(np.float32),
            "gb": rng.normal(size=3).astype(np.float32),
        },
        opset=13,
    )


def _tiny_data(n: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(size=(1, 1, 4, 4)).astype(np.float32) for _ in range(n)]


def _quantize(model, data, target: str, path: Path, **changes) -> onnxq.QuantizationResult:
    config = QuantConfig.for_target(target, **changes)
    return onnxq.quantize(model, data, config=config, output=path, progress=False)


def test_tiny_qnn_is_all_qdq_static_with_fixed_sigmoid_scale(tmp_path) -> None:
    result = _quantize(tiny_model(), _tiny_data(), "qnn", tmp_path / "q.onnx")
    model = onnx.load(result.output_path)
    assert_every_op_in_qdq(model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 4, 4]
    assert any("static shapes" in note for note in result.summary.notes)
    producers, consumers = _nodes(model)
    inits = _inits(model)
    (sig,) = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    (q,) = consumers[sig.output[0]]
    assert inits[q.input[1]] == np.float32(1 / 65536) and inits[q.input[2]] == np.uint16(0)
    (pool,) = [n for n in model.graph.node if n.op_type == "MaxPool"]  # no clean-up of its pair
    assert producers[pool.input[0]].op_type == "DequantizeLinear"
    assert result.summary.fidelity[0].cosine > 0.999


@pytest.mark.parametrize(("target", "act"), [("tensorrt", TensorProto.INT8), ("openvino", TensorProto.UINT8)])
def test_tiny_compute_input_targets(tmp_path, target, act) -> None:
    result = _quantize(tiny_model(), _tiny_data(), target, tmp_path / "q.onnx")
    model = onnx.load(result.output_path)
    assert_compute_inputs_only(model, act, act_symmetric=target == "tensorrt")
    ops = {n.op_type for n in model.graph.node}
    assert {"Relu", "MaxPool", "Sigmoid"} <= ops
    assert result.summary.fidelity[0].cosine > 0.999
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # shapes stay dynamic


# --- QNN-HTP emulator -------------------------------------------------------------------------------
_QNN_REGISTERED = False


def qnn_session(path: Path, offload_io: bool):
    """An ORT session on QNN-HTP with profiling on (skips when onnxruntime-qnn is missing)."""
    global _QNN_REGISTERED
    ort = pytest.importorskip("onnxruntime")
    plugin = pytest.importorskip("onnxruntime_qnn")
    if not _QNN_REGISTERED:
        try:
            ort.register_execution_provider_library("QNNExecutionProvider", plugin.get_library_path())
        except Exception as exc:  # registered already by another module of this process
            if "already" not in str(exc).lower():
                raise
        _QNN_REGISTERED = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        pytest.skip("no QNN device (HTP emulator) available")
    so = ort.SessionOptions()
    options = {"backend_path": plugin.get_qnn_htp_path()}
    if not offload_io:
        options["offload_graph_io_quantization"] = "0"
    so.add_provider_for_devices(devices, options)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "qnn")
    return ort.InferenceSession(str(path), so)


def run_profiled(session, feeds: list[dict]) -> tuple[list[np.ndarray], dict[str, list[tuple[str, str]]]]:
    """Outputs of ``session`` for ``feeds`` and the kernels of the first run per provider."""
    outputs = [session.run(None, f)[0] for f in feeds]
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["name"] not in seen:
            seen.add(e["name"])
            args = e.get("args", {})
            kernels.setdefault(args.get("provider"), []).append((args.get("op_name"), e["name"]))
    return outputs, kernels


def _cpu_ops(kernels) -> list[str]:
    return sorted(op for op, _ in kernels.get("CPUExecutionProvider", []))


def _built(name: str) -> Path:
    if not models.is_built(name):
        pytest.skip(f"{name} is not built (python -m models build {name})")
    return models.model_dir(name) / "model.onnx"


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from models.digits import digits_split

    return digits_split()


@pytest.fixture(scope="module")
def cnn_qnn(tmp_path_factory, digits):
    x_train = digits[0]
    path = tmp_path_factory.mktemp("cnn") / "cnn.qnn.onnx"
    return _quantize(_built("cnn-digits"), [x_train[i : i + 1] for i in range(32)], "qnn", path)


def test_cnn_qnn_runs_entirely_on_htp(cnn_qnn, digits) -> None:
    model = onnx.load(cnn_qnn.output_path)
    assert_every_op_in_qdq(model)
    x_test = digits[2]
    name = model.graph.input[0].name
    feeds = [{name: x_test[i : i + 1]} for i in range(64)]
    ort = pytest.importorskip("onnxruntime")
    fp32 = ort.InferenceSession(str(_built("cnn-digits")), providers=["CPUExecutionProvider"])
    reference = np.concatenate([fp32.run(None, f)[0] for f in feeds])
    # ORT's default: the Q of the model input and the DQ of its output run on the CPU (by design,
    # offload_graph_io_quantization); everything else is one HTP partition.
    outputs, kernels = run_profiled(qnn_session(cnn_qnn.output_path, offload_io=True), feeds[:4])
    assert _cpu_ops(kernels) == ["DequantizeLinear", "QuantizeLinear"]
    assert len(kernels["QNNExecutionProvider"]) == 1
    # Without that offload, nothing at all runs on the CPU.
    outputs, kernels = run_profiled(qnn_session(cnn_qnn.output_path, offload_io=False), feeds)
    assert _cpu_ops(kernels) == []
    logits = np.concatenate(outputs)
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    assert agreement >= 0.98, agreement


@pytest.mark.parametrize(("target", "act"), [("tensorrt", TensorProto.INT8), ("openvino", TensorProto.UINT8)])
def test_cnn_compute_input_targets_stay_accurate(tmp_path, digits, target, act) -> None:
    x_train, _, x_test, y_test = digits
    path = tmp_path / f"cnn.{target}.onnx"
    _quantize(_built("cnn-digits"), [x_train[i : i + 1] for i in range(32)], target, path)
    assert_compute_inputs_only(onnx.load(path), act, act_symmetric=target == "tensorrt")
    from models.digits import onnx_top1

    assert onnx_top1(path, x_test, y_test) >= onnx_top1(_built("cnn-digits"), x_test, y_test) - 0.01


# --- the real MiniLM --------------------------------------------------------------------------------
SEQ = 64


@pytest.fixture(scope="module")
def minilm():
    path = _built("minilm-real")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, local_files_only=True)
    texts = list(models.inputs.vader_sentences())
    return path, tokenizer, texts[:16], texts[-3:]


def _feeds(tokenizer, texts) -> list[dict[str, np.ndarray]]:
    return [
        dict(tokenizer([t], max_length=SEQ, padding="max_length", truncation=True, return_tensors="np"))
        for t in texts
    ]


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return ((hidden * m).sum(1) / m.sum(1)).ravel()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_minilm_qnn_runs_entirely_on_htp_and_stays_accurate(tmp_path, minilm) -> None:
    path, tokenizer, calib, held_out = minilm
    data = onnxq.data.from_texts(tokenizer, calib, max_length=SEQ, padding="max_length")
    result = _quantize(path, data, "qnn", tmp_path / "minilm.qnn.onnx", fidelity=False)
    notes = "\n".join(result.summary.notes)
    assert "static shapes" in notes and "mask sentinels" in notes and "Gelu" in notes
    model = onnx.load(result.output_path, load_external_data=False)
    assert {"Shape", "Erf"}.isdisjoint(n.op_type for n in model.graph.node)
    assert_every_op_in_qdq(model)
    feeds = _feeds(tokenizer, held_out)
    ort = pytest.importorskip("onnxruntime")
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs, kernels = run_profiled(qnn_session(result.output_path, offload_io=False), feeds)
    assert _cpu_ops(kernels) == []
    assert len(kernels["QNNExecutionProvider"]) == 1
    for feed, out in zip(feeds, outputs, strict=True):
        mask = feed["attention_mask"]
        cosine = _cosine(_pooled(out, mask), _pooled(fp32.run(None, feed)[0], mask))
        assert cosine >= 0.99, cosine


@pytest.mark.parametrize(("target", "act"), [("tensorrt", TensorProto.INT8), ("openvino", TensorProto.UINT8)])
def test_minilm_compute_input_targets(tmp_path, minilm, target, act) -> None:
    path, tokenizer, calib, _ = minilm
    data = onnxq.data.from_texts(tokenizer, calib[:8])
    result = _quantize(path, data, target, tmp_path / f"minilm.{target}.onnx")
    model = onnx.load(result.output_path, load_external_data=False)
    assert_compute_inputs_only(model, act, act_symmetric=target == "tensorrt")
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    producers, _ = _nodes(model)
    assert all(producers[n.input[0]].op_type == "DequantizeLinear" for n in matmuls)
    assert result.summary.fidelity[0].cosine > 0.99


def _linear_3d(opset: int) -> onnx.ModelProto:
    """A static-shape Linear layer on a 3-D input: ORT's CPU EP turns it into Reshape → Gemm."""
    rng = np.random.default_rng(3)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        [tensor_info("x", shape=[1, 8, 16])],
        [tensor_info("y", shape=[1, 8, 32])],
        {"w": rng.normal(size=(16, 32)).astype(np.float32), "b": rng.normal(size=32).astype(np.float32)},
        opset=opset,
    )


@pytest.mark.parametrize("opset", [17, 21, 22])
def test_int8_activations_at_any_opset_load_on_the_cpu_ep(tmp_path, opset) -> None:
    """int8 activation pairs at opset >= 21 carry output_dtype instead of a zero point of 0: ORT's
    CPU EP cannot load the same model with the zero point (its S8->U8 rewrite of a moved pair)."""
    model = _linear_3d(opset)
    rng = np.random.default_rng(4)
    data = [rng.normal(size=(1, 8, 16)).astype(np.float32) for _ in range(8)]
    result = _quantize(model, data, "tensorrt", tmp_path / "q.onnx")
    quantized = onnx.load(result.output_path)
    q = next(n for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    dqs = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
    if opset >= 21:
        assert len(q.input) == 2 and get_attr(q, "output_dtype") == TensorProto.INT8
        assert dqs and all(len(dq.input) == 2 for dq in dqs)
        assert not any(i.name.startswith("x_zero_point") for i in quantized.graph.initializer)
    else:
        assert len(q.input) == 3 and _inits(quantized)[q.input[2]].dtype == np.int8
    x = data[0] * 0.9  # inside the calibrated range
    (expected,) = run(model, {"x": x})
    (got,) = run(quantized, {"x": x})  # ORT's default (full) optimizations
    assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()
    assert result.summary.fidelity[0].cosine > 0.999


def test_a_model_ort_cannot_run_is_an_error_and_nothing_is_written(tmp_path, monkeypatch) -> None:
    from onnxq import pipeline

    def refusing_opener(folder):
        def open_session(data, prepack):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node (n) Op (QuantizeLinear) refused.")

        return open_session

    monkeypatch.setattr(pipeline, "segment_opener", refusing_opener)  # the fidelity check's sessions
    output = tmp_path / "q.onnx"
    with pytest.raises(
        onnxq.QuantizationError, match=r"CPU EP cannot run the quantized model .*nothing was written"
    ):
        _quantize(_linear_3d(17), [np.ones((1, 8, 16), np.float32)], "cpu", output)
    assert list(tmp_path.iterdir()) == []


# --- the passes the qnn target adds -----------------------------------------------------------------
def test_static_target_rejects_samples_of_another_shape(tmp_path) -> None:
    data = [*_tiny_data(2), np.zeros((2, 1, 4, 4), np.float32)]
    with pytest.raises(onnxq.CalibrationDataError, match="padding='max_length'"):
        _quantize(tiny_model(), data, "qnn", tmp_path / "q.onnx")


@pytest.mark.parametrize("form", ["div_then_x_then_half", "mul_then_half_then_x", "half_x_first"])
def test_fuse_gelu_replaces_erf_gelu_exactly(form) -> None:
    ort = pytest.importorskip("onnxruntime")
    import onnx_ir as ir

    from onnxq.passes.fuse_gelu import FuseGelu

    scale = {"div_then_x_then_half": ("Div", np.float32(np.sqrt(2)))}.get(
        form, ("Mul", np.float32(1 / np.sqrt(2)))
    )
    nodes = [
        helper.make_node(scale[0], ["x", "c"], ["s"]),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
    ]
    if form == "div_then_x_then_half":
        nodes += [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    elif form == "mul_then_half_then_x":
        nodes += [helper.make_node("Mul", ["a", "half"], ["m"]), helper.make_node("Mul", ["m", "x"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "half"], ["h"]), helper.make_node("Mul", ["h", "a"], ["y"])]
    proto = make_model(
        nodes,
        [tensor_info("x", shape=[2, 8])],
        [tensor_info("y", shape=[2, 8])],
        {"c": scale[1], "one": np.float32(1.0), "half": np.float32(0.5)},
    )
    model = ir.from_proto(proto)
    fuse = FuseGelu()
    assert fuse(model).modified and fuse.fused == 1
    assert [n.op_type for n in model.graph] == ["Gelu"]
    fused = ir.to_proto(model)
    x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32) * 3
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(fused.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert fused.graph.output[0].name == "y"


def test_finite_mask_replaces_only_sentinels() -> None:
    import onnx_ir as ir

    from onnxq.passes.finite_mask import FiniteMaskSentinels

    low = np.finfo(np.float32).min
    proto = make_model(
        [helper.make_node("Where", ["m", "big", "x"], ["y"])],
        [tensor_info("m", TensorProto.BOOL, [4]), tensor_info("x", shape=[4])],
        [tensor_info("y", shape=[4])],
        {"big": np.array([low, 3.0, np.inf, -2e9], np.float32)},
    )
    model = ir.from_proto(proto)
    mask = FiniteMaskSentinels(1e4)
    assert mask(model).modified and mask.replaced == ["big"]
    np.testing.assert_array_equal(
        model.graph.initializers["big"].const_value.numpy(), np.array([-1e4, 3.0, 1e4, -1e4], np.float32)
    )
