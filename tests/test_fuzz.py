"""Fuzzing: random valid graphs of the ops onnxq handles, random configs and data.

Every case must end in one of two ways: an :class:`onnxq.OnnxqError` (a clear answer), or a model
that passes ``onnx.checker``'s full check and runs on ONNX Runtime's CPU EP with the same input.
Any other exception is a bug. CI runs ``ONNXQ_FUZZ_EXAMPLES`` cases (default 150); ``tools/fuzz.py``
runs 10,000.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import onnxq
from models.merged import BRANCH_INPUT, branch_feed
from onnxq.config import Codebook, Dynamic, PerTensor, QuantConfig, QuantSpec
from tests.fuzz_graphs import graphs

EXAMPLES = int(os.environ.get("ONNXQ_FUZZ_EXAMPLES", "150"))
# The test suite's run is reproducible (the same 150 cases every time); tools/fuzz.py sets
# ONNXQ_FUZZ_EXAMPLES and a --hypothesis-seed of its own to explore further.
DERANDOMIZE = "ONNXQ_FUZZ_EXAMPLES" not in os.environ


@st.composite
def configs(draw) -> QuantConfig:
    """Static configs for every target, dynamic ones, and weight-only ones of every weight type."""
    kind = draw(st.sampled_from(["static", "static", "static", "dynamic", "weight-only"]))
    if kind == "dynamic":
        return QuantConfig(target=draw(st.sampled_from(["cpu", "openvino"])), calibration=Dynamic())
    if kind == "weight-only":
        if draw(st.integers(0, 4)) == 0:
            return QuantConfig.weight_only(codebook=Codebook(draw(st.sampled_from(["nf4", "log", "kmeans"]))))
        dtype = draw(st.sampled_from(["int8", "int4", "uint4", "int2", "float8e4m3fn"]))
        block = draw(st.sampled_from([None, 2, 4, 32]))
        return QuantConfig.weight_only(
            dtype, block, weight_format=draw(st.sampled_from(["dequantize_linear", "matmul_nbits"]))
        )
    config = QuantConfig(target=draw(st.sampled_from(["cpu", "cpu", "qnn", "tensorrt", "openvino"])))
    if draw(st.booleans()):
        config = config.with_changes(weights=QuantSpec("int8", True, PerTensor()))
    if draw(st.integers(0, 3)) == 0:
        config = config.with_changes(exclude_op_types=(draw(st.sampled_from(["MatMul", "Conv", "Add"])),))
    if draw(st.integers(0, 3)) == 0:
        config = config.with_changes(smoothing=None)
    return config


@settings(
    max_examples=EXAMPLES,
    derandomize=DERANDOMIZE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(case=graphs(), config=configs(), poison=st.integers(0, 19), samples=st.integers(1, 3))
def test_onnxq_answers_every_graph(case, config, poison, samples, tmp_path_factory) -> None:
    model, x = case
    onnx.checker.check_model(model, full_check=True)  # the generator only builds valid models
    branched = any(i.name == BRANCH_INPUT for i in model.graph.input)
    feeds = [{"x": x * (i + 1)} for i in range(samples)]
    if branched:
        feeds = [branch_feed(feed, i) for i, feed in enumerate(feeds)]
    if poison == 0:
        feeds[0]["x"] = np.full_like(x, np.nan)
    folder = tmp_path_factory.mktemp("fuzz")
    output = folder / "model.quant.onnx"
    # Kept for reproducing a failure: the input model, its data and the config.
    onnx.save(model, str(folder / "model.onnx"))
    np.savez(folder / "feeds.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    (folder / "config.json").write_text(config.to_json())
    try:
        onnxq.quantize(model, feeds, config=config, output=output, progress=False)
    except onnxq.OnnxqError as exc:
        event(f"refused: {type(exc).__name__}: {str(exc)[:60]}")
        assert not output.exists()
        return
    event("quantized")
    assert poison != 0, "NaN calibration data must be refused"
    onnx.checker.check_model(str(output), full_check=True)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (out, *_) = session.run(None, branch_feed({"x": x}, 0) if branched else {"x": x})
    assert out is not None
