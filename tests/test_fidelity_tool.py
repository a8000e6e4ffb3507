"""``tools/fidelity.py`` on the digits CNN: fp32 accuracy is the recorded one and onnxq keeps it."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOL = REPO_ROOT / "tools" / "fidelity.py"

pytest.importorskip("sklearn")


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fidelity_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cnn_fidelity_table(
    model_path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32_path = model_path("cnn-digits")
    recorded = json.loads((fp32_path.parent / "metrics.json").read_text())["fp32_top1_accuracy"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "fidelity.json"
    argv = [
        "--models",
        "cnn",
        "--samples",
        "16",
        "--quantizers",
        "onnxq-default,ort-dynamic",
        "--latency",
        "1,2s",
    ]
    assert _load_tool().main([*argv, "--json", str(out)]) == 0

    result = json.loads(out.read_text())["models"][0]
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "onnxq-default", "ort-dynamic"]
    assert rows["fp32"]["metrics"]["top1"] == pytest.approx(recorded)
    assert rows["onnxq-default"]["error"] is None
    assert rows["onnxq-default"]["metrics"]["drop_points"] >= -0.5
    assert 0 < rows["onnxq-default"]["size"] < rows["fp32"]["size"]
    table = capsys.readouterr().out
    assert "| quantizer | top-1 | Δ vs fp32 (points) |" in table
    assert "| onnxq default | " in table
    # --latency: one ratio per setting for every quantized model, none for the fp32 reference
    assert "| latency ÷ fp32 (1 thread) | latency ÷ fp32 (2 threads, spinning) |" in table
    assert all(rows[k]["metrics"]["latency 1"] > 0 for k in ("onnxq-default", "ort-dynamic"))
    assert "latency 2s" in rows["onnxq-default"]["metrics"] and "latency 1" not in rows["fp32"]["metrics"]
    assert list(scratch.iterdir()) == []  # quantized models were written to a removed temp folder
