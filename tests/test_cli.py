"""The command line as a pipeline uses it: tables on stdout, exit 0 on success and 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.cli import main


@pytest.fixture(scope="module")
def calib_npz(tmp_path_factory, model_path, calib_feeds) -> tuple[Path, Path]:
    path = model_path("tiny-bert")
    feeds = calib_feeds("tiny-bert", 8)
    npz = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(npz, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    return path, npz


def test_quantize_prints_summary_and_writes_a_valid_model(calib_npz, tmp_path, capsys) -> None:
    model, npz = calib_npz
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model), "--calib", str(npz), "-o", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "quantized nodes" in text and "MatMul" in text
    assert "fidelity vs fp32" in text and "last_hidden_state" in text
    onnx.checker.check_model(str(out), full_check=True)


def test_quantize_options_reach_the_config(calib_npz, tmp_path, capsys) -> None:
    model, npz = calib_npz
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num_samples": 4}))
    out = tmp_path / "q.onnx"
    code = main(
        [
            "quantize",
            str(model),
            "--calib",
            str(npz),
            "-o",
            str(out),
            "--config",
            str(cfg),
            "--exclude",
            "Softmax",
            "*/layer.1/*",
            "--per-tensor",
            "--quiet",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "calibration samples: 4" in text
    assert "excluded by name" in text
    q = onnx.load(str(out))
    # embedding tables keep one scale per row whatever the weights' granularity (gather_rows)
    scales = [
        i for i in q.graph.initializer if i.name.endswith("_scale") and not i.name.endswith("_row_scale")
    ]
    assert scales and all(len(s.dims) == 0 for s in scales)  # --per-tensor: scalar weight scales


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "missing.onnx", "--calib", "{npz}"], "does not exist"),
        (["quantize", "{model}", "--calib", "missing.npz"], "does not exist"),
        (["quantize", "{model}", "--calib", "{npz}", "-o", "/nonexistent-dir/q.onnx"], "does not exist"),
        (["quantize", "{model}", "--calib", "{npz}", "--config", "{badcfg}"], "unknown config keys"),
        (["inspect", "{notonnx}"], "not a valid ONNX model"),
        (["quantize", "{model}", "--calib", "{npz}", "--fallback", "int16"], "add --min-cosine"),
        (
            [
                "quantize",
                "{model}",
                "--calib",
                "{npz}",
                "--min-cosine",
                "0.99",
                "--fallback",
                "int16",
                "--weight-only",
                "int4",
            ],
            "fallback='float'",
        ),
        (["quantize", "{model}", "--calib", "{npz}", "--min-cosine", "2"], "min_cosine"),
        (["quantize", "{model}", "--calib", "{npz}", "--latency-spinning"], "--latency-spinning only apply"),
        (["quantize", "{model}", "--calib", "{npz}", "--ranking", "measured"], "--ranking only apply"),
        (
            ["quantize", "{model}", "--calib", "{npz}", "--min-cosine", "0.9", "--latency-threads", "0"],
            "latency_threads",
        ),
        (["quantize", "{model}", "--calib", "{npz}", "--algorithm", "gptq"], "add --weight-only"),
        (
            ["quantize", "{model}", "--calib", "{npz}", "--weight-only", "nf4", "--algorithm", "awq"],
            "add --weight-only",
        ),
        (["quantize", "{model}", "--weight-only", "int4", "--algorithm", "awq"], "add --calib"),
        (
            ["quantize", "{model}", "--calib", "{npz}", "--smooth-alpha", "0.5", "--no-smoothing"],
            "contradict",
        ),
        (["quantize", "{model}", "--calib", "{npz}", "--smooth-alpha", "1.5"], "[0, 1]"),
        (
            ["quantize", "{model}", "--calib", "{npz}", "--bias-correction", "--method", "dynamic"],
            "static calibration",
        ),
        (
            ["quantize", "{model}", "--calib", "{npz}", "--weight-only", "int8", "--equalize"],
            "equalization=None for weight-only",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(calib_npz, tmp_path, capsys, argv, needle) -> None:
    model, npz = calib_npz
    badcfg = tmp_path / "bad.json"
    badcfg.write_text(json.dumps({"calibrate": "minmax"}))
    notonnx = tmp_path / "notes.onnx"
    notonnx.write_text("this is not a model\n")
    args = [a.format(model=model, npz=npz, badcfg=badcfg, notonnx=notonnx) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxq: error:") and needle in err[0]


def test_algorithm_flags_reach_the_config() -> None:
    """--algorithm, --smooth-alpha, --equalize and --bias-correction set the config fields the
    library takes (the same config as the Python API's)."""
    from onnxq.cli import _config, _parser

    def config(*flags: str) -> onnxq.QuantConfig:
        return _config(_parser().parse_args(["quantize", "m.onnx", "--calib", "c.npz", *flags]))

    wo = ("--weight-only", "int4", "--block-size", "32")
    gptq = onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.GPTQ())
    assert config(*wo, "--algorithm", "gptq") == gptq
    assert config(*wo, "--algorithm", "awq").algorithm == onnxq.AWQ()
    assert config(*wo, "--algorithm", "awq-gptq").algorithm == onnxq.GPTQ(awq=onnxq.AWQ())
    assert config("--smooth-alpha", "0.8").smoothing == onnxq.SmoothQuant(alpha=0.8)
    assert config("--target", "qnn", "--smooth-alpha", "0.5").smoothing == onnxq.SmoothQuant(alpha=0.5)
    both = config("--per-tensor", "--equalize", "--bias-correction")
    assert both.equalization == onnxq.CrossLayerEqualization()
    assert both.bias_correction == onnxq.BiasCorrection()


def test_weight_only_algorithm_writes_what_the_library_writes(calib_npz, calib_feeds, tmp_path, capsys):
    model, npz = calib_npz
    out = tmp_path / "gptq.onnx"
    argv = ["quantize", str(model), "--calib", str(npz), "-o", str(out), "--quiet"]
    assert main([*argv, "--weight-only", "int4", "--block-size", "32", "--algorithm", "gptq"]) == 0
    assert "GPTQ layer by layer" in capsys.readouterr().out
    config = onnxq.QuantConfig.weight_only("int4", 32, algorithm=onnxq.GPTQ())
    lib = onnxq.quantize(model, calib_feeds("tiny-bert", 8), config=config, output=tmp_path / "lib.onnx")
    assert out.read_bytes() == lib.output_path.read_bytes()


def test_inspect_plan_lists_decisions(model_path, capsys) -> None:
    assert main(["inspect", str(model_path("cnn-digits")), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "BatchNormalization" in text  # the op histogram shows the model as stored
    assert "would quantize: Conv 3" in text  # the plan sees the BN folded away
    assert "Gemm" in text and "opsets:" in text


def test_console_entry_point_exit_code(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "onnxq", "inspect", str(tmp_path / "none.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _first_activation_scales(path: Path) -> list[float]:
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [
        float(inits[n.input[1]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].ndim == 0
    ]


def test_quantize_attention_flag(calib_npz, tmp_path, capsys) -> None:
    """tiny-bert (2 layers): the default keeps the 4 attention MatMuls float and says so; with
    ``--quantize-attention`` they are quantized too (12 weight MatMuls + 4)."""
    model, npz = calib_npz
    counts = {}
    for flag in ([], ["--quantize-attention"]):
        out = tmp_path / f"q{len(flag)}.onnx"
        assert main(["quantize", str(model), "--calib", str(npz), "-o", str(out), "--quiet", *flag]) == 0
        text = capsys.readouterr().out
        counts[bool(flag)] = ("activation x activation MatMul (attention)" in text, text)
        quantized = onnx.load(str(out), load_external_data=False)
        dq_fed = sum(
            1
            for n in quantized.graph.node
            if n.op_type == "MatMul"
            and all(
                any(p.op_type == "DequantizeLinear" and p.output[0] == i for p in quantized.graph.node)
                for i in n.input
            )
        )
        counts[bool(flag)] = (counts[bool(flag)][0], dq_fed)
    assert counts[False] == (True, 12) and counts[True] == (False, 16), counts


def test_method_flag_changes_the_calibrated_scales(calib_npz, tmp_path) -> None:
    model, npz = calib_npz
    outs = {}
    for method in ("minmax", "mse"):
        outs[method] = tmp_path / f"{method}.onnx"
        argv = ["quantize", str(model), "--calib", str(npz), "-o", str(outs[method]), "--quiet"]
        assert main([*argv, "--method", method, "--no-smoothing"]) == 0
    minmax, mse = (_first_activation_scales(outs[m]) for m in ("minmax", "mse"))
    assert len(minmax) == len(mse) > 0
    assert all(p <= m * (1 + 1e-6) for p, m in zip(mse, minmax, strict=True))
    assert any(p < m * 0.999 for p, m in zip(mse, minmax, strict=True))


def test_inspect_plan_for_weight_only_and_dynamic_configs(model_path, tmp_path, capsys) -> None:
    weight_only = tmp_path / "wo.json"
    onnxq.QuantConfig.weight_only("int4", 32).to_json(weight_only)
    assert main(["inspect", str(model_path("tiny-llama")), "--plan", "--config", str(weight_only)]) == 0
    out = capsys.readouterr().out
    assert "plan: weight-only int4" in out and "would quantize: Gather 1, MatMul 15" in out
    dynamic = tmp_path / "dyn.json"
    onnxq.QuantConfig(calibration=onnxq.Dynamic()).to_json(dynamic)
    assert main(["inspect", str(model_path("tiny-bert")), "--plan", "--config", str(dynamic)]) == 0
    assert "activations to calibrate: none (dynamic" in capsys.readouterr().out


def test_min_cosine_runs_mixed_precision(calib_npz, tmp_path, capsys) -> None:
    """``--min-cosine`` between the all-8-bit model's cosine and 1: some nodes stay float, the
    report says which and what they cost, and the file is what the API writes for that config."""
    from onnxq.mixed_precision import MixedPrecision, quantize_mixed

    model, npz = calib_npz
    with np.load(npz) as data:
        feeds = [{k: data[k][i : i + 1] for k in data.files} for i in range(len(data[data.files[0]]))]
    budget = MixedPrecision(min_cosine=0.9, measure_latency=False)
    base = quantize_mixed(model, feeds, budget, output=tmp_path / "base.onnx", progress=False)
    target = 1 - (1 - base.before.min_cosine()) / 2
    out = tmp_path / "amp.onnx"
    argv = [
        "quantize",
        str(model),
        "--calib",
        str(npz),
        "-o",
        str(out),
        "--quiet",
        "--min-cosine",
        f"{target:.9f}",
        "--latency-threads",
        "1",
        "--ranking",
        "measured",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "budget output cosine >=" in text and ": MET with" in text
    assert "by output SQNR it gains alone" in text and "ranking measured: each of the" in text
    assert "nodes kept in float:" in text and "latency on ORT CPU EP (1 thread, spinning off)" in text
    assert "size: fp32" in text
    assert f"written: {out}" in text
    api = quantize_mixed(
        model,
        feeds,
        MixedPrecision(min_cosine=float(f"{target:.9f}"), measure_latency=False),
        output=tmp_path / "api.onnx",
        progress=False,
    )
    assert api.chosen and out.read_bytes() == api.output_path.read_bytes()


def test_unmet_budget_exits_1_and_still_writes(calib_npz, tmp_path, capsys) -> None:
    model, npz = calib_npz
    out = tmp_path / "amp.onnx"
    argv = ["quantize", str(model), "--calib", str(npz), "-o", str(out), "--quiet"]
    assert main([*argv, "--min-cosine", "0.9999999", "--max-float-nodes", "0"]) == 1
    assert ": NOT MET with 0 of" in capsys.readouterr().out and out.is_file()
