"""Automatic mixed precision (``onnxq.mixed_precision.quantize_mixed``) on the digits CNN and tiny-bert.

What is asserted:

- a budget the all-8-bit model already meets keeps no node in float (one quantization);
- a budget that cannot be met within ``max_float_nodes`` is flagged (``met=False``) and says so;
- a budget in between: the chosen set meets it, the ranked prefix one node shorter does not (the
  search found the smallest prefix), and after refinement removing any single chosen node breaks
  the budget (every chosen node is needed);
- the ranking is the brute-force leave-one-out one: each candidate alone kept float by
  ``onnxq.quantize(exclude_nodes=...)``, its output SQNR gain measured with numpy, gives the
  report's gains and order;
- the brute-force check: every subset of the CNN's candidate nodes with fewer nodes than chosen
  is quantized independently with ``onnxq.quantize(exclude_nodes=...)`` and scored with numpy on
  the same samples; the chosen set must be no larger than the smallest subset meeting the budget
  plus one (and the test reports when it is exactly the smallest);
- the chosen model file is byte-identical to ``onnxq.quantize`` with the returned config (the
  single-calibration trials are the real pipeline, cross-layer equalization and bias correction
  included), and a rerun gives the same nodes and bytes.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq.errors import ConfigError
from onnxq.mixed_precision import MixedPrecision, escape_name, quantize_mixed

CNN = "cnn-digits"
N = 16
BETWEEN = 0.99999  # cosine the CNN's all-8-bit model misses (0.99997) and a few float Convs meet


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def _cosine(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([o.ravel() for o in out]).astype(np.float64)
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def cnn(model_path, calib_feeds):
    return model_path(CNN), calib_feeds(CNN, N)


@pytest.fixture(scope="module")
def cnn_between(cnn, tmp_path_factory):
    path, feeds = cnn
    out = tmp_path_factory.mktemp("amp") / "cnn.amp.onnx"
    budget = MixedPrecision(min_cosine=BETWEEN, latency_rounds=1, latency_threads=1, latency_spinning=True)
    return quantize_mixed(path, feeds, budget, output=out, progress=False)


def test_budget_already_met_keeps_everything_quantized(cnn, tmp_path):
    path, feeds = cnn
    result = quantize_mixed(
        path, feeds, MixedPrecision(min_cosine=0.999, measure_latency=False), output=tmp_path / "m.onnx"
    )
    assert result.met and result.chosen == () and result.quantizations == 1
    assert result.config == onnxq.QuantConfig()
    assert result.size_after == result.size_base < result.size_fp32
    assert "MET with 0 of" in result.to_text()


def test_unmeetable_budget_is_flagged(cnn, tmp_path):
    path, feeds = cnn
    budget = MixedPrecision(min_sqnr_db=200.0, max_float_nodes=2, measure_latency=False, refine=False)
    result = quantize_mixed(path, feeds, budget, output=tmp_path / "m.onnx", progress=False)
    assert not result.met
    assert len(result.chosen) == 2  # the cap, written anyway so the report shows how close it came
    assert [c.rank for c in result.chosen] == [1, 2]
    assert "NOT MET" in result.to_text() and "budget not met" in result.to_text()
    assert (tmp_path / "m.onnx").is_file()


def test_between_budget_minimal_and_reproducible(cnn, cnn_between, tmp_path):
    path, feeds = cnn
    result = cnn_between
    assert result.met and result.after.min_cosine() >= BETWEEN > result.before.min_cosine()
    chosen = {c.name for c in result.chosen}
    assert 0 < len(chosen) < len(result.ranking)
    tried = {frozenset(t.nodes): t.metrics.met for t in result.trials}
    ranked = [c.name for c in result.ranking]
    k = max(c.rank for c in result.chosen)
    assert tried[frozenset(ranked[: k - 1])] is False  # the prefix one shorter misses the budget
    for name in chosen:  # refinement: every chosen node is needed
        assert tried[frozenset(chosen - {name})] is False
    assert result.quantizations < 2 ** len(ranked)
    # The report: reasons, sizes, latency.
    assert all(c.reason.startswith(f"ranked {c.rank} of {len(ranked)}") for c in result.chosen)
    assert result.size_base < result.size_after <= result.size_fp32
    assert set(result.latency_ratio) == {"base", "chosen"} and result.latency_ms["fp32"] > 0
    assert "latency on ORT CPU EP (1 thread, spinning on): fp32 " in result.to_text()
    assert result.to_dict()["latency_setting"] == "1 thread, spinning on"
    # The trial file is what onnxq.quantize makes with the returned (serialisable) config.
    config = onnxq.QuantConfig.from_json(result.config.to_json())
    assert sorted(config.exclude_nodes) == sorted(escape_name(n) for n in chosen)
    official = onnxq.quantize(path, feeds, config=config, output=tmp_path / "official.onnx", progress=False)
    assert official.output_path.read_bytes() == result.output_path.read_bytes()
    # Deterministic: a rerun chooses the same nodes and writes the same bytes.
    again = quantize_mixed(
        path,
        feeds,
        MixedPrecision(min_cosine=BETWEEN, measure_latency=False),
        output=tmp_path / "again.onnx",
        progress=False,
    )
    assert [c.name for c in again.chosen] == [c.name for c in result.chosen]
    assert again.output_path.read_bytes() == result.output_path.read_bytes()


def test_brute_force_agrees(cnn, cnn_between, tmp_path):
    """Every subset of the candidates smaller than the chosen set, quantized by ``onnxq.quantize`` and
    scored independently: none may meet the budget with two nodes fewer than chosen."""
    path, feeds = cnn
    result = cnn_between
    names = [c.name for c in result.ranking]
    ref = _outputs(path, feeds)
    size = len(result.chosen)
    smallest = None
    for n in range(size):
        for subset in itertools.combinations(names, n):
            config = onnxq.QuantConfig(exclude_nodes=tuple(escape_name(s) for s in subset), fidelity=False)
            out = tmp_path / "brute.onnx"
            onnxq.quantize(path, feeds, config=config, output=out, progress=False)
            if _cosine(ref, _outputs(out, feeds)) >= BETWEEN:
                smallest = n
                break
        if smallest is not None:
            break
    best = size if smallest is None else smallest
    assert size <= best + 1, f"chose {size} nodes, brute force meets the budget with {best}"
    # The chosen set itself, measured independently, meets the budget.
    assert _cosine(ref, _outputs(result.output_path, feeds)) >= BETWEEN


def test_ranking_is_the_brute_force_leave_one_out(cnn, cnn_between, tmp_path):
    """The report's ranking, recomputed by brute force: each candidate alone kept float with
    ``onnxq.quantize(exclude_nodes=...)``, the output SQNR over the same samples measured with
    numpy. The gains agree to 0.01 dB and the order is theirs (largest gain first)."""
    path, feeds = cnn
    result = cnn_between
    assert result.ranked_by == "measured" and result.ranking_quantizations == len(result.ranking)
    ref = _outputs(path, feeds)

    def sqnr(out: list[np.ndarray]) -> float:
        a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([o.ravel() for o in out]).astype(np.float64)
        return 10 * math.log10(float(a @ a) / float((a - b) @ (a - b)))

    base = onnxq.quantize(path, feeds, config=onnxq.QuantConfig(fidelity=False), output=tmp_path / "b.onnx")
    base_db = sqnr(_outputs(base.output_path, feeds))
    brute = {}
    for c in result.ranking:
        config = onnxq.QuantConfig(exclude_nodes=(escape_name(c.name),), fidelity=False)
        out = onnxq.quantize(path, feeds, config=config, output=tmp_path / "one.onnx", progress=False)
        brute[c.name] = sqnr(_outputs(out.output_path, feeds)) - base_db
        assert c.gain_db == pytest.approx(brute[c.name], abs=0.01), c.name
    gains = [brute[c.name] for c in result.ranking]
    assert gains == sorted(gains, reverse=True)
    assert [c.rank for c in result.ranking] == list(range(1, len(gains) + 1))


def test_eval_fn_budget_and_int16_fallback(cnn, tmp_path):
    import models

    path, feeds = cnn
    _, _, x_test, y_test = models.digits_split()
    calls: list[Path] = []

    def top1(p: Path) -> float:
        calls.append(Path(p))
        return 100 * models.onnx_top1(p, x_test, y_test)

    result = quantize_mixed(
        path,
        feeds,
        MixedPrecision(eval_fn=top1, max_drop=0.5, measure_latency=False),
        output=tmp_path / "e.onnx",
        progress=False,
    )
    assert result.met and result.fp32_score == pytest.approx(calls[0].exists() and top1(path))
    assert result.before.score is not None and result.after.outputs  # cosine still reported
    # A16W8 for the chosen nodes: int8 weights bound what 16-bit activations can recover, so the
    # budget is 1 dB above the all-8-bit SQNR.
    target = result.before.min_sqnr_db() + 1.0
    budget = MixedPrecision(min_sqnr_db=target, fallback="int16", measure_latency=False)
    r16 = quantize_mixed(path, feeds, budget, output=tmp_path / "i16.onnx", progress=False)
    assert r16.met and r16.chosen and r16.after.min_sqnr_db() >= target
    assert r16.ranked_by == "measured" and all(c.gain_db is not None for c in r16.ranking)
    assert any(s is not None and s.dtype in ("uint16", "int16") for s in r16.config.overrides.values())
    assert r16.size_after < r16.size_fp32  # weights in 16 bits, not float


def test_tiny_bert_between_budget(model_path, calib_feeds, tmp_path):
    path, feeds = model_path("tiny-bert"), calib_feeds("tiny-bert", 8)
    base = quantize_mixed(
        path, feeds, MixedPrecision(min_cosine=0.9, measure_latency=False), output=tmp_path / "b.onnx"
    )
    cos0 = base.before.min_cosine()
    assert base.chosen == () and cos0 < 1
    target = 1 - (1 - cos0) / 2  # halve the error
    result = quantize_mixed(
        path,
        feeds,
        MixedPrecision(min_cosine=target, measure_latency=False),
        output=tmp_path / "m.onnx",
        progress=False,
    )
    assert result.met and result.after.min_cosine() >= target
    ops = {c.op_type for c in result.ranking}
    assert {"MatMul", "Gather"} <= ops
    tried = {frozenset(t.nodes): t.metrics.met for t in result.trials}
    chosen = {c.name for c in result.chosen}
    for name in chosen:
        assert tried[frozenset(chosen - {name})] is False
    official = onnxq.quantize(path, feeds, config=result.config, output=tmp_path / "o.onnx", progress=False)
    assert official.output_path.read_bytes() == result.output_path.read_bytes()


def test_dynamic_base_stays_dynamic(model_path, calib_feeds, tmp_path):
    """A ``calibration=Dynamic()`` base: every trial is the dynamic rewrite (DynamicQuantizeLinear,
    no static ranges), the chosen nodes stay float, and the file is ``onnxq.quantize``'s bytes."""
    path, feeds = model_path("tiny-bert"), calib_feeds("tiny-bert", 8)
    config = onnxq.QuantConfig(calibration=onnxq.Dynamic())
    base = quantize_mixed(
        path,
        feeds,
        MixedPrecision(min_cosine=0.9, measure_latency=False),
        config=config,
        output=tmp_path / "b.onnx",
        progress=False,
    )
    cos0 = base.before.min_cosine()
    assert base.chosen == () and cos0 < 1
    target = 1 - (1 - cos0) / 2
    result = quantize_mixed(
        path,
        feeds,
        MixedPrecision(min_cosine=target, measure_latency=False),
        config=config,
        output=tmp_path / "m.onnx",
        progress=False,
    )
    assert result.met and result.chosen and result.after.min_cosine() >= target
    assert result.summary.dynamic and "calibration: dynamic" in result.summary.to_text()
    ops = [n.op_type for n in onnx.load(str(result.output_path)).graph.node]
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    official = onnxq.quantize(path, feeds, config=result.config, output=tmp_path / "o.onnx", progress=False)
    assert official.output_path.read_bytes() == result.output_path.read_bytes()
    with pytest.raises(ConfigError, match="MinMax"):
        quantize_mixed(path, feeds, MixedPrecision(min_cosine=0.9, fallback="int16"), config=config)


def test_equalized_bias_corrected_base_is_the_quantized_pipeline(model_path, calib_feeds, tmp_path):
    """A base with per-tensor weights, cross-layer equalization and bias correction on the unbalanced
    CNN (per-tensor weights alone collapse it): every trial equalizes and corrects as
    ``onnxq.quantize`` does, so the all-8-bit base meets a 0.9999 budget with no node float, a
    stricter budget keeps some float, and both files are ``onnxq.quantize``'s bytes."""
    name = "cnn-digits-unbalanced"
    path, feeds = model_path(name), calib_feeds(name, N)
    config = onnxq.QuantConfig(
        weights=onnxq.QuantSpec("int8", True, onnxq.PerTensor()),
        equalization=onnxq.CrossLayerEqualization(),
        bias_correction=onnxq.BiasCorrection(),
    )
    for target, float_nodes in ((0.9999, False), (0.999995, True)):
        result = quantize_mixed(
            path,
            feeds,
            MixedPrecision(min_cosine=target, measure_latency=False),
            config=config,
            output=tmp_path / f"{target}.onnx",
            progress=False,
        )
        assert result.met and bool(result.chosen) == float_nodes, result.to_text()
        official = onnxq.quantize(
            path, feeds, config=result.config, output=tmp_path / f"{target}.q.onnx", progress=False
        )
        assert official.output_path.read_bytes() == result.output_path.read_bytes()


def test_weight_only_base_keeps_weights_float(model_path, calib_feeds, tmp_path):
    """An int4 round-to-nearest base: candidates are the weights (named by their first reader),
    the search meets a budget between the base's cosine and 1 with the weights it keeps float,
    refinement puts weights of the passing prefix back to int4, and the file is
    ``onnxq.quantize``'s for the returned config. GPTQ/AWQ bases (a calibration per trial) and
    16-bit fallback are refused."""
    path, feeds = model_path("tiny-llama"), calib_feeds("tiny-llama", 8)
    config = onnxq.QuantConfig.weight_only("int4", 32)
    budget = MixedPrecision(min_cosine=0.5, measure_latency=False)
    base = quantize_mixed(path, feeds, budget, config=config, output=tmp_path / "b.onnx", progress=False)
    cos0 = base.before.min_cosine()
    assert base.chosen == () and cos0 < 0.999
    assert {c.op_type for c in base.ranking} == {"MatMul", "Gather"} and len(base.ranking) == 16
    target = 1 - (1 - cos0) / 3
    result = quantize_mixed(
        path,
        feeds,
        MixedPrecision(min_cosine=target, measure_latency=False, max_refine_trials=16),
        config=config,
        output=tmp_path / "m.onnx",
        progress=False,
    )
    assert result.met and result.after.min_cosine() >= target
    assert 0 < len(result.chosen) < len(result.ranking)
    assert result.size_base < result.size_after < result.size_fp32
    prefix = min(
        len(t.nodes) for t in result.trials if t.metrics.met and t.step.startswith(("gallop", "bisect"))
    )
    assert len(result.chosen) < prefix  # refinement put weights of the passing prefix back to int4
    official = onnxq.quantize(path, feeds, config=result.config, output=tmp_path / "o.onnx", progress=False)
    assert official.output_path.read_bytes() == result.output_path.read_bytes()
    gptq = onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.GPTQ())
    with pytest.raises(ConfigError, match="rerun its calibration"):
        quantize_mixed(path, feeds, MixedPrecision(min_cosine=0.9), config=gptq)
    with pytest.raises(ConfigError, match="fallback='float'"):
        quantize_mixed(path, feeds, MixedPrecision(min_cosine=0.9, fallback="int16"), config=config)


def test_budget_validation():
    with pytest.raises(ConfigError, match="needs a budget"):
        MixedPrecision()
    with pytest.raises(ConfigError, match="go together"):
        MixedPrecision(eval_fn=lambda p: 0.0)
    with pytest.raises(ConfigError, match="fallback"):
        MixedPrecision(min_cosine=0.9, fallback="bf16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot be serialised"):
        MixedPrecision(eval_fn=lambda p: 0.0, max_drop=1.0).to_dict()
    with pytest.raises(ConfigError, match="latency_threads"):
        MixedPrecision(min_cosine=0.9, latency_threads=0)
    with pytest.raises(ConfigError, match="'auto', 'measured' or 'added_error'"):
        MixedPrecision(min_cosine=0.9, ranking="random")  # type: ignore[arg-type]
    budget = MixedPrecision(min_cosine=0.99, max_float_nodes=3, latency_threads=2, ranking="added_error")
    assert MixedPrecision.from_dict(budget.to_dict()) == budget
    assert escape_name("a[0]/b*?") == "a[[]0]/b[*][?]"


def test_merged_decoder_bodies_are_quantized_as_by_quantize(model_path, calib_feeds, tmp_path) -> None:
    """A model whose layers live in If branches (tiny-llama merged): the search ranks main-graph
    nodes, the bodies keep the base plan's quantization (ranges and SmoothQuant from the one
    calibration), and the result is the same bytes as ``onnxq.quantize(config=result.config)``."""
    import onnx

    from models.merged import branch_feed, merge_into_if

    onnx.save(merge_into_if(onnx.load(str(model_path("tiny-llama")))), tmp_path / "merged.onnx")
    feeds = [branch_feed(f, i) for i, f in enumerate(calib_feeds("tiny-llama", 8))]
    budget = MixedPrecision(min_cosine=0.99, measure_latency=False)
    result = quantize_mixed(
        tmp_path / "merged.onnx", feeds, budget, output=tmp_path / "amp.onnx", progress=False
    )
    official = onnxq.quantize(
        tmp_path / "merged.onnx", feeds, config=result.config, output=tmp_path / "q.onnx", progress=False
    )
    assert official.summary.quantized_nodes["MatMul"] > 0
    assert official.output_path.read_bytes() == result.output_path.read_bytes()
