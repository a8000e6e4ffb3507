"""GPTQ and AWQ weight-only quantization (onnxq.weight_algorithms, onnxq.gptq, onnxq.awq)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import models
import onnxq
from onnxq import AWQ, GPTQ, CalibrationDataError, ConfigError, QuantConfig
from onnxq.gptq import gptq_quantize
from onnxq.lowbit import WEIGHT_TYPES, dequantize_blocks, quantize_blocks
from onnxq.weight_stats import ActivationStats
from tests.helpers import counted, matmul_model


def _activations(rows: int = 512, k: int = 256, seed: int = 0) -> np.ndarray:
    """Correlated activations with a few outlier channels (what transformers' MatMuls read)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, rng.choice(k, 8, replace=False)] *= 12.0
    return x.astype(np.float32)


def _weight(k: int = 256, n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 0.05


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], optimized=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _rel_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    num = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(ref, got, strict=True))
    return num / sum(float(np.sum(a.astype(np.float64) ** 2)) for a in ref)


# --- the algorithms on one hand-built MatMul ------------------------------------------------------


@pytest.mark.parametrize(("dtype", "block"), [("int4", 64), ("int4", None), ("uint4", 32), ("int8", 128)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_calibration_output(dtype: str, block: int | None, act_order: bool) -> None:
    x, w = _activations(), _weight()
    wtype = WEIGHT_TYPES[dtype]
    sym = wtype.signed
    q, scale, zp = gptq_quantize(w, x.T.astype(np.float64) @ x, wtype, block, sym, GPTQ(act_order=act_order))
    rq, rscale, rzp = quantize_blocks(w, wtype, 0, block, sym)
    # exactly RTN's layout: same shapes and dtypes, so the weight-only pass emits the same nodes
    assert (q.shape, q.dtype, scale.shape, scale.dtype) == (rq.shape, rq.dtype, rscale.shape, rscale.dtype)
    assert (zp is None) == (rzp is None) and (zp is None or zp.shape == rzp.shape)
    err = np.sum((x @ w - x @ dequantize_blocks(q, scale, zp, 0, block)) ** 2)
    err_rtn = np.sum((x @ w - x @ dequantize_blocks(rq, rscale, rzp, 0, block)) ** 2)
    assert err < 0.8 * err_rtn, (err, err_rtn)


def test_gptq_handles_dead_inputs_and_ragged_blocks() -> None:
    x, w = _activations(k=200), _weight(k=200)
    x[:, :5] = 0.0  # channels never active: their rows are zeroed, H stays invertible
    q, scale, _ = gptq_quantize(w, x.T.astype(np.float64) @ x, WEIGHT_TYPES["int4"], 64, True, GPTQ())
    assert scale.shape == (4, 64) and np.all(np.asarray(q[:5], np.int8) == 0)


@pytest.mark.parametrize(
    "algorithm",
    [
        GPTQ(float_rows=0),
        GPTQ(act_order=False, clip_grid=0, float_rows=0),
        AWQ(float_rows=0),
        AWQ(clip=False, float_rows=0),
        AWQ(duo=True, float_rows=0),
        GPTQ(awq=AWQ(), float_rows=0),
    ],
)
def test_matmul_model_error_below_rtn(algorithm) -> None:
    x, w = _activations(rows=64 * 8), _weight()
    feeds = [{"x": x[i : i + 64]} for i in range(0, len(x), 64)]
    model = matmul_model(w)
    ref = _run(model, feeds)
    rtn = onnxq.quantize(model, config=QuantConfig.weight_only("int4", 64), progress=False)
    res = onnxq.quantize(
        model, feeds, config=QuantConfig.weight_only("int4", 64, algorithm=algorithm), progress=False
    )
    assert res.summary.calibration_samples == len(feeds)
    err = _rel_error(ref, _run(onnx.load_from_string(onnxq_bytes(res)), feeds))
    err_rtn = _rel_error(ref, _run(onnx.load_from_string(onnxq_bytes(rtn)), feeds))
    assert err < 0.9 * err_rtn, (err, err_rtn)
    ops = [n.op_type for n in res.model.graph]
    # X is a graph input: AWQ has no producer to fold into and inserts one Mul; GPTQ changes no node
    assert ops.count("Mul") == (0 if isinstance(algorithm, GPTQ) and algorithm.awq is None else 1)


@pytest.mark.parametrize(
    "algorithm",
    [GPTQ(), GPTQ(sequential=False), GPTQ(act_order=False, sequential=False), AWQ(), GPTQ(awq=AWQ())],
)
def test_float_rows_keep_the_outlier_channels_exact(algorithm) -> None:
    rng = np.random.default_rng(0)
    x, w = _activations(rows=64 * 8), _weight()
    outliers = np.sort(rng.choice(256, 8, replace=False))
    x[:, outliers] *= 30.0  # the 8 channels with by far the largest energy
    feeds = [{"x": x[i : i + 64]} for i in range(0, len(x), 64)]
    model = matmul_model(w)
    ref = _run(model, feeds)
    pure = dataclasses.replace(algorithm, float_rows=0)
    got = {}
    for algo in (algorithm, pure):
        res = onnxq.quantize(
            model, feeds, config=QuantConfig.weight_only("int4", 64, algorithm=algo), progress=False
        )
        proto = onnx.load_from_string(onnxq_bytes(res))
        got[algo.float_rows] = _rel_error(ref, _run(proto, feeds))
        if algo.float_rows:
            inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
            gather = next(n for n in proto.graph.node if n.op_type == "Gather")
            assert sorted(inits[gather.input[1]].tolist()) == sorted(outliers.tolist())
            rows = [a for a in inits.values() if a.dtype == np.float16]  # float32 rows stored as float16
            assert len(rows) == 1 and rows[0].shape == (8, 64)
            dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
            zp = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
            deq = dequantize_blocks(inits[dq.input[0]], inits[dq.input[1]], zp, 0, 64)
            assert np.all(deq[outliers] == 0)  # the integer weight holds nothing of those rows
            assert any("float rows: 8 input features" in note for note in res.summary.notes)
    assert got[8] < 0.5 * got[0], got


@pytest.mark.parametrize("algorithm", [GPTQ(), AWQ()])
def test_float_rows_of_a_half_model_stay_half_and_float(algorithm) -> None:
    x, w = _activations(rows=64 * 4), _weight()
    x[:, [3, 77]] *= 30.0
    model = matmul_model(w)
    half = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["b", 256])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["b", 64])],
            [numpy_helper.from_array(w.astype(np.float16), "w")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
        ir_version=8,
    )
    feeds = [{"x": x[i : i + 64].astype(np.float16)} for i in range(0, len(x), 64)]
    ref = _run(model, [{"x": f["x"].astype(np.float32)} for f in feeds])
    got = {}
    for algo in (algorithm, dataclasses.replace(algorithm, float_rows=0)):
        res = onnxq.quantize(
            half, feeds, config=QuantConfig.weight_only("int4", 64, algorithm=algo), progress=False
        )
        proto = onnx.load_from_string(onnxq_bytes(res))
        got[algo.float_rows] = _rel_error(ref, [y.astype(np.float32) for y in _run(proto, feeds)])
        if algo.float_rows:
            side = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[0] != "x"]
            rows = next(t for t in proto.graph.initializer if t.name == side[0])  # read as is
            assert rows.data_type == onnx.TensorProto.FLOAT16 and tuple(rows.dims) == (8, 64)
    assert got[8] < 0.7 * got[0], got


def onnxq_bytes(result) -> bytes:
    import onnx_ir as ir

    return ir.to_proto(result.model).SerializeToString()


# --- tiny-llama: whole model, folding, ORT fusion -------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    import models

    return models.build("tiny-llama"), models.sample_inputs("tiny-llama", 8, seq_len=32)


def _logits_error(fp32, model_bytes: bytes, feeds) -> float:
    ref = _run(onnx.load(str(fp32)), feeds)
    return _rel_error(ref, _run(onnx.load_from_string(model_bytes), feeds))


@pytest.mark.parametrize(
    "algorithm",
    [
        GPTQ(),
        GPTQ(sequential=False),
        GPTQ(act_order=False, static_groups=True),
        AWQ(),
        AWQ(loss="block"),
        AWQ(sequential=True),
        GPTQ(awq=AWQ(clip=False)),
    ],
)
def test_tiny_llama_better_than_rtn_and_fused_by_ort(tmp_path, llama, algorithm) -> None:
    fp32, feeds = llama
    rtn = onnxq.quantize(fp32, config=QuantConfig.weight_only("int4", 32), output=tmp_path / "rtn.onnx")
    config = QuantConfig.weight_only("int4", 32, algorithm=algorithm)
    out = tmp_path / "algo.onnx"
    result = onnxq.quantize(fp32, feeds, config=config, output=out, progress=False)
    s = result.summary
    assert s.calibration_samples == len(feeds) and s.fidelity  # fidelity from the same pass
    assert any(type(algorithm).__name__ in n for n in s.notes)
    err = _logits_error(fp32, out.read_bytes(), feeds)
    err_rtn = _logits_error(fp32, rtn.output_path.read_bytes(), feeds)
    assert err < err_rtn, (err, err_rtn)
    _run(onnx.load(str(out)), feeds[:1], optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 15  # every MatMul weight still fuses (lm_head included)
    if isinstance(algorithm, AWQ) or algorithm.awq is not None:
        # RMSNorm gammas and up_proj absorb 1/s; only o_proj's input (after Reshape) needs a Mul
        written = onnx.load(str(out))
        inserted = [n for n in written.graph.node if n.op_type == "Mul" and n.name.endswith("_awq/Mul")]
        assert len(inserted) <= 2


@pytest.mark.parametrize("algorithm", [GPTQ(), AWQ(sequential=True), AWQ(loss="block")])
def test_half_tiny_llama_layer_by_layer_and_block_loss(llama, algorithm) -> None:
    """A float16 decoder (ORT's own converter: float32 I/O, Casts appended out of topological
    order): the layer-by-layer passes hand on float16 weights and the block loss feeds float16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32, feeds = llama
    half = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    config = QuantConfig.weight_only("int4", 32, algorithm=algorithm)
    result = onnxq.quantize(half, feeds, config=config, progress=False)
    assert min(f.cosine for f in result.summary.fidelity) > 0.98
    wide = [
        v.name
        for v in result.model.graph.initializers.values()
        if v.dtype == onnx.TensorProto.FLOAT and v.shape is not None and len(v.shape) == 2
    ]
    assert not wide  # scales and float rows stay float16, as the weights were


def test_tiny_llama_matmul_nbits_format(llama) -> None:
    fp32, feeds = llama
    config = QuantConfig.weight_only("int4", 32, algorithm=GPTQ(), weight_format="matmul_nbits")
    result = onnxq.quantize(fp32, feeds, config=config, progress=False)
    assert sum(n.op_type == "MatMulNBits" for n in result.model.graph) == 15
    assert min(f.cosine for f in result.summary.fidelity) > 0.98


def _integer_weights(fp32, data, algorithm) -> tuple[dict[str, np.ndarray], list[str]]:
    """The int4 weights ``algorithm`` writes for ``fp32``, and their names in graph order."""
    import onnx_ir as ir

    config = QuantConfig.weight_only("int4", 32, algorithm=algorithm)
    model = ir.to_proto(onnxq.quantize(fp32, data, config=config, progress=False).model)
    q = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_q")}
    return q, [i for node in model.graph.node for i in node.input if i in q]


@pytest.mark.parametrize(
    ("layered", "one_pass"), [(GPTQ(), GPTQ(sequential=False)), (AWQ(sequential=True), AWQ())]
)
def test_layer_by_layer_corrects_for_the_layers_before(llama, layered, one_pass) -> None:
    """Layer by layer, the first layer's statistics are the fp32 ones (same integers as one pass),
    later layers' come from the quantized layers before them (different integers), and the
    calibration data is still read once."""
    fp32, feeds = llama
    seen: list = []
    (by_layer, order), (once, _) = (
        _integer_weights(fp32, counted(feeds, seen), layered),
        _integer_weights(fp32, feeds, one_pass),
    )
    assert len(seen) == len(feeds)
    assert by_layer.keys() == once.keys() and len(by_layer) == 15
    same = [n for n in order if np.array_equal(by_layer[n], once[n])]
    assert order[0] in same and order[-1] not in same  # first layer identical, the last one corrected


def test_awq_block_regions_reach_the_next_projection(llama) -> None:
    """q/k/v's block ends at o_proj's output and gate/up's at down_proj's; o_proj, down_proj and
    lm_head have none. The block loss is zero for the fp32 weights and grows with their error."""
    import onnx_ir as ir

    from onnxq.awq import BlockLoss, awq_groups, find_block_regions
    from onnxq.segments import ActivationStore
    from onnxq.weight_stats import collect_statistics, find_targets

    fp32, feeds = llama
    model = ir.load(str(fp32))
    targets = find_targets(model)
    groups = awq_groups(targets)
    regions = find_block_regions(model, targets, groups)
    producers = {o.name: n for n in model.graph for o in n.outputs}
    ends = sorted(producers[o].name for r in regions.values() for o in r.outputs)
    assert len(regions) == 4 and ends == sorted(
        f"/model/layers.{i}/{p}/MatMul" for i in (0, 1) for p in ("self_attn/o_proj", "mlp/down_proj")
    )
    store = ActivationStore()
    try:
        names = [n for r in regions.values() for n in r.inputs]
        collect_statistics(model, [], feeds, hessian=False, capture=names, store=store, capture_samples=2)
        act, region = next((a, r) for a, r in regions.items() if "mlp" in r.outputs[0])
        loss = BlockLoss(model, region, targets, groups[act], store, 2)
        assert loss.samples == [0, 1]
        w = [np.array(targets[n].value.const_value.numpy(), np.float32) for n in groups[act]]
        w = [a.T if targets[n].transposed else a for a, n in zip(w, groups[act], strict=True)]
        assert loss(w) < 1e-10
        noisy = [a + np.random.default_rng(0).normal(0, 0.01, a.shape).astype(np.float32) for a in w]
        assert loss(noisy) > 1e-6 and loss([a * 1.1 for a in w]) > loss([a * 1.01 for a in w])
    finally:
        store.close()


def test_awq_block_regions_of_gpt2_skip_shape_arithmetic() -> None:
    """GPT-2's Gemm blocks reshape their output with a shape computed from their input: the walk
    does not follow Shape, so it ends at c_proj instead of running into the next LayerNorm."""
    import onnx_ir as ir

    from onnxq.awq import awq_groups, find_block_regions
    from onnxq.weight_stats import find_targets

    model = ir.load(str(models.build("tiny-gpt2")))
    targets = find_targets(model)
    regions = find_block_regions(model, targets, awq_groups(targets))
    producers = {o.name: n for n in model.graph for o in n.outputs}
    ends = sorted(producers[o].name for r in regions.values() for o in r.outputs)
    assert ends == sorted(f"/transformer/h.{i}/{p}/c_proj/Gemm" for i in (0, 1) for p in ("attn", "mlp"))
    assert all(producers[n].op_type != "Shape" for r in regions.values() for n in r.inputs if n in producers)


def test_generator_data_is_read_once(llama) -> None:
    fp32, feeds = llama
    seen: list = []
    result = onnxq.quantize(
        fp32, counted(feeds, seen), config=QuantConfig.weight_only("int4", 32, algorithm=AWQ())
    )
    assert len(seen) == len(feeds) == result.summary.calibration_samples
    assert result.summary.fidelity


# --- statistics -----------------------------------------------------------------------------------


def test_activation_stats_merge_equals_one_pass() -> None:
    x = _activations(rows=300, k=16)
    keys = np.random.default_rng(3).random(300)
    whole = ActivationStats(True, 50)
    for i in range(0, 300, 60):
        whole.update(x[i : i + 60], keys[i : i + 60])
    a, b = ActivationStats(True, 50), ActivationStats(True, 50)
    for i in range(0, 300, 60):
        (a if i < 120 else b).update(x[i : i + 60], keys[i : i + 60])
    merged = a.merge(b)
    assert merged.rows == whole.rows == 300
    np.testing.assert_allclose(merged.hessian, whole.hessian, rtol=1e-10)
    np.testing.assert_allclose(merged.mean_abs(), np.abs(x).mean(0), rtol=1e-5)
    assert len(whole.sample_rows) == 50
    np.testing.assert_array_equal(np.sort(merged.sample_keys), np.sort(whole.sample_keys))
    np.testing.assert_array_equal(np.sort(merged.sample_keys), np.sort(keys)[:50])


# --- config -----------------------------------------------------------------------------------------


def test_config_round_trip_and_errors() -> None:
    for algo in (
        GPTQ(),
        GPTQ(damp=0.05, act_order=False, static_groups=True, clip_grid=0),
        AWQ(grid=10, clip=False),
        GPTQ(awq=AWQ(max_rows=64)),
        AWQ(loss="block", loss_samples=2),
        AWQ(sequential=True),
        GPTQ(float_rows=0.04),
    ):
        config = QuantConfig.weight_only("int4", 128, algorithm=algo, exclude_op_types=("Gather",))
        again = QuantConfig.from_json(config.to_json())
        assert again == config and again.algorithm == algo
    assert QuantConfig.weight_only("int4").algorithm is None  # RTN stays the default
    with pytest.raises(ConfigError, match="loss='layer'"):
        AWQ(sequential=True, loss="block")
    with pytest.raises(ConfigError, match="'block' or 'layer'"):
        AWQ(loss="module")
    with pytest.raises(ConfigError, match="one pass"):
        GPTQ(awq=AWQ(sequential=True))
    for bad in (-1, 1.5, 0.0, "8"):
        with pytest.raises(ConfigError, match="a count n >= 0"):
            AWQ(float_rows=bad)


def test_float_rows_as_a_fraction_of_k() -> None:
    from onnxq.weight_stats import choose_float_rows

    energy = np.arange(1536, dtype=np.float64)
    assert len(choose_float_rows(energy, 0.04)) == 61  # round(0.04 * 1536)
    assert len(choose_float_rows(energy[:576], 0.04)) == 23
    assert len(choose_float_rows(energy[:576], 0.5)) == 36  # capped at K // 16
    np.testing.assert_array_equal(choose_float_rows(energy[:100], 8), np.arange(94, 100))  # K // 16 = 6
    with pytest.raises(ConfigError, match="weight-only"):
        QuantConfig(algorithm=GPTQ())  # static int8 config
    with pytest.raises(ConfigError, match="integer"):
        QuantConfig.weight_only("float8e4m3fn", 32, algorithm=AWQ())
    with pytest.raises(ConfigError, match="damp"):
        GPTQ(damp=-1)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        QuantConfig.from_dict({**QuantConfig.weight_only("int4").to_dict(), "algorithm": {"kind": "SpQR"}})
    with pytest.raises(ConfigError, match="unknown GPTQ algorithm keys"):
        QuantConfig.from_dict(
            {**QuantConfig.weight_only("int4").to_dict(), "algorithm": {"kind": "GPTQ", "bits": 3}}
        )


def test_missing_calibration_data_is_a_clear_error() -> None:
    model = matmul_model(_weight())
    with pytest.raises(CalibrationDataError, match="GPTQ\\(\\) needs calibration data"):
        onnxq.quantize(model, config=QuantConfig.weight_only("int4", 64, algorithm=GPTQ()))


# --- the real all-MiniLM-L6-v2 --------------------------------------------------------------------


@pytest.mark.skipif(not models.is_built("minilm-real"), reason="minilm-real is not built")
@pytest.mark.parametrize("algorithm", [GPTQ(sequential=False), AWQ()])
def test_float_rows_help_the_real_minilm(model_path, calib_feeds, tmp_path, algorithm) -> None:
    """all-MiniLM-L6-v2, int4 block 32, 16 calibration samples: keeping 8 input features per
    activation float (24 activations, 0.33 MB) cuts the embedding error (1 - cosine vs fp32 on other
    inputs) by >= 10 % (measured: GPTQ one pass 1.77e-2 -> 1.53e-2, AWQ 2.20e-2 -> 1.80e-2)."""
    path, calib = model_path("minilm-real"), calib_feeds("minilm-real", 16)
    held_out = models.sample_inputs("minilm-real", 8, seed=1)
    ref = _run_file(path, held_out)
    error = {}
    for algo in (algorithm, dataclasses.replace(algorithm, float_rows=0)):
        out = tmp_path / f"{algo.float_rows}.onnx"
        config = QuantConfig.weight_only("int4", 32, algorithm=algo)
        result = onnxq.quantize(path, calib, config=config, output=out, progress=False)
        got = _run_file(out, held_out)
        error[algo.float_rows] = 1 - np.mean([_cosine(a, b) for a, b in zip(ref, got, strict=True)])
        if algo.float_rows:
            assert any("float rows: 192 input features of 24 activations" in n for n in result.summary.notes)
    assert error[8] < 0.9 * error[0], error


def _run_file(path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
