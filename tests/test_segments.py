"""Calibration segment by segment (``onnxq.segments``): a model cut into many segments calibrates to
the ranges, per-channel statistics and fp32 outputs of the whole graph, also when the activations
crossing the cuts spill to disk and when a subgraph reads outer-scope values across a cut.

Bounds: segments run the same kernels on the same inputs; ONNX Runtime may fuse differently at a
cut (a LayerNorm or GELU whose pieces land in two segments), so values are compared to 1e-4
relative, measured at < 2e-6 on the models below.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxq import segments
from onnxq.calibrate import calibrate
from onnxq.config import MinMax, Percentile, QuantConfig
from onnxq.passes.smooth import find_candidates
from onnxq.pipeline import prepare
from onnxq.plan import Planner
from tests.helpers import make_model, run, tensor_info


def _calibrate(model: ir.Model, samples, method, segment_bytes: int):
    plan = Planner(QuantConfig(activation_matmuls=True)).plan(model)  # attention's tensors too
    specs = {name: plan.activations[name].spec for name in plan.calibration_tensors()}
    candidates = find_candidates(model, plan)
    result = calibrate(
        model, specs, iter(samples), method, progress=False, channels=candidates, segment_bytes=segment_bytes
    )
    return result, candidates


@pytest.mark.parametrize(("name", "method"), [("tiny-gpt2", MinMax()), ("tiny-bert", Percentile())])
def test_segmented_calibration_matches_whole_graph(model_path, calib_feeds, name, method, monkeypatch):
    model, _ = prepare(str(model_path(name)))
    samples = calib_feeds(name, 6)
    whole, candidates = _calibrate(model, samples, method, segment_bytes=2**40)
    # ~10 KB of weights a segment cuts these models into many pieces; no memory for the cut
    # activations sends every one of them through the spill file.
    monkeypatch.setattr(segments, "STORE_BYTES", 0)
    proto = ir.serde.serialize_model(model)
    cut = segments.split(proto.graph, 10_000)
    assert len(cut) >= 5
    assert sorted(i for s in cut for i in s.nodes) == list(range(len(proto.graph.node)))
    parts, _ = _calibrate(model, samples, method, segment_bytes=10_000)

    assert parts.samples_seen == whole.samples_seen == 6
    assert whole.ranges.keys() == parts.ranges.keys() and len(whole.ranges) > 10
    for tensor, (lo, hi) in whole.ranges.items():
        np.testing.assert_allclose(parts.ranges[tensor], (lo, hi), rtol=1e-4, atol=1e-6, err_msg=tensor)
    assert candidates and parts.channels.keys() == whole.channels.keys()
    for tensor, stats in whole.channels.items():
        np.testing.assert_allclose(parts.channels[tensor].absmax(), stats.absmax(), rtol=1e-4, atol=1e-6)
        assert parts.channels[tensor].rows == stats.rows
    assert len(parts.kept_outputs) == len(whole.kept_outputs) == 6
    for got, want in zip(parts.kept_outputs, whole.kept_outputs, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # calibration leaves the model as it found it
    assert not [n for n in model.graph if n.name.startswith("onnxq_")]


def test_subgraph_reads_outer_scope_values_across_a_cut():
    """``If`` branches read ``h`` (made two segments earlier) and ``W2`` from the outer scope."""
    rng = np.random.default_rng(0)
    w = {f"W{i}": rng.normal(size=(64, 64)).astype(np.float32) for i in (1, 2, 3)}
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W2"], ["t"], name="then_mm")], "then", [], [tensor_info("t")]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["e"], name="else_relu")], "else", [], [tensor_info("e")]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W3"], ["g"], name="mm3"),
        helper.make_node(
            "If", ["flag"], ["b"], name="branch", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Add", ["b", "g"], ["y"], name="add"),
    ]
    proto = make_model(
        nodes,
        [tensor_info("x", shape=[4, 64]), tensor_info("flag", TensorProto.BOOL, [])],
        [tensor_info("y", shape=[4, 64])],
        w,
    )
    cut = segments.split(proto.graph, 64 * 64 * 4)
    assert len(cut) == 3 and "h" in cut[2].inputs  # the If runs after mm3's segment and reads h
    samples = [{"x": rng.normal(size=(4, 64)).astype(np.float32), "flag": np.array(f)} for f in (True, False)]
    model = ir.from_proto(proto)
    spec = Planner(QuantConfig()).plan(model).activations
    result = calibrate(
        model, {n: a.spec for n, a in spec.items()}, iter(samples), MinMax(), progress=False, segment_bytes=1
    )
    for sample, kept in zip(samples, result.kept_outputs, strict=True):
        np.testing.assert_allclose(kept["y"], run(proto, sample)[0], rtol=1e-5, atol=1e-5)


def test_activation_store_spills_to_an_anonymous_file():
    store = segments.ActivationStore(budget=100)
    small, big = np.arange(10, dtype=np.float32), np.arange(1000, dtype=np.float64).reshape(10, 100)
    store.put(0, "a", small)
    store.put(0, "b", big)
    assert store.held == small.nbytes and (0, "b") in store.spilled
    np.testing.assert_array_equal(store.get(0, "b"), big)
    store.drop(["b"])
    assert not store.spilled and store.get(0, "a") is small
    store.close()
    assert store.file is None and not store.memory


def test_tensor_bytes_reads_headers_only():
    external = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1000, 1000])
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="w.bin")
    external.external_data.add(key="length", value="4000000")
    assert segments.tensor_bytes(external) == 4_000_000
    inline = helper.make_tensor(
        "b", TensorProto.FLOAT16, [3, 5], np.zeros(15, np.float16).tobytes(), raw=True
    )
    assert segments.tensor_bytes(inline) == 30


def test_segmented_and_spilled_quantization_writes_the_same_model(
    model_path, calib_feeds, tmp_path, monkeypatch
):
    """A model quantized with tiny segments (calibration and the fidelity check) and every new weight
    spilled to disk gives the bytes and the fidelity of the in-memory run, and leaves no spill behind."""
    import onnxq
    from onnxq import pipeline

    source, feeds = model_path("tiny-llama"), calib_feeds("tiny-llama", 8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = onnxq.quantize(source, feeds, output=tmp_path / "a" / "q.onnx", progress=False)
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 20_000)
    monkeypatch.setattr(segments, "STORE_BYTES", 0)
    monkeypatch.setattr(pipeline, "SPILL_ABOVE_BYTES", 0)
    monkeypatch.setattr("onnxq.passes._util.SpillFile.MIN_BYTES", 1)
    parts = onnxq.quantize(source, feeds, output=tmp_path / "b" / "q.onnx", progress=False)
    assert (tmp_path / "a" / "q.onnx").read_bytes() == (tmp_path / "b" / "q.onnx").read_bytes()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["q.onnx"]
    assert len(parts.summary.fidelity) == len(whole.summary.fidelity) > 0
    for got, want in zip(parts.summary.fidelity, whole.summary.fidelity, strict=True):
        assert got.name == want.name
        assert got.cosine == pytest.approx(want.cosine, abs=1e-4)


def test_runner_types_cut_values_the_graph_leaves_untyped(model_path, calib_feeds):
    """A graph without value_info (as a rewrite may leave it) still runs in segments: the cut values
    get the element type of the arrays the first sample produced."""
    import onnxruntime as ort

    proto = onnx.load(str(model_path("tiny-gpt2")))
    del proto.graph.value_info[:]
    feeds = calib_feeds("tiny-gpt2", 3)
    whole = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = segments.SegmentRunner(
        proto, lambda data, _: ort.InferenceSession(data, providers=["CPUExecutionProvider"]), budget=10_000
    )
    assert runner.count >= 5
    got: dict[int, dict[str, np.ndarray]] = {}
    for index, outputs in runner.run(feeds):
        got.setdefault(index, {}).update(outputs)
    names = [o.name for o in proto.graph.output]
    for index, feed in enumerate(feeds):
        for name, want in zip(names, whole.run(names, feed), strict=True):
            np.testing.assert_allclose(got[index][name], want, rtol=1e-4, atol=1e-5)


def test_weight_dequantization_is_copied_into_its_readers_segment(model_path, calib_feeds, tmp_path):
    """A quantized model lists every weight's DequantizeLinear first; cutting it must not carry
    dequantized weights across cuts: each segment recomputes the ones it reads."""
    import onnxruntime as ort

    import onnxq
    from onnxq import model_io

    out = tmp_path / "q.onnx"
    onnxq.quantize(model_path("tiny-llama"), calib_feeds("tiny-llama", 4), output=out, progress=False)
    proto = model_io.read_graph(out)
    cut = segments.split(proto.graph, 10_000)
    assert len(cut) >= 5
    weights = {t.name for t in proto.graph.initializer}
    from_weights = {
        o
        for node in proto.graph.node
        if node.input and all(i in weights for i in node.input)
        for o in node.output
    }
    assert from_weights and not from_weights & {n for s in cut for n in s.inputs}
    placed = [i for s in cut for i in s.nodes]
    matmuls = [i for i, node in enumerate(proto.graph.node) if node.op_type == "MatMul"]
    assert matmuls and all(placed.count(i) == 1 for i in matmuls)  # computed once, never copied
    folder = str(tmp_path)

    def open_session(data: bytes, prepack: bool):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    feeds = calib_feeds("tiny-llama", 2)
    got: dict[int, dict[str, np.ndarray]] = {}
    for index, outputs in segments.SegmentRunner(proto, open_session, budget=10_000).run(feeds):
        got.setdefault(index, {}).update(outputs)
    whole = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in proto.graph.output]
    for index, feed in enumerate(feeds):
        for name, want in zip(names, whole.run(names, feed), strict=True):
            np.testing.assert_allclose(got[index][name], want, rtol=1e-3, atol=1e-3, err_msg=name)


def test_unwritable_output_folder_is_refused_before_spilling(model_path, calib_feeds, tmp_path, monkeypatch):
    """Where new weights would spill beside the output, an unwritable folder is an OutputError that
    names it (checked through os.access: this suite may run as root, which ignores permissions)."""
    import os

    import onnxq
    from onnxq import pipeline
    from onnxq.errors import OutputError

    monkeypatch.setattr(pipeline, "SPILL_ABOVE_BYTES", 0)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode)
    )
    with pytest.raises(OutputError, match="is not writable; choose another output path"):
        onnxq.quantize(
            model_path("tiny-bert"), calib_feeds("tiny-bert", 2), output=tmp_path / "q.onnx", progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_a_full_temporary_disk_is_an_output_error(monkeypatch):
    """Spilling cut activations to a full disk names the folder and the fix, not an OSError."""
    import errno

    from onnxq.errors import OutputError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments.tempfile, "TemporaryFile", full)
    store = segments.ActivationStore(budget=0)
    with pytest.raises(OutputError, match="No space left on device; free space there or point TMPDIR"):
        store.put(0, "x", np.ones(8, np.float32))
    store.close()
