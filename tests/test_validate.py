"""onnxq.validate and `onnxq validate`: fidelity, verdicts, placement and providers on real models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq import metrics
from onnxq.cli import main
from onnxq.errors import CalibrationDataError, ConfigError, ModelLoadError
from onnxq.openvino import OpenVinoProvider
from onnxq.providers import QnnHtpProvider, get_provider, profile_placement
from onnxq.validate import Tolerances, validate

CNN = "cnn-digits"


@pytest.fixture(scope="module")
def cnn(model_path, calib_feeds, tmp_path_factory):
    """fp32 CNN, its onnxq quantization, and 8 held-out inputs as a list and a .npz."""
    fp32 = model_path(CNN)
    folder = tmp_path_factory.mktemp("validate")
    quant = folder / "cnn.quant.onnx"
    onnxq.quantize(fp32, calib_feeds(CNN, 16), output=quant, progress=False)
    feeds = calib_feeds(CNN, 24)[16:]
    npz = folder / "inputs.npz"
    np.savez(npz, input=np.concatenate([f["input"] for f in feeds]))
    return fp32, quant, feeds, npz


def _rows(report, provider):
    return {r.role: r for r in report.rows if r.provider == provider}


def test_cpu_providers_agree_with_direct_ort(cnn):
    fp32, quant, feeds, _ = cnn
    report = validate(fp32, quant, feeds, providers="cpu,cpu-unfused,reference", progress=False)
    assert report.passed and report.samples == len(feeds)
    direct = ort.InferenceSession(str(quant), providers=["CPUExecutionProvider"])
    golden = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    ref = np.concatenate([golden.run(None, f)[0] for f in feeds])
    got = np.concatenate([direct.run(None, f)[0] for f in feeds])
    cpu = _rows(report, "cpu")["candidate"]
    (out,) = cpu.outputs
    assert out.name == "logits"
    assert out.cosine == pytest.approx(metrics.cosine(ref, got), abs=1e-9)
    assert out.sqnr_db == pytest.approx(metrics.sqnr_db(ref, got), abs=1e-6)
    assert out.top1 == pytest.approx(np.mean(ref.argmax(-1) == got.argmax(-1)))
    assert cpu.latency_ms > 0 and cpu.latency_ratio > 0
    assert cpu.placement.kernels == {"CPUExecutionProvider": cpu.placement.kernels["CPUExecutionProvider"]}
    assert cpu.placement.fallback == ()
    # The unfused CPU path and onnx.reference run the QDQ graph as written: the same numbers to
    # float rounding, and the fp32 reference itself within float noise of the golden outputs.
    for provider in ("cpu-unfused", "reference"):
        rows = _rows(report, provider)
        assert rows["reference"].outputs[0].sqnr_db > 100
        assert rows["candidate"].outputs[0].cosine == pytest.approx(out.cosine, abs=1e-5)


def test_tolerance_failure_fails_the_verdict(cnn):
    fp32, quant, feeds, _ = cnn
    report = validate(
        fp32, [quant], feeds, tolerances=Tolerances(min_cosine=0.999999), timed=False, progress=False
    )
    assert not report.passed
    (row,) = [r for r in report.rows if r.role == "candidate"]
    assert row.passed is False and row.failures[0].startswith("cosine")
    doc = report.to_dict()
    assert doc["kind"] == "onnxq.validation" and doc["passed"] is False
    assert json.loads(json.dumps(doc, default=str))["rows"][1]["failures"]


def test_cli_exit_codes_and_reports(cnn, tmp_path, capsys):
    fp32, quant, _, npz = cnn
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    args = [
        "validate",
        str(fp32),
        str(quant),
        "--data",
        str(npz),
        "--no-latency",
        "--quiet",
        "--json",
        str(out_json),
        "--html",
        str(out_html),
    ]
    assert main(args) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["passed"] is True
    assert "<svg" in out_html.read_text()
    assert main([*args[:-4], "--min-cosine", "0.999999"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["validate", str(fp32), str(quant), "--data", str(npz), "--providers", "cpu,npu"]) == 2
    err = capsys.readouterr().err
    assert "unknown provider 'npu'" in err and err.count("\n") == 1
    assert main(["validate", str(fp32), str(tmp_path / "nope.onnx"), "--data", str(npz)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_inputs_raise_onnxq_errors(cnn, model_path, tmp_path):
    fp32, quant, feeds, _ = cnn
    with pytest.raises(ConfigError, match="inputs"):
        validate(fp32, model_path("tiny-bert"), feeds, progress=False)
    with pytest.raises(CalibrationDataError, match="astype"):
        validate(fp32, quant, [{"input": f["input"].astype(np.float64)} for f in feeds], progress=False)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"not a model")
        validate(fp32, bad, feeds, progress=False)
    with pytest.raises(ConfigError, match="at least one candidate"):
        validate(fp32, [], feeds, progress=False)


def test_unavailable_provider_is_a_skipped_row(cnn):
    fp32, quant, feeds, _ = cnn
    report = validate(fp32, quant, feeds[:2], providers="cuda", timed=False, progress=False)
    assert report.passed  # a provider that cannot run here does not fail the verdict, it is listed
    assert {r.status for r in report.rows} == {"skipped"}
    assert "onnxruntime-gpu" in report.rows[0].reason


def test_in_memory_models_and_inputs_untouched(cnn):
    fp32, quant, feeds, _ = cnn
    before = quant.read_bytes()
    proto = onnx.load(str(quant))
    report = validate(str(fp32), proto, feeds[:2], timed=False, progress=False)
    assert report.passed and quant.read_bytes() == before


def test_placement_matches_ort_profiling(cnn, tmp_path):
    _, quant, feeds, _ = cnn
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "p")
    session = ort.InferenceSession(str(quant), so, providers=["CPUExecutionProvider"])
    session.run(None, feeds[0])
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = {e["name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    run = get_provider("cpu").run(quant, feeds[:1], timed=False)
    assert run.placement.kernels == {"CPUExecutionProvider": len(kernels)}


def test_profile_placement_names_cpu_fallback(tmp_path):
    events = [
        {
            "cat": "Node",
            "name": "QNN_0_kernel_time",
            "args": {"provider": "QNNExecutionProvider", "op_name": "QNN"},
        },
        {
            "cat": "Node",
            "name": "/Gather_kernel_time",
            "args": {"provider": "CPUExecutionProvider", "op_name": "Gather"},
        },
        {
            "cat": "Node",
            "name": "/Gather_kernel_time",
            "args": {"provider": "CPUExecutionProvider", "op_name": "Gather"},
        },
        {"cat": "Session", "name": "model_run", "args": {}},
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    placement = profile_placement(str(path), "QNNExecutionProvider")
    assert placement.kernels == {"QNNExecutionProvider": 1, "CPUExecutionProvider": 1}
    assert placement.fallback == (("/Gather", "Gather"),)
    assert not path.exists()


qnn = pytest.mark.skipif(
    QnnHtpProvider().unavailable() is not None, reason=str(QnnHtpProvider().unavailable())
)


@qnn
def test_qnn_htp_runs_the_float_cnn_fully_on_htp(cnn):
    fp32, _, feeds, _ = cnn
    report = validate(fp32, fp32, feeds[:4], providers="qnn-htp", timed=False, progress=False)
    row = _rows(report, "qnn-htp")["candidate"]
    assert row.status == "ok", row.reason
    assert row.placement.fallback == () and set(row.placement.kernels) == {"QNNExecutionProvider"}
    assert any("static shapes" in n for n in row.notes)
    assert row.outputs[0].cosine > 0.999  # HTP runs float graphs in fp16
    assert _rows(report, "qnn-htp")["reference"].status == "skipped"  # emulated: no fp32 reference run
    assert row.latency_ms is None and any("emulated" in n for n in row.notes)


@qnn
def test_qnn_target_cnn_runs_entirely_on_htp(cnn, model_path, calib_feeds, tmp_path, capsys):
    fp32, _, feeds, npz = cnn
    quant = tmp_path / "cnn.qnn.onnx"
    onnxq.quantize(
        fp32, calib_feeds(CNN, 16), config=onnxq.QuantConfig(target="qnn"), output=quant, progress=False
    )
    report = validate(fp32, quant, feeds, providers="cpu,qnn-htp", progress=False)
    row = _rows(report, "qnn-htp")["candidate"]
    assert row.status == "ok", row.reason
    assert row.placement.fallback == () and row.placement.kernels == {"QNNExecutionProvider": 1}
    assert row.outputs[0].cosine > 0.995 and row.outputs[0].top1 == 1.0
    assert report.passed
    # The same through the CLI, with the verdict as exit code.
    assert (
        main(["validate", str(fp32), str(quant), "--data", str(npz), "--providers", "qnn-htp", "--quiet"])
        == 0
    )
    assert "QNN 1 kernel" in capsys.readouterr().out


openvino = pytest.mark.skipif(
    OpenVinoProvider().unavailable() is not None,
    reason=f"OpenVINO interpreter not configured ({OpenVinoProvider().unavailable()}); `make providers`",
)


@openvino
def test_openvino_worker_runs_the_quantized_cnn(cnn, tmp_path):
    fp32, quant, feeds, _ = cnn
    before = set(os.listdir(tmp_path.parent))
    report = validate(fp32, quant, feeds[:4], providers="openvino", timed=False, progress=False)
    row = _rows(report, "openvino")["candidate"]
    assert row.status == "ok", row.reason
    assert row.placement.kernels.get("OpenVINOExecutionProvider", 0) >= 1
    assert row.outputs[0].cosine > 0.99
    assert set(os.listdir(tmp_path.parent)) == before
