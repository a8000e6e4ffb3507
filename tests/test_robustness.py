"""Hostile and unlucky inputs: external data that leaves the model folder, truncated weight files,
calibration files that declare huge arrays, a process killed while saving, parallel runs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.cli import main

CNN = "cnn-digits"


@pytest.fixture
def external(model_path, tmp_path) -> Path:
    """The digits CNN saved with every weight in one external file ``weights.bin``."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx.load(str(model_path(CNN)))
    onnx.save(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    return folder / "model.onnx"


def _relocate(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def _feeds(calib_feeds) -> list[dict]:
    return calib_feeds(CNN, 4)


def test_external_data_round_trip(external, calib_feeds, tmp_path) -> None:
    result = onnxq.quantize(external, _feeds(calib_feeds), output=tmp_path / "q.onnx", progress=False)
    assert result.summary.fidelity[0].cosine > 0.99


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(where, external, calib_feeds, tmp_path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes((external.parent / "weights.bin").read_bytes())
    if where == "absolute":
        _relocate(external, str(outside))
    elif where == "parent":
        _relocate(external, "../outside.bin")
    else:
        (external.parent / "link.bin").symlink_to(outside)
        _relocate(external, "link.bin")
    with pytest.raises(onnxq.ModelLoadError, match="outside the model folder"):
        onnxq.quantize(external, _feeds(calib_feeds), output=tmp_path / "q.onnx", progress=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.concatenate([f["input"] for f in _feeds(calib_feeds)]))
    assert main(["quantize", str(external), "--calib", str(calib), "-o", str(tmp_path / "q.onnx")]) == 2


def test_missing_and_truncated_external_data(external, calib_feeds, tmp_path) -> None:
    weights = external.parent / "weights.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(onnxq.ModelLoadError, match="truncated"):
        onnxq.quantize(external, _feeds(calib_feeds), output=tmp_path / "q.onnx", progress=False)
    weights.unlink()
    with pytest.raises(onnxq.ModelLoadError, match="is missing"):
        onnxq.quantize(external, _feeds(calib_feeds), output=tmp_path / "q.onnx", progress=False)


def test_calibration_file_declaring_huge_arrays_is_refused_before_allocating(model_path, tmp_path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1, 8, 8)}
    )
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("input.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(onnxq.CalibrationDataError, match=r"declares .* GiB"):
        onnxq.quantize(model_path(CNN), str(bomb), output=tmp_path / "q.onnx", progress=False)


def test_pickled_calibration_file_is_refused(model_path, tmp_path) -> None:
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(onnxq.CalibrationDataError, match="allow_pickle"):
        onnxq.quantize(model_path(CNN), pickled, output=tmp_path / "q.onnx", progress=False)


def _quantize_cmd(model: Path, calib: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "onnxq",
        "quantize",
        str(model),
        "--calib",
        str(calib),
        "-o",
        str(output),
        "--quiet",
    ]


def test_eight_parallel_runs_into_one_folder(model_path, calib_feeds, tmp_path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.concatenate([f["input"] for f in calib_feeds(CNN, 8)]))
    out = tmp_path / "out"
    out.mkdir()
    # Four runs to their own files, four to the same file: all succeed, every file is complete.
    targets = [out / f"q{i}.onnx" for i in range(4)] + [out / "shared.onnx"] * 4
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            _quantize_cmd(model_path(CNN), calib, t),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for t in targets
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert sorted(p.name for p in out.iterdir()) == [
        "q0.onnx",
        "q1.onnx",
        "q2.onnx",
        "q3.onnx",
        "shared.onnx",
    ]
    reference = (out / "q0.onnx").read_bytes()
    for path in out.iterdir():
        assert path.read_bytes() == reference  # deterministic, and never half written
        onnx.checker.check_model(str(path), full_check=True)


def test_killed_during_save_leaves_the_old_file_or_none(model_path, calib_feeds, tmp_path) -> None:
    """SIGKILL at several moments of a run over an existing file: the target is always either the old
    file or the complete new one, never a partial write."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.concatenate([f["input"] for f in calib_feeds(CNN, 8)]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    expected = tmp_path / "expected.onnx"
    subprocess.run(_quantize_cmd(model_path(CNN), calib, expected), env=env, check=True, capture_output=True)
    new = expected.read_bytes()
    old = model_path(CNN).read_bytes()
    target = tmp_path / "q.onnx"
    seen = set()
    for delay in (0.3, 0.8, 1.3, 1.8, 2.3, 2.8, 3.5):
        target.write_bytes(old)
        proc = subprocess.Popen(
            _quantize_cmd(model_path(CNN), calib, target),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        content = target.read_bytes()
        assert content in (old, new), f"partial file after a kill at {delay} s"
        seen.add(content == new)
    assert False in seen  # at least one kill landed before the rename (the test exercised something)


def _conv_mlp(opset: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(opset)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(4 * 8 * 8, 10)).astype(np.float32), "G"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "G"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 13 else 10
    return model


@pytest.mark.parametrize("opset", [9, 10, 11, 13, 17, 21, 23, 25, 27])
def test_opsets_9_to_27_quantize_and_old_ones_are_upgraded(opset, tmp_path) -> None:
    from onnxq.passes.upgrade_opset import runtime_runs_qdq

    if not runtime_runs_qdq(max(opset, 13)):  # older models are upgraded to 13 first
        pytest.skip(f"this onnxruntime has no QuantizeLinear at opset {opset}")
    feeds = [{"x": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    result = onnxq.quantize(_conv_mlp(opset), feeds, output=tmp_path / "q.onnx", progress=False)
    assert result.summary.opset_upgraded_from == (opset if opset < 13 else None)
    assert result.summary.quantized_nodes == {"Conv": 1, "MatMul": 1, "Reshape": 1}
    assert result.summary.fidelity[0].cosine > 0.999


def test_opset_newer_than_the_runtime_is_refused_with_the_fix(monkeypatch, tmp_path) -> None:
    from onnxq.passes import upgrade_opset

    monkeypatch.setattr(upgrade_opset, "runtime_runs_qdq", lambda opset: opset < 21)
    feeds = [{"x": np.zeros((1, 3, 8, 8), np.float32)}]
    with pytest.raises(onnxq.QuantizationError, match=r"newer than onnxruntime .* upgrade onnxruntime"):
        onnxq.quantize(_conv_mlp(21), feeds, output=tmp_path / "q.onnx", progress=False)
    assert not (tmp_path / "q.onnx").exists()


# --- subgraphs ------------------------------------------------------------------------------------


def _if_model(path: Path) -> list[dict[str, np.ndarray]]:
    """``y = If(flag, then: x @ W1, else: x @ W2)`` with both weights in the outer graph."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model, tensor_info

    rng = np.random.default_rng(0)
    weights = {f"W{i}": rng.normal(size=(64, 64)).astype(np.float32) for i in (1, 2)}
    branches = {
        key: helper.make_graph(
            [helper.make_node("MatMul", ["x", w], [out], name=f"{key}_mm")],
            key,
            [],
            [tensor_info(out, shape=[4, 64])],
        )
        for key, w, out in (("then_branch", "W1", "t"), ("else_branch", "W2", "e"))
    }
    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], name="branch", **branches)],
        [tensor_info("x", shape=[4, 64]), tensor_info("flag", TensorProto.BOOL, [])],
        [tensor_info("y", shape=[4, 64])],
        weights,
    )
    onnx.save(model, path)
    return [
        {"x": rng.normal(size=(4, 64)).astype(np.float32), "flag": np.array(i % 2 == 0)} for i in range(4)
    ]


@pytest.mark.parametrize(
    "config",
    [
        onnxq.QuantConfig(),
        onnxq.QuantConfig(calibration=onnxq.Dynamic()),
        onnxq.QuantConfig.weight_only("int4", 32),
        onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.GPTQ()),
        onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.AWQ()),
        onnxq.QuantConfig.weight_only(codebook=onnxq.Codebook("nf4")),
    ],
    ids=["static", "dynamic", "rtn", "gptq", "awq", "nf4"],
)
def test_weights_read_inside_subgraphs(config, tmp_path) -> None:
    """Every config quantizes the MatMuls inside the branches: static ones with ranges calibrated
    inside each branch (the int8 weights stay in the main graph), dynamic and weight-only ones with
    the outer weights they read going into each branch as integers (GPTQ/AWQ fall back to
    round-to-nearest there: the branch activations cannot be fetched)."""
    import onnxruntime as ort

    feeds = _if_model(tmp_path / "if.onnx")
    result = onnxq.quantize(
        tmp_path / "if.onnx", feeds, config=config, output=tmp_path / "q.onnx", progress=False
    )
    fp32 = ort.InferenceSession(str(tmp_path / "if.onnx"), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    written = onnx.load(str(tmp_path / "q.onnx"))
    static = config.activations is not None and config.calibration != onnxq.Dynamic()
    dynamic = config.activations is not None and not static
    assert not result.summary.float_nodes
    assert result.summary.quantized_nodes == {"MatMul": 2}
    assert not {"W1", "W2"} & {t.name for t in written.graph.initializer}  # no float copy kept
    branches = [a.g for a in next(n for n in written.graph.node if n.op_type == "If").attribute]
    ops = (
        ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
        if static
        else ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
        if dynamic
        else ["MatMul"]  # a codebook weight is decoded once in the main graph, before the If
        if isinstance(config.weights, onnxq.Codebook)
        else ["DequantizeLinear", "MatMul"]
    )
    assert all([n.op_type for n in g.node] == ops for g in branches)
    bound = 0.05 if static or dynamic else 0.15  # int8 / int4 blocks of 32 on N(0, 1) weights
    for feed in feeds:
        want, got = fp32.run(None, feed)[0], quant.run(None, feed)[0]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound
