"""The promises of ``onnxq.quantize``: determinism, inputs untouched, no stray files, accepted forms."""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import models
import onnxq
from tests.helpers import make_model, tensor_info

CNN = "cnn-digits"
BERT = "tiny-bert"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cnn_images(n: int = 12) -> np.ndarray:
    _, _, x_test, _ = models.digits_split()
    return x_test[:n]


def _outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("name", [BERT, "tiny-gpt2", CNN])
def test_identical_inputs_give_identical_bytes(name, model_path, calib_feeds, tmp_path) -> None:
    feeds = calib_feeds(name, 8)
    a = onnxq.quantize(model_path(name), feeds, output=tmp_path / "a.onnx", progress=False)
    b = onnxq.quantize(model_path(name), feeds, output=tmp_path / "b.onnx", progress=False)
    assert a.output_path.read_bytes() == b.output_path.read_bytes()
    assert a.summary == b.summary


def test_same_bytes_from_path_proto_and_ir_model(model_path, calib_feeds, tmp_path) -> None:
    path = model_path(BERT)
    feeds = calib_feeds(BERT, 8)
    outputs = []
    for i, model in enumerate([path, onnx.load(str(path)), ir.load(str(path))]):
        result = onnxq.quantize(model, feeds, output=tmp_path / f"{i}.onnx", progress=False)
        outputs.append(result.output_path.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_input_file_is_not_modified(model_path, calib_feeds, tmp_path) -> None:
    src = model_path(BERT)
    copy = tmp_path / "in" / "model.onnx"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    before = _sha(copy)
    mtime = copy.stat().st_mtime_ns
    result = onnxq.quantize(copy, calib_feeds(BERT, 4), progress=False)
    assert _sha(copy) == before and copy.stat().st_mtime_ns == mtime
    # the default output sits beside the input and is the only new file
    assert result.output_path == copy.with_name("model.quant.onnx")
    assert sorted(p.name for p in copy.parent.iterdir()) == ["model.onnx", "model.quant.onnx"]


def test_ir_model_input_is_not_modified(model_path, calib_feeds) -> None:
    ir_model = ir.load(str(model_path(BERT)))
    ir_bytes = ir.to_proto(ir_model).SerializeToString()
    n_nodes = len(ir_model.graph)
    result = onnxq.quantize(ir_model, calib_feeds(BERT, 4), progress=False)
    assert result.output_path is None  # an in-memory model is not written by default
    assert result.model is not ir_model
    assert len(ir_model.graph) == n_nodes
    assert ir.to_proto(ir_model).SerializeToString() == ir_bytes


def test_model_proto_input_is_not_modified(model_path, calib_feeds) -> None:
    proto = onnx.load(str(model_path(BERT)))
    proto_bytes = proto.SerializeToString()
    result = onnxq.quantize(proto, calib_feeds(BERT, 4), progress=False)
    assert result.output_path is None
    assert proto.SerializeToString() == proto_bytes


def test_model_proto_with_constant_nodes_is_not_modified() -> None:
    w = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    proto = make_model(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)),
            helper.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        [tensor_info("x", shape=[2, 4])],
        [tensor_info("y", shape=[2, 4])],
        infer=False,
    )
    proto_bytes = proto.SerializeToString()
    onnxq.quantize(proto, [{"x": np.ones((2, 4), np.float32)}], progress=False)
    assert proto.graph.node[0].attribute[0].t.name == ""  # onnxq sets it to "W"
    assert proto.SerializeToString() == proto_bytes


def test_model_proto_input_keeps_graph_and_weights(model_path, calib_feeds) -> None:
    """Whatever else happens to the proto, its nodes and initializers are unchanged."""
    proto = onnx.load(str(model_path(BERT)))
    nodes = [(n.op_type, n.name, list(n.input), list(n.output)) for n in proto.graph.node]
    inits = [i.SerializeToString() for i in proto.graph.initializer]
    io = [proto.graph.input[:], proto.graph.output[:]]
    onnxq.quantize(proto, calib_feeds(BERT, 4), progress=False)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in proto.graph.node] == nodes
    assert [i.SerializeToString() for i in proto.graph.initializer] == inits
    assert [proto.graph.input[:], proto.graph.output[:]] == io


def test_calibration_data_is_not_modified(model_path, calib_feeds, tmp_path) -> None:
    feeds = calib_feeds(BERT, 4)
    copies = [{k: v.copy() for k, v in f.items()} for f in feeds]
    onnxq.quantize(model_path(BERT), feeds, output=tmp_path / "q.onnx", progress=False)
    for f, c in zip(feeds, copies, strict=True):
        assert f.keys() == c.keys()
        for k in f:
            np.testing.assert_array_equal(f[k], c[k])


def test_nothing_written_to_cwd_or_beside_output(model_path, calib_feeds, tmp_path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    out_dir = tmp_path / "out"
    cwd.mkdir()
    out_dir.mkdir()
    monkeypatch.chdir(cwd)
    for model in (model_path(BERT), onnx.load(str(model_path(BERT)))):
        result = onnxq.quantize(model, calib_feeds(BERT, 4), output=out_dir / "q.onnx", progress=False)
        assert result.output_path == out_dir / "q.onnx"
        assert list(cwd.iterdir()) == []
        assert [p.name for p in out_dir.iterdir()] == ["q.onnx"]  # no temporary files left
    # in memory, no output requested: nothing written anywhere
    onnxq.quantize(onnx.load(str(model_path(BERT))), calib_feeds(BERT, 4), progress=False)
    assert list(cwd.iterdir()) == []
    assert [p.name for p in out_dir.iterdir()] == ["q.onnx"]


def test_relative_output_path(model_path, calib_feeds, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = onnxq.quantize(model_path(CNN), calib_feeds(CNN, 4), output="q.onnx", progress=False)
    assert (tmp_path / "q.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    onnx.checker.check_model(str(result.output_path), full_check=True)


def test_failed_run_leaves_no_file(model_path, tmp_path) -> None:
    out = tmp_path / "q.onnx"
    with pytest.raises(onnxq.CalibrationDataError):
        onnxq.quantize(model_path(CNN), [{"wrong": np.zeros((1, 1, 8, 8), np.float32)}], output=out)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced(model_path, calib_feeds, tmp_path) -> None:
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old content")
    onnxq.quantize(model_path(CNN), calib_feeds(CNN, 4), output=out, progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]


# --- accepted forms of the model and of the calibration data --------------------------------------
def _reference(model_path, tmp_path, calib) -> Path:
    return onnxq.quantize(model_path(CNN), calib, output=tmp_path / "ref.onnx", progress=False).output_path


def test_model_folder_is_accepted(model_path, calib_feeds, tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(model_path(CNN).read_bytes())
    result = onnxq.quantize(folder, calib_feeds(CNN, 4), progress=False)
    assert result.output_path == folder / "model.quant.onnx"
    assert result.output_path.is_file()


@pytest.mark.parametrize("form", ["dicts", "generator", "array", "list_of_arrays", "npz", "npz_named"])
def test_calibration_forms(form: str, model_path, tmp_path) -> None:
    images = _cnn_images(12)
    per_sample = [images[i : i + 1] for i in range(len(images))]
    ref = _reference(model_path, tmp_path, [{"input": x} for x in per_sample])
    if form == "dicts":
        calib = [{"input": x} for x in per_sample]
    elif form == "generator":
        calib = ({"input": x} for x in per_sample)
    elif form == "array":
        calib = images  # one sample holding the whole batch: the same min/max
    elif form == "list_of_arrays":
        calib = per_sample
    elif form == "npz":
        calib = tmp_path / "calib.npz"
        np.savez(calib, images)  # a single unnamed array for the single input
    else:
        calib = tmp_path / "calib.npz"
        np.savez(calib, input=images)
    result = onnxq.quantize(model_path(CNN), calib, output=tmp_path / "q.onnx", progress=False)
    assert result.summary.calibration_samples == (1 if form == "array" else 12)
    # the same data in any form gives the same ranges, hence the same model
    assert result.output_path.read_bytes() == Path(ref).read_bytes()


def test_npz_as_string_path(model_path, tmp_path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, input=_cnn_images(5))
    result = onnxq.quantize(model_path(CNN), str(path), output=tmp_path / "q.onnx", progress=False)
    assert result.summary.calibration_samples == 5


def test_num_samples_limits_calibration(model_path, tmp_path) -> None:
    seen = []

    def gen():
        for i, x in enumerate(_cnn_images(20)):
            seen.append(i)
            yield {"input": x[None]}

    config = onnxq.QuantConfig(num_samples=5)
    result = onnxq.quantize(model_path(CNN), gen(), config=config, output=tmp_path / "q.onnx", progress=False)
    assert result.summary.calibration_samples == 5
    assert len(seen) <= 6  # the stream is not drained


def test_in_memory_result_matches_file(model_path, calib_feeds, tmp_path) -> None:
    feeds = calib_feeds(CNN, 8)
    on_disk = onnxq.quantize(model_path(CNN), feeds, output=tmp_path / "q.onnx", progress=False)
    in_memory = onnxq.quantize(onnx.load(str(model_path(CNN))), feeds, progress=False)
    assert in_memory.output_path is None
    feed = feeds[0]
    want = _outputs(on_disk.output_path, feed)[0]
    got = ort.InferenceSession(
        ir.to_proto(in_memory.model).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)


def test_config_without_fidelity(model_path, calib_feeds, tmp_path) -> None:
    config = onnxq.QuantConfig(fidelity=False)
    result = onnxq.quantize(
        model_path(CNN), calib_feeds(CNN, 4), config=config, output=tmp_path / "q.onnx", progress=False
    )
    assert result.summary.fidelity == () and result.summary.fidelity_samples == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_input_file_is_released(model_path, calib_feeds, tmp_path) -> None:
    """The input's weights are memory-mapped while quantizing; nothing stays open or mapped after."""
    src = tmp_path / "in.onnx"
    src.write_bytes(model_path(BERT).read_bytes())
    fds_before = len(os.listdir("/proc/self/fd"))
    result = onnxq.quantize(src, calib_feeds(BERT, 4), output=tmp_path / "q.onnx", progress=False)
    del result
    gc.collect()
    assert [line for line in Path("/proc/self/maps").read_text().splitlines() if str(src) in line] == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    src.unlink()  # nothing holds it


@pytest.mark.parametrize("weight_only", [False, True])
def test_nodes_out_of_topological_order_are_sorted_not_refused(weight_only, model_path, calib_feeds) -> None:
    """ONNX Runtime runs graphs whose nodes are out of order (its own float16 converter writes
    them); onnxq sorts a copy and quantizes it, and leaves the caller's proto as it was."""
    proto = onnx.load(str(model_path("tiny-bert")))
    nodes = list(proto.graph.node)
    shuffled = nodes[len(nodes) // 2 :] + nodes[: len(nodes) // 2]  # later half first: unsorted
    del proto.graph.node[:]
    proto.graph.node.extend(shuffled)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(proto)
    before = proto.SerializeToString()
    feeds = calib_feeds("tiny-bert", 8)
    config = onnxq.QuantConfig.weight_only("int4", 32) if weight_only else None
    result = onnxq.quantize(proto, feeds, config=config, progress=False)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    assert proto.SerializeToString() == before
    assert min(f.cosine for f in result.summary.fidelity) > 0.99
