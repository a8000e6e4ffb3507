"""Bad input raises onnxq's own exceptions, with messages that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import onnxq
from onnxq import (
    CalibrationDataError,
    ConfigError,
    MinMax,
    ModelLoadError,
    OnnxqError,
    PerChannel,
    PerTensor,
    QuantConfig,
    QuantizationError,
    QuantSpec,
)

CNN = "cnn-digits"
BERT = "tiny-bert"


def _image(dtype=np.float32, shape=(1, 1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, size=shape).astype(dtype)


# --- the model --------------------------------------------------------------------------------------
def test_missing_model_path(tmp_path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError, match=r"does not exist") as info:
        onnxq.quantize(missing, [{"input": _image()}], output=tmp_path / "q.onnx")
    assert str(missing) in str(info.value)


def test_text_file_is_not_a_model(tmp_path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 10)
    with pytest.raises(ModelLoadError, match=r"notes\.onnx") as info:
        onnxq.quantize(path, [{"input": _image()}], output=tmp_path / "q.onnx")
    assert "ONNX" in str(info.value)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_not_a_model(tmp_path, seed: int) -> None:
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match=r"random\.onnx"):
        onnxq.quantize(path, [{"input": _image()}], output=tmp_path / "q.onnx")


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        onnxq.quantize(path, [{"input": _image()}], output=tmp_path / "q.onnx")


@pytest.mark.parametrize("name", [CNN, BERT])
def test_truncated_model(name: str, model_path, tmp_path) -> None:
    data = model_path(name).read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"truncated\.onnx.*not a valid ONNX model"):
        onnxq.quantize(path, [{"input": _image()}], output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_folder_with_several_models(model_path, tmp_path) -> None:
    for n in ("a.onnx", "b.onnx"):
        (tmp_path / n).write_bytes(model_path(CNN).read_bytes())
    with pytest.raises(ModelLoadError, match=r"2 float \.onnx files"):
        onnxq.quantize(tmp_path, [{"input": _image()}])


def test_folder_quantized_twice_reads_the_float_model(model_path, tmp_path) -> None:
    (tmp_path / "net.onnx").write_bytes(model_path(CNN).read_bytes())
    first = onnxq.quantize(tmp_path, [{"input": _image()}], progress=False)
    assert first.output_path == tmp_path / "net.quant.onnx"
    second = onnxq.quantize(tmp_path, [{"input": _image()}], progress=False)  # ignores net.quant.onnx
    assert second.output_path == first.output_path
    assert sum(second.summary.quantized_nodes.values()) > 0


def test_wrong_model_type() -> None:
    with pytest.raises(ModelLoadError, match="dict"):
        onnxq.quantize({"not": "a model"}, [{"input": _image()}])


def test_already_quantized_model(model_path, calib_feeds, tmp_path) -> None:
    first = onnxq.quantize(model_path(CNN), calib_feeds(CNN, 4), output=tmp_path / "q.onnx", progress=False)
    with pytest.raises(QuantizationError, match="already quantized") as info:
        onnxq.quantize(first.output_path, calib_feeds(CNN, 4), output=tmp_path / "qq.onnx", progress=False)
    assert "QuantizeLinear" in str(info.value) or "DequantizeLinear" in str(info.value)
    assert not (tmp_path / "qq.onnx").exists()
    # also for the in-memory result
    with pytest.raises(QuantizationError, match="already quantized"):
        onnxq.quantize(first.model, calib_feeds(CNN, 4), progress=False)


# --- calibration data -------------------------------------------------------------------------------
@pytest.fixture
def bert(model_path):
    return model_path(BERT)


@pytest.fixture
def bert_feed(calib_feeds):
    return dict(calib_feeds(BERT, 4)[0])


def test_missing_input_name(bert, bert_feed, tmp_path) -> None:
    del bert_feed["attention_mask"]
    with pytest.raises(CalibrationDataError, match=r"missing inputs \['attention_mask'\]"):
        onnxq.quantize(bert, [bert_feed], output=tmp_path / "q.onnx")


def test_extra_input_name(bert, bert_feed, tmp_path) -> None:
    bert_feed["pixel_values"] = np.zeros((1, 3), np.float32)
    with pytest.raises(CalibrationDataError, match=r"unknown inputs \['pixel_values'\]"):
        onnxq.quantize(bert, [bert_feed], output=tmp_path / "q.onnx")


def test_wrong_dtype_suggests_astype(bert, bert_feed, tmp_path) -> None:
    bert_feed["input_ids"] = bert_feed["input_ids"].astype(np.int32)
    with pytest.raises(CalibrationDataError, match=r"'input_ids'.*int32.*int64.*astype\(np\.int64\)"):
        onnxq.quantize(bert, [bert_feed], output=tmp_path / "q.onnx")


def test_wrong_float_dtype(model_path, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match=r"float64.*astype\(np\.float32\)"):
        onnxq.quantize(model_path(CNN), [{"input": _image(np.float64)}], output=tmp_path / "q.onnx")


def test_wrong_rank(bert, bert_feed, tmp_path) -> None:
    bert_feed["input_ids"] = bert_feed["input_ids"][0]
    with pytest.raises(CalibrationDataError, match=r"'input_ids' has rank 1.*expects rank 2"):
        onnxq.quantize(bert, [bert_feed], output=tmp_path / "q.onnx")


def test_wrong_fixed_dimension(model_path, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match=r"size 7 on axis 2"):
        onnxq.quantize(model_path(CNN), [{"input": _image(shape=(1, 1, 7, 8))}], output=tmp_path / "q.onnx")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(model_path, tmp_path, bad: float) -> None:
    image = _image()
    image[0, 0, 3, 3] = bad
    with pytest.raises(CalibrationDataError, match="NaN or Inf"):
        onnxq.quantize(model_path(CNN), [{"input": image}], output=tmp_path / "q.onnx")


def test_bad_sample_later_in_the_stream(model_path, tmp_path) -> None:
    good = _image()
    bad = _image()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationDataError, match="calibration sample 2"):
        onnxq.quantize(
            model_path(CNN), [{"input": good}, {"input": good}, {"input": bad}], output=tmp_path / "q.onnx"
        )
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_empty_calibration_data(model_path, tmp_path, empty) -> None:
    with pytest.raises(CalibrationDataError, match="empty"):
        onnxq.quantize(model_path(CNN), empty, output=tmp_path / "q.onnx")


def test_no_calibration_data(model_path, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="calib_data"):
        onnxq.quantize(model_path(CNN), None, output=tmp_path / "q.onnx")


def test_single_dict_instead_of_list(model_path, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="single dict"):
        onnxq.quantize(model_path(CNN), {"input": _image()}, output=tmp_path / "q.onnx")


def test_bare_arrays_for_multi_input_model(bert, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="inputs"):
        onnxq.quantize(bert, [np.zeros((1, 16), np.int64)], output=tmp_path / "q.onnx")


def test_calibration_file_errors(model_path, tmp_path) -> None:
    with pytest.raises(CalibrationDataError, match="does not exist"):
        onnxq.quantize(model_path(CNN), tmp_path / "missing.npz", output=tmp_path / "q.onnx")
    text = tmp_path / "calib.txt"
    text.write_text("1 2 3")
    with pytest.raises(CalibrationDataError, match=r"\.npz"):
        onnxq.quantize(model_path(CNN), text, output=tmp_path / "q.onnx")
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, input_ids=np.zeros((3, 16), np.int64), attention_mask=np.zeros((2, 16), np.int64))
    with pytest.raises(CalibrationDataError, match="different sample counts"):
        onnxq.quantize(model_path(BERT), uneven, output=tmp_path / "q.onnx")


# --- output and config ------------------------------------------------------------------------------
def test_output_folder_missing(model_path, tmp_path) -> None:
    out = tmp_path / "no" / "such" / "folder" / "q.onnx"
    with pytest.raises(OnnxqError, match="does not exist") as info:
        onnxq.quantize(model_path(CNN), [{"input": _image()}], output=out)
    assert str(out.parent) in str(info.value)
    assert not (tmp_path / "no").exists()


def test_config_must_be_a_quantconfig(model_path, tmp_path) -> None:
    with pytest.raises(ConfigError, match="QuantConfig"):
        onnxq.quantize(
            model_path(CNN), [{"input": _image()}], config={"num_samples": 3}, output=tmp_path / "q.onnx"
        )


def test_unknown_config_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config keys \['num_sample'\]"):
        QuantConfig.from_dict({"num_sample": 3})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"weights": {"dtype": "int3"}}, "unsupported quantization dtype 'int3'"),
        ({"weights": {"dtype": "int4"}}, "weight-only: use activations=None"),
        ({"weights": {"granularity": {"kind": "per_group"}}}, "unknown granularity 'per_group'"),
        ({"calibration": {"method": "KLD"}}, "unknown calibration method 'KLD'"),
        ({"calibration": {"method": "MinMax", "moving_average": 2.0}}, "0 < c < 1"),
        ({"calibration": {"method": "MinMax", "percentile": 99.9}}, "percentile"),
        ({"target": "gpu"}, "unknown target 'gpu'"),
        ({"num_samples": 0}, "num_samples"),
        ({"exclude_nodes": "node_1"}, "single string"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_invalid_config_values(data, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantConfig.from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        {"weights": {"dtype": "int8", "symetric": True}},
        {"activations": {"dtype": "uint8", "granularity": {"kind": "per_channel", "axes": 1}}},
        {"overrides": {"x": {"dtyp": "uint16"}}},
    ],
)
def test_unknown_key_inside_a_spec(data) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict(data)


def test_invalid_json(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        QuantConfig.from_json(tmp_path / "missing.json")


def test_exclude_if_is_not_serialisable() -> None:
    with pytest.raises(ConfigError, match="exclude_if"):
        QuantConfig(exclude_if=lambda node: True).to_json()


# --- config JSON round trip -------------------------------------------------------------------------
CUSTOM = QuantConfig(
    activations=QuantSpec("uint16", False, PerTensor()),
    weights=QuantSpec("int8", True, PerTensor()),
    calibration=MinMax(moving_average=0.01),
    op_types=("MatMul", "Gemm"),
    exclude_nodes=("/lm_head/*", "decoder.*"),
    exclude_op_types=("Conv",),
    overrides={
        "logits": None,
        "hidden": QuantSpec("int16", True, PerTensor()),
        "W": QuantSpec("int8", True, PerChannel(axis=0)),
        "V": QuantSpec("uint8", False, PerChannel()),
    },
    num_samples=64,
    fidelity=False,
)


@pytest.mark.parametrize("config", [QuantConfig(), CUSTOM], ids=["default", "custom"])
def test_json_round_trip(config: QuantConfig, tmp_path: Path) -> None:
    text = config.to_json()
    again = QuantConfig.from_json(text)
    assert again == config
    assert again.to_json() == text
    assert json.loads(text)["weights"]["granularity"]["kind"] == (
        "per_tensor" if config is CUSTOM else "per_channel"
    )
    path = tmp_path / "config.json"
    config.to_json(path)
    assert QuantConfig.from_json(path) == config
    assert QuantConfig.from_json(str(path)) == config
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_round_trip_keeps_types() -> None:
    again = QuantConfig.from_json(CUSTOM.to_json())
    assert isinstance(again.weights.granularity, PerTensor)
    assert again.overrides["logits"] is None
    assert again.overrides["W"].granularity == PerChannel(axis=0)
    assert again.overrides["V"].granularity == PerChannel(axis=None)
    assert isinstance(again.op_types, tuple) and isinstance(again.exclude_nodes, tuple)
    assert again.calibration == MinMax(moving_average=0.01)


def test_round_trip_differs_when_config_differs() -> None:
    assert QuantConfig.from_json(CUSTOM.to_json()) != QuantConfig()
    changed = CUSTOM.with_changes(num_samples=65)
    assert QuantConfig.from_json(changed.to_json()) != CUSTOM


def test_quantconfig_rejects_bad_dtype_directly() -> None:
    with pytest.raises(ConfigError, match="int3"):
        QuantSpec("int3")


def test_errors_derive_from_onnxqerror() -> None:
    for exc in (ModelLoadError, ConfigError, CalibrationDataError, onnxq.OutputError, QuantizationError):
        assert issubclass(exc, OnnxqError)


@pytest.mark.parametrize(
    "config",
    [
        onnxq.QuantConfig(),
        onnxq.QuantConfig(calibration=onnxq.Dynamic()),
        onnxq.QuantConfig.weight_only("int4", 32),
        onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.GPTQ()),
        onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.AWQ()),
    ],
    ids=["static", "dynamic", "weight-only", "gptq", "awq"],
)
def test_sample_that_fails_in_onnxruntime(bert, bert_feed, tmp_path, config) -> None:
    """Inputs of the right names, types and shapes that ONNX Runtime rejects (token ids past the
    vocabulary: a tokenizer that does not match the model) name the sample, on every path."""
    bert_feed["input_ids"] = np.full_like(bert_feed["input_ids"], 10**6)
    with pytest.raises(CalibrationDataError, match="calibration sample 0 failed in ONNX Runtime"):
        onnxq.quantize(bert, [bert_feed], config=config, output=tmp_path / "q.onnx", progress=False)
    assert list(tmp_path.iterdir()) == []
