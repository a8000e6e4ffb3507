"""Report rendering: Markdown, JSON round trip, atomic writes, and HTML checked structurally and, when
Debian's chromium is installed, rendered in a headless browser (DOM and a non-blank screenshot)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest

from onnxq import report
from onnxq.errors import OutputError

SVG_NS = "{http://www.w3.org/2000/svg}"
PROVIDERS = ["cpu", "cuda", "qnn", "openvino"]
EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "qnn": "QNNExecutionProvider",
      "openvino": "OpenVINOExecutionProvider"}


def _row(model: str, role: str, provider: str, **kw) -> dict:
    row = {"model": model, "path": f"/models/{model}", "role": role, "provider": provider, "status": "ok",
           "reason": "", "latency_ms": None, "latency_ratio": None, "placement": None, "outputs": [],
           "failures": [], "passed": None if role == "reference" else True}
    row.update(kw)
    return row


def _out(cos: float, sqnr: float, err: float, top1: float | None = None) -> list[dict]:
    logits = {"name": "logits", "cosine": cos, "sqnr_db": sqnr, "max_abs_error": err,
              "mean_abs_error": err / 8, "top1": top1, "top5": None if top1 is None else 1.0}
    pooled = {"name": "pooler_output", "cosine": cos + (1 - cos) / 2, "sqnr_db": sqnr + 3,
              "max_abs_error": err / 2, "mean_abs_error": err / 20, "top1": None, "top5": None}
    return [logits, pooled]


def _placement(provider: str, on: int, fallback_ops: list[str]) -> dict:
    kernels = {EP[provider]: on}
    if provider != "cpu" and fallback_ops:
        kernels["CPUExecutionProvider"] = len(fallback_ops)
    fallback = [{"name": f"/embeddings/{op}_{i}", "op_type": op} for i, op in enumerate(fallback_ops)]
    return {"kernels": kernels, "fallback": fallback if provider != "cpu" else []}


def validation_doc() -> dict:
    """fp32 reference + two candidates on four providers; qnn is skipped, the dynamic model fails on cuda."""
    rows = []
    ref, qdq, dyn = "bert.onnx", "bert.int8.onnx", "bert.dyn<int8>&.onnx"
    dyn_fallback = ["MatMulInteger", "Gather"]
    for p in PROVIDERS:
        if p == "qnn":
            for m, role in ((ref, "reference"), (qdq, "candidate"), (dyn, "candidate")):
                rows.append(_row(m, role, p, status="skipped", passed=None,
                                 reason="QNNExecutionProvider is not available in this onnxruntime build"))
            continue
        exact, bad = p == "cpu", p == "cuda"
        rows.append(_row(ref, "reference", p, latency_ms=11.8 if exact else 2.1, latency_ratio=1.0,
                         outputs=_out(1.0, math.inf, 0.0, 1.0) if exact else _out(0.99999, 52.4, 0.0021, 1.0),
                         placement=_placement(p, 96, [])))
        rows.append(_row(qdq, "candidate", p, latency_ms=4.9 if exact else 1.2,
                         latency_ratio=0.42 if exact else 0.57, outputs=_out(0.9981, 24.6, 0.21, 0.98),
                         placement=_placement(p, 90, ["Gather", "Shape"] * 3)))
        rows.append(_row(dyn, "candidate", p, latency_ms=None if p == "openvino" else 6.3, latency_ratio=None,
                         outputs=_out(0.951 if bad else 0.9934, 9.8 if bad else 19.1, 1.7, 0.81),
                         placement=None if p == "openvino" else _placement(p, 70, dyn_fallback),
                         failures=["cosine 0.951 < 0.99 on logits"] if bad else [], passed=not bad))
    tolerances = {"min_cosine": 0.99, "min_sqnr_db": 12.0, "max_abs_error": None, "min_top1": None}
    return {"kind": "onnxq.validation", "version": 1, "reference": ref, "golden_provider": "cpu",
            "samples": 16, "tolerances": tolerances, "passed": False, "rows": rows}


# Error each op adds to its input's SQNR (dB): matmuls add, layer norms recover some, reshapes add nothing.
OPS = [("Add", 0.2), ("LayerNormalization", -3.4), ("MatMul", 1.5), ("Softmax", 0.4), ("Gelu", 0.6),
       ("MatMul", 1.6), ("Reshape", 0.0), ("Transpose", 0.0)]


def diff_doc(n: int = 100, jump_at: int = 37) -> dict:
    """BERT-like layers; SQNR drifts down, a MatMul at ``jump_at`` adds 25.3 dB, another at 77 adds 7.2."""
    layers, prev = [], 46.0
    for i in range(n):
        op, added = OPS[i % len(OPS)]
        added = {jump_at: 25.3, 77: 7.2}.get(i, round(added + (0.3 * math.sin(i) if added else 0.0), 2))
        sqnr = prev - added
        name = f"/encoder/layer.{i // 8}/{op.lower()}_{i}"
        layers.append({"index": i, "tensor": f"{name}/{op}_output_0", "node": name, "op_type": op,
                       "sqnr_db": round(sqnr, 2), "cosine": 1 - 10 ** (-sqnr / 10) / 2,
                       "max_abs_error": 10 ** (-sqnr / 20), "added_db": added})
        prev = sqnr
    layers[6].update(sqnr_db=math.inf, added_db=math.nan, op_type="Shape", cosine=1.0, max_abs_error=0.0)
    layers[7].update(sqnr_db=None, added_db=None, cosine=None)  # not measured
    layers[min(50, n - 1)]["tensor"] = "<b>&quot;weird' name</b>"
    ranked = [la for la in layers if isinstance(la["added_db"], float) and not math.isnan(la["added_db"])]
    ranked.sort(key=lambda la: -la["added_db"])
    keys = ("index", "tensor", "node", "op_type", "sqnr_db", "added_db")
    outputs = [{"name": "logits", "cosine": 0.9981, "sqnr_db": 21.7, "max_abs_error": 0.21,
                "mean_abs_error": 0.02}]
    return {"kind": "onnxq.diff", "version": 1, "reference": "bert.onnx", "candidate": "bert.int8.onnx",
            "providers": ["cpu", "cpu"], "samples": 16, "matched": n, "threshold_db": 6.0, "layers": layers,
            "ranking": [la["tensor"] for la in ranked[:20]], "outputs": outputs,
            "first_jump": {k: layers[jump_at][k] for k in keys} if jump_at < n else None}


def edge_docs() -> list[dict]:
    """Documents with missing keys, nulls, empty lists, and no jump."""
    diff = diff_doc(8, jump_at=99)
    diff.update(first_jump=None, ranking=[])
    bare_diff = {"kind": "onnxq.diff", "layers": [], "outputs": [], "first_jump": None}
    skipped = validation_doc()
    skipped["rows"] = [r for r in skipped["rows"] if r["status"] == "skipped"]
    skipped["passed"] = None
    return [diff, bare_diff, skipped, {"kind": "onnxq.validation", "rows": []},
            {"kind": "onnxq.validation", "tolerances": None, "rows": [{"model": None, "outputs": None}]}]


# --- Markdown -----------------------------------------------------------------------------------------
def test_markdown_validation() -> None:
    md = report.to_markdown(validation_doc())
    assert md.splitlines()[0] == "# onnxq validation: FAIL (tolerances: cosine ≥ 0.9900, SQNR ≥ 12.0 dB)"
    table = [line for line in md.splitlines() if line.startswith("| bert")]
    assert len(table) == 12  # one per (model, provider)
    skipped = [line for line in table if "| qnn |" in line]
    assert len(skipped) == 3 and all("not available in this onnxruntime build" in line for line in skipped)
    failing = next(line for line in table if "dyn" in line and "| cuda |" in line)
    assert "ok (fails)" in failing and "cosine 0.951 < 0.99 on logits" in failing
    qdq_cuda = next(line for line in table if "bert.int8.onnx | candidate | cuda" in line)
    assert "CUDA 90 kernels, 6 CPU fallback: Gather ×3, Shape ×3" in qdq_cuda
    cells = ("| logits / pooler_output | 0.9981 / 0.9990 | 24.6 / 27.6 | 0.21 / 0.105 | 98.0% / — "
             "| 1.20 | 0.57× |")
    assert cells in qdq_cuda
    ref_cpu = next(line for line in table if "| reference | cpu |" in line)
    assert "| 1.0000 / 1.0000 | inf / inf | 0 / 0 |" in ref_cpu and "| CPU 96 kernels |" in ref_cpu
    assert all(line.count(" | ") == 12 for line in table)  # no cell broke the table


def test_markdown_diff() -> None:
    md = report.to_markdown(diff_doc())
    assert "First jump at layer 37: /encoder/layer.4/matmul_37/MatMul_output_0 (MatMul" in md
    assert "added 25.3 dB" in md and "jump threshold 6.0 dB" in md
    top = md.split("## Top layers by added error")[1].strip().splitlines()
    assert top[2].startswith("| 37 | /encoder/layer.4/matmul_37/MatMul_output_0 | MatMul |")
    assert len(top) == 22  # header, rule, 20 ranked layers
    assert "| logits | 0.9981 | 21.7 |" in md


@pytest.mark.parametrize(("provider", "placement", "text"), [
    ("cpu-unfused", {"kernels": {"CPUExecutionProvider": 12}, "fallback": []}, "CPU 12 kernels"),
    ("qnn-htp", {"kernels": {"QNNExecutionProvider": 1, "CPUExecutionProvider": 3},
                 "fallback": [{"name": "a", "op_type": "Gather"}, {"name": "b", "op_type": "Shape"},
                              {"name": "c", "op_type": "Gather"}]},
     "QNN 1 kernel, 3 CPU fallback: Gather ×2, Shape"),
    ("qnn-htp", {"kernels": {"CPUExecutionProvider": 2}, "fallback": [{"name": "a", "op_type": "Add"}] * 2},
     "2 CPU fallback: Add ×2"),
    ("trt", {"kernels": {"TensorrtExecutionProvider": 5, "CUDAExecutionProvider": 2}},
     "Tensorrt 5 kernels, CUDA 2 kernels"),
    ("cuda", {"kernels": {}, "fallback": []}, "no kernels"),
])
def test_placement_text(provider: str, placement: dict, text: str) -> None:
    doc = {"kind": "onnxq.validation", "rows": [_row("m.onnx", "candidate", provider, placement=placement)]}
    assert f"| {text} |" in report.to_markdown(doc)
    check_html_structure(report.to_html(doc), 2)


@pytest.mark.parametrize("doc", edge_docs(), ids=lambda d: d["kind"])
def test_markdown_edge_cases(doc: dict) -> None:
    before = copy.deepcopy(doc)
    md = report.to_markdown(doc)
    assert md.startswith("# onnxq ")
    assert json.dumps(doc, sort_keys=True, default=str) == json.dumps(before, sort_keys=True, default=str)


def test_no_jump_and_no_ranking_falls_back_to_sorting() -> None:
    md = report.to_markdown(edge_docs()[0])
    assert "No layer adds more than 6.0 dB of error." in md
    table = md.split("## Top layers")[1].splitlines()
    rows = [line.split(" | ")[0] for line in table if line.startswith("| ")]
    assert rows[1:] == ["| 2", "| 5", "| 3", "| 4", "| 0", "| 1", "| 6", "| 7"]  # nan and null ranked last
    assert "| 6 | /encoder/layer.0/reshape_6/Reshape_output_0 | Shape | inf | nan | 1.0000 | 0 |" in md
    assert "| 7 | <b>&quot;weird' name</b> | Transpose | — | — | — |" in md


def test_unknown_kind_is_refused() -> None:
    for render in (report.to_markdown, report.to_html):
        with pytest.raises(OutputError, match=r"'onnxq\.validation' or 'onnxq\.diff'"):
            render({"kind": "something.else"})


# --- JSON ---------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("doc", [validation_doc(), diff_doc()], ids=["validation", "diff"])
def test_json_round_trip(doc: dict) -> None:
    text = report.to_json(doc)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert text == report.to_json(json.loads(json.dumps(doc)))  # key order of the input does not matter
    assert _same(report.from_json(text), doc)
    assert text.endswith("\n") and text.startswith('{\n  "')


def test_json_keeps_names_that_look_like_numbers() -> None:
    doc = {"kind": "onnxq.diff", "layers": [{"tensor": "nan", "op_type": "inf", "sqnr_db": -math.inf}],
           "ranking": ["nan"], "outputs": [{"name": "-inf", "cosine": math.nan}]}
    back = report.from_json(report.to_json(doc))
    assert back["layers"][0]["tensor"] == "nan" and back["ranking"] == ["nan"]
    assert back["outputs"][0]["name"] == "-inf" and math.isnan(back["outputs"][0]["cosine"])
    assert back["layers"][0]["sqnr_db"] == -math.inf


def test_json_accepts_numpy_scalars() -> None:
    np = pytest.importorskip("numpy")
    text = report.to_json({"a": np.float32(np.inf), "b": np.int64(3), "c": np.float64(0.5)})
    assert json.loads(text) == {"a": "inf", "b": 3, "c": 0.5}


# --- files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".html", ".md", ".HTML"])
def test_write_report_picks_format(tmp_path: Path, suffix: str) -> None:
    path = report.write_report(diff_doc(), tmp_path / f"r{suffix}")
    text = path.read_text(encoding="utf-8")
    first = {".json": "{", ".md": "# onnxq diff"}.get(suffix.lower(), "<!DOCTYPE html>")
    assert text.startswith(first)
    assert os.listdir(tmp_path) == [path.name]


def test_write_report_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OutputError, match=r"\.json, \.html or \.md") as info:
        report.write_report(diff_doc(), tmp_path / "r.pdf")
    assert "\n" not in str(info.value)
    with pytest.raises(OutputError, match="is not an existing folder"):
        report.write_report(diff_doc(), tmp_path / "missing" / "r.html")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not an existing folder"):
        report.write_report(diff_doc(), tmp_path / "file" / "r.html")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OutputError, match="Permission denied"):
            report.write_report(diff_doc(), tmp_path / "ro" / "r.html")
        (tmp_path / "ro").rmdir()
    (tmp_path / "adir.md").mkdir()
    with pytest.raises(OutputError, match=r"adir\.md"):
        report.write_report(diff_doc(), tmp_path / "adir.md")

    def fail(*_args, **_kw) -> None:
        raise PermissionError(13, "Permission denied")

    (tmp_path / "keep.md").write_text("old")
    with monkeypatch.context() as patch:  # an unwritable folder, as seen by a user who is not root
        patch.setattr(report.tempfile, "mkstemp", fail)
        with pytest.raises(OutputError, match=r"keep\.md: Permission denied$"):
            report.write_report(diff_doc(), tmp_path / "keep.md")
    monkeypatch.setattr(report.os, "replace", fail)  # fails after the temp file was written
    with pytest.raises(OutputError, match="Permission denied"):
        report.write_report(diff_doc(), tmp_path / "keep.md")
    assert sorted(os.listdir(tmp_path)) == ["adir.md", "file", "keep.md"]  # no temp file left
    assert (tmp_path / "keep.md").read_text() == "old"


# --- HTML: structure ----------------------------------------------------------------------------------
class _Strict(HTMLParser):
    """Collects tags and attributes; fails on unbalanced tags."""

    VOID: ClassVar[set[str]] = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html_structure(page: str, svgs_expected: int) -> ET.Element:
    """Well-formed as XML and as HTML, self-contained, every SVG a valid XML document; returns the root."""
    assert page.startswith("<!DOCTYPE html>\n")
    root = ET.fromstring(page.split("\n", 1)[1])  # the whole page is well-formed XML
    parser = _Strict()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    for tag, name, value in parser.attrs:
        assert name not in ("src", "href", "srcset", "action", "xlink:href"), f"<{tag} {name}={value}>"
        assert not name.startswith("on"), f"event handler <{tag} {name}>"
    assert not re.search(r"<script|<link|<iframe|<object|<embed|<img|@import|url\(", page, re.I)
    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    assert len(svgs) == svgs_expected
    for svg in svgs:
        ET.fromstring(svg)
    return root


def _svg_titles(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG_NS}title")]


def test_html_validation_structure() -> None:
    root = check_html_structure(report.to_html(validation_doc()), 2)
    verdict = next(e for e in root.iter("div") if e.get("id") == "verdict")
    assert verdict.get("class") == "verdict fail" and verdict.text.startswith("FAIL")
    svgs = list(root.iter(f"{SVG_NS}svg"))
    assert len(svgs) == 2  # accuracy bars and placement
    bars = [r for r in svgs[0].iter(f"{SVG_NS}rect") if "bar" in (r.get("class") or "")]
    assert len(bars) == 9  # 3 models × 3 providers that ran; the skipped ones are labelled instead
    assert sum("bad" in r.get("class") for r in bars) == 1
    labels = [t.text for t in svgs[0].iter(f"{SVG_NS}text")]
    assert labels.count("skipped") == 3 and "∞" in labels
    assert any("bert.dyn<int8>&.onnx on cuda" in t and "cosine 0.951" in t for t in _svg_titles(svgs[0]))
    placement_titles = _svg_titles(svgs[1])
    assert any("QNN" in t for t in placement_titles) is False  # skipped rows report no placement
    assert sum("CPU fallback" in t for t in placement_titles) == 3  # qdq on cuda and openvino, dyn on cuda
    rows = list(root.iter("tr"))
    assert len(rows) == 13 and sum(r.get("class") == "skip" for r in rows) == 3


def test_html_diff_structure() -> None:
    page = report.to_html(diff_doc())
    root = check_html_structure(page, 2)
    svgs = list(root.iter(f"{SVG_NS}svg"))
    assert len(svgs) == 2
    points = list(svgs[0].iter(f"{SVG_NS}circle"))
    assert len(points) == 100
    jump = [c for c in points if "jump" in c.get("class")]
    assert len(jump) == 1
    assert "/encoder/layer.4/matmul_37/MatMul_output_0" in jump[0].find(f"{SVG_NS}title").text
    assert any("first jump: #37" in (t.text or "") for t in svgs[0].iter(f"{SVG_NS}text"))
    assert any("<b>&quot;weird' name</b>" in t for t in _svg_titles(svgs[0]))  # escaped, read back verbatim
    assert "<b>&quot;" not in page
    hbars = [r for r in svgs[1].iter(f"{SVG_NS}rect")]
    assert len(hbars) == 20 and "bad" in hbars[0].get("class")


@pytest.mark.parametrize(("doc", "svgs"), list(zip(edge_docs(), [2, 0, 1, 0, 1], strict=True)))
def test_html_edge_cases(doc: dict, svgs: int) -> None:
    """Empty lists draw no plot (a sentence instead); the page stays well-formed."""
    root = check_html_structure(report.to_html(doc), svgs)
    assert next(e for e in root.iter("div") if e.get("id") == "verdict").text


# --- HTML: rendered in a headless browser -------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,2000",
            *extra, page.as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def render_png(html_path: Path, png: Path, tmp: Path) -> None:
    """Screenshot ``html_path`` into ``png`` with headless chromium."""
    proc = _chromium(tmp, html_path, f"--screenshot={png}")
    assert png.exists(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed; structure is checked without it")
@pytest.mark.parametrize("kind", ["validation", "diff"])
def test_html_renders_in_chromium(tmp_path: Path, kind: str) -> None:
    from PIL import Image

    doc = validation_doc() if kind == "validation" else diff_doc()
    page = report.write_report(doc, tmp_path / f"{kind}.html")
    dom = _chromium(tmp_path, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 2 and 'id="verdict"' in dom.stdout
    verdict = "FAIL (tolerances: cosine ≥ 0.9900" if kind == "validation" else "First jump at layer 37"
    assert verdict in dom.stdout
    png = tmp_path / "shot.png"
    render_png(page, png, tmp_path)
    with Image.open(png) as image:
        image.load()
        rgb = image.convert("RGB")
    assert rgb.size == (1200, 2000)
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) >= 20  # text, bars, grid: not a blank or single-colour page
    white = max(count for count, colour in colours if colour == (255, 255, 255))
    assert white < 0.97 * rgb.width * rgb.height
    for colour in ((0x3B, 0x6F, 0xD4), (0xC0, 0x39, 0x2B)):  # series blue and failure red were painted
        assert any(c == colour and n > 50 for n, c in colours), f"colour {colour} missing"
