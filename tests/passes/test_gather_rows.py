"""Embedding tables with one scale per row (``onnxq.passes.gather_rows``).

What is asserted:

- the real MiniLM's tables lose 12-24 dB of SQNR when quantized per tensor instead of per row;
- the rewrite of ``DequantizeLinear(table, axis=0) → Gather`` into a gather of integer rows and
  their scales gives ONNX Runtime's outputs bit for bit (symmetric, and with zero points), keeps the
  output names, and leaves no DequantizeLinear of the whole table;
- a per-row DequantizeLinear with any other reader is left alone;
- on the real all-MiniLM-L6-v2 (8 calibration samples, 16 held out), the default static config
  quantizes its three tables per row: the summary's fidelity is cosine 0.99899 (0.99726 with the
  tables per tensor through ``overrides``; the test asks for >= 0.998 and 0.001 more than per
  tensor), the held-out mean-pooled cosine is higher too (0.98857 vs 0.98662), and the file grows
  by the row scales only (23.26 vs 23.13 MB; asked: < 1 %).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
import onnxq
from onnxq import qmath
from onnxq.passes.gather_rows import GatherRows

V, H = 12, 6
TABLES = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
)


def _table_model(zero_points: bool, extra_reader: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    if zero_points:
        q = rng.integers(0, 256, (V, H)).astype(np.uint8)
        zp = rng.integers(100, 156, V).astype(np.uint8)
    else:
        q = rng.integers(-127, 128, (V, H)).astype(np.int8)
        zp = None
    scale = (rng.uniform(0.5, 2.0, V) * 10.0 ** rng.integers(-3, 1, V)).astype(np.float32)
    inits = [numpy_helper.from_array(q, "table_q"), numpy_helper.from_array(scale, "table_scale")]
    dq_inputs = ["table_q", "table_scale"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "table_zp"))
        dq_inputs.append("table_zp")
    nodes = [
        helper.make_node("DequantizeLinear", dq_inputs, ["table"], name="dq", axis=0),
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="g1", axis=0),
        helper.make_node("Gather", ["table", "ids2"], ["rows2"], name="g2", axis=0),
    ]
    outputs = [
        helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["b", "s", H]),
        helper.make_tensor_value_info("rows2", TensorProto.FLOAT, ["n", H]),
    ]
    if extra_reader:
        nodes.append(helper.make_node("ReduceSum", ["table"], ["total"], name="sum", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes,
        "tables",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("ids2", TensorProto.INT64, ["n"]),
        ],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero-points"])
def test_rows_gathered_exactly(zero_points: bool) -> None:
    proto = _table_model(zero_points)
    feed = {"ids": np.array([[0, 3, 11, 3]], np.int64), "ids2": np.array([5, 0], np.int64)}
    before = _run(proto, feed)
    model = ir.serde.deserialize_model(proto)
    assert GatherRows()(model).modified
    after_proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(after_proto, full_check=True)
    ops = [n.op_type for n in after_proto.graph.node]
    assert "DequantizeLinear" not in ops and ops.count("Gather") == (6 if zero_points else 4)
    assert [o.name for o in after_proto.graph.output] == ["rows", "rows2"]
    after = _run(after_proto, feed)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_other_readers_keep_the_dequantized_table() -> None:
    model = ir.serde.deserialize_model(_table_model(False, extra_reader=True))
    assert not GatherRows()(model).modified
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == 1


def _sqnr_db(table: np.ndarray, axis: int | None) -> float:
    """SQNR of ``table`` quantized as onnxq stores weights (int8 symmetric), per tensor or per row."""
    lo, hi = qmath.channel_range(table, axis)
    scale, zp = qmath.scale_zero_point(lo, hi, qmath.int_type("int8"), True)
    back = qmath.dequantize(qmath.quantize(table, scale, zp, axis), scale, zp, axis)
    return float(10 * np.log10(np.sum(table.astype(np.float64) ** 2) / np.sum((back - table) ** 2.0)))


def test_real_minilm_tables_lose_15_to_30_db_per_tensor() -> None:
    """Why tables are quantized per row: all-MiniLM-L6-v2's position table keeps 15.2 dB of SQNR
    with one scale (one value of 1.87 sets the step of rows whose largest value is 0.06-0.17) and
    38.9 dB with one per row; its word table 27.4 dB and 42.8 dB (asked: < 20 / > 35 and < 30 /
    > 40)."""
    if not models.is_built("minilm-real"):
        pytest.skip("minilm-real is not built (python -m models build minilm-real)")
    model = onnx.load(str(models.model_dir("minilm-real") / "model.onnx"))
    tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in TABLES[:2]}
    position, word = tables[TABLES[1]], tables[TABLES[0]]
    assert _sqnr_db(position, None) < 20 and _sqnr_db(position, 0) > 35
    assert _sqnr_db(word, None) < 30 and _sqnr_db(word, 0) > 40


def _table_dequantizers(path: Path) -> list[str]:
    """DequantizeLinear nodes whose whole output a Gather reads (a table dequantized every call)."""
    model = onnx.load(str(path))
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in gathered]


def test_real_minilm_tables_per_row(tmp_path) -> None:
    if not models.is_built("minilm-real"):
        pytest.skip("minilm-real is not built (python -m models build minilm-real)")
    fp32 = models.model_dir("minilm-real") / "model.onnx"
    feeds = models.sample_inputs("minilm-real", 24, seed=5)
    calib, held_out = feeds[:8], feeds[8:]
    per_tensor = onnxq.QuantConfig().with_changes(
        overrides={t: onnxq.QuantSpec("int8", True, onnxq.PerTensor()) for t in TABLES}
    )
    results, pooled = {}, {}
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    ref = [session.run(None, f)[0] for f in held_out]
    for name, config in (("rows", onnxq.QuantConfig()), ("tensor", per_tensor)):
        out = tmp_path / f"{name}.onnx"
        results[name] = onnxq.quantize(fp32, calib, config=config, output=out, progress=False)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        values = []
        for f, a in zip(held_out, ref, strict=True):
            keep = f["attention_mask"].astype(bool)
            x = a[keep].mean(0).astype(np.float64)
            y = session.run(None, f)[0][keep].mean(0).astype(np.float64)
            values.append(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        pooled[name] = float(np.mean(values))
    rows, tensor = (results[k].summary.fidelity[0].cosine for k in ("rows", "tensor"))
    assert rows >= 0.998 and rows >= tensor + 0.001
    assert pooled["rows"] > pooled["tensor"]
    assert results["rows"].summary.quantized_nodes["Gather"] == 3
    assert _table_dequantizers(tmp_path / "rows.onnx") == []
    size = {k: (tmp_path / f"{k}.onnx").stat().st_size for k in ("rows", "tensor")}
    assert size["rows"] < 1.01 * size["tensor"]
