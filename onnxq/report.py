"""Render the report documents of ``onnxq validate`` and ``onnxq diff`` (schema: docs/reports.md).

Guarantees: rendering never mutates the document; missing keys and nulls render as "—"; inf/nan render
as text. HTML is one self-contained, well-formed page (inline CSS and SVG, no scripts, no external
references) in which every string from the document is escaped. ``write_report`` writes atomically.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from onnxq.errors import OutputError

__all__ = ["from_json", "to_html", "to_json", "to_markdown", "write_report"]

_TOKENS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
# Keys whose string values are names, never numbers: a tensor called "nan" stays a string.
_TEXT_KEYS = {"kind", "reference", "candidate", "golden_provider", "model", "path", "role", "provider",
              "status", "reason", "name", "tensor", "node", "op_type", "providers", "ranking", "failures",
              "fallback", "notes"}
_COLORS = ["#3b6fd4", "#e08a1e", "#2e9e5b", "#9b59b6", "#c0392b", "#16a2b8"]
_DASH = "—"
Cell = str | list[str]  # a list is one value per model output
Row = tuple[list[Cell], str]  # table cells and a CSS class for the row


# --- JSON -------------------------------------------------------------------------------------------
def _encode(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else ("nan" if math.isnan(f) else ("inf" if f > 0 else "-inf"))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} into a report document")


def _decode(value: Any, text: bool = False) -> Any:
    if isinstance(value, dict):
        return {k: _decode(v, text or k in _TEXT_KEYS) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, text) for v in value]
    if isinstance(value, str) and not text and value in _TOKENS:
        return _TOKENS[value]
    return value


def to_json(doc: dict) -> str:
    """Deterministic JSON (sorted keys, indent 2, trailing newline); inf/-inf/nan become strings."""
    return json.dumps(_encode(doc), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def from_json(text: str) -> dict:
    """Parse ``to_json`` output, turning "inf"/"-inf"/"nan" back into floats (never in name fields)."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("a report document is a JSON object")
    return _decode(doc)


# --- values -----------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """A float, or None when the value is missing or not a number (strings "inf"/"nan" are numbers)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return _TOKENS.get(value.strip().lower())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _s(value: Any, default: str = "?") -> str:
    return default if value is None else str(value)


def _fmt(value: Any, spec: str = ".3g", suffix: str = "") -> str:
    f = _num(value)
    if f is None:
        return _DASH
    if not math.isfinite(f):
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    return f"{f:{spec}}{suffix}"


def _cos(value: Any) -> str:
    f = _num(value)
    return _fmt(f, ".6f" if f is not None and 0.9999 < f < 1 else ".4f")


def _pct(value: Any) -> str:
    f = _num(value)
    return _fmt(None if f is None else f * 100, ".1f", "%")


def _short_ep(ep: str) -> str:
    return ep.removesuffix("ExecutionProvider") or ep


def _kind(doc: dict) -> str:
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in ("onnxq.validation", "onnxq.diff"):
        raise OutputError(f"cannot render a report of kind {kind!r}: "
                          "expected 'onnxq.validation' or 'onnxq.diff'")
    return kind


def _rows(doc: dict) -> list[dict]:
    return [r for r in doc.get("rows") or [] if isinstance(r, dict)]


def _kernels(row: dict) -> tuple[dict[str, int], list[str]]:
    placement = row.get("placement") or {}
    counts = {str(k): _num(v) for k, v in (placement.get("kernels") or {}).items()}
    kernels = {k: int(v) if v is not None and math.isfinite(v) else 0 for k, v in counts.items()}
    return kernels, [_s(n.get("op_type")) for n in placement.get("fallback") or [] if isinstance(n, dict)]


def _split_placement(row: dict) -> tuple[int, int]:
    """(kernels on the row's provider, kernels that fell back to the CPU). Only CPU kernels and no
    fallback list means the provider is a CPU one: nothing fell back."""
    kernels, ops = _kernels(row)
    cpu = kernels.get("CPUExecutionProvider", 0)
    if not ops and set(kernels) <= {"CPUExecutionProvider"}:
        return cpu, 0
    return sum(kernels.values()) - cpu, cpu


def _placement_text(row: dict) -> str:
    """E.g. "QNN 1 kernel, 3 CPU fallback: Gather ×2, Shape" or "CPU 96 kernels"."""
    if not row.get("placement"):
        return _DASH
    kernels, ops = _kernels(row)
    _, cpu = _split_placement(row)
    parts = [f"{_short_ep(ep)} {n} kernel{'s' * (n != 1)}" for ep, n in kernels.items()
             if not (cpu or ops) or ep != "CPUExecutionProvider"]
    if not (cpu or ops):
        return ", ".join(parts) or "no kernels"
    counted = [f"{op} ×{n}" if n > 1 else op for op, n in Counter(ops).most_common()]
    more = ", …" if len(counted) > 6 else ""
    parts.append(f"{cpu} CPU fallback" + (f": {', '.join(counted[:6])}{more}" if counted else ""))
    return ", ".join(parts)


def _verdict(doc: dict) -> str:
    tol = doc.get("tolerances") or {}
    named = [("cosine ≥ ", "min_cosine", _cos), ("SQNR ≥ ", "min_sqnr_db", lambda v: _fmt(v, ".1f", " dB")),
             ("max abs err ≤ ", "max_abs_error", _fmt), ("top-1 ≥ ", "min_top1", _pct)]
    limits = [label + fn(tol[key]) for label, key, fn in named if tol.get(key) is not None]
    word = {True: "PASS", False: "FAIL"}.get(doc.get("passed"), "UNKNOWN")
    return f"{word} (tolerances: {', '.join(limits) if limits else 'none set'})"


def _per_output(outputs: list[dict], key: str, fn: Any) -> Cell:
    return [fn(o.get(key)) for o in outputs] or _DASH


def _validation_table(doc: dict) -> tuple[list[str], list[Row]]:
    head = ["model", "role", "provider", "status", "output", "cosine", "SQNR dB", "max abs err", "top-1",
            "latency ms", "ratio", "placement", "notes"]
    body: list[Row] = []
    for r in _rows(doc):
        outs = [o for o in r.get("outputs") or [] if isinstance(o, dict)]
        status = _s(r.get("status"))
        ran = status == "ok"
        notes = "; ".join(
            [str(f) for f in r.get("failures") or []] + ([str(r["reason"])] if r.get("reason") else [])
            + [str(n) for n in r.get("notes") or []]
        )
        cells = [_s(r.get("model")), _s(r.get("role"), ""), _s(r.get("provider")),
                 status + (" (fails)" if r.get("passed") is False else "")]
        if ran:
            cells += [[_s(o.get("name")) for o in outs] or _DASH, _per_output(outs, "cosine", _cos),
                      _per_output(outs, "sqnr_db", lambda v: _fmt(v, ".1f")),
                      _per_output(outs, "max_abs_error", _fmt), _per_output(outs, "top1", _pct),
                      _fmt(r.get("latency_ms"), ".2f"), _fmt(r.get("latency_ratio"), ".2f", "×"),
                      _placement_text(r), notes or _DASH]
        else:
            cells += [_DASH] * 8 + [notes or _DASH]
        klass = "bad" if r.get("passed") is False or status == "failed" else ("skip" if not ran else "ok")
        body.append((cells, klass))
    return head, body


def _outputs_table(doc: dict) -> tuple[list[str], list[Row]]:
    head = ["output", "cosine", "SQNR dB", "max abs err", "mean abs err"]
    return head, [([_s(o.get("name")), _cos(o.get("cosine")), _fmt(o.get("sqnr_db"), ".1f"),
                    _fmt(o.get("max_abs_error")), _fmt(o.get("mean_abs_error"))], "ok")
                  for o in doc.get("outputs") or [] if isinstance(o, dict)]


def _top_layers(doc: dict, n: int = 20) -> list[dict]:
    """The ranking's layers in order; without a ranking, the layers sorted by added_db (nan/null last)."""
    layers = [la for la in doc.get("layers") or [] if isinstance(la, dict)]
    by_tensor = {la.get("tensor"): la for la in layers}
    ranked = [by_tensor[t] for t in doc.get("ranking") or [] if t in by_tensor]
    if not ranked:
        def key(la: dict) -> float:
            f = _num(la.get("added_db"))
            return -math.inf if f is None or math.isnan(f) else f
        ranked = sorted(layers, key=key, reverse=True)
    return ranked[:n]


def _layers_table(doc: dict) -> tuple[list[str], list[Row]]:
    head = ["index", "tensor", "op", "SQNR dB", "added dB", "cosine", "max abs err"]
    jump = _num(doc.get("threshold_db"))
    return head, [([_fmt(la.get("index"), ".0f"), _s(la.get("tensor")), _s(la.get("op_type")),
                    _fmt(la.get("sqnr_db"), ".1f"), _fmt(la.get("added_db"), ".1f"), _cos(la.get("cosine")),
                    _fmt(la.get("max_abs_error"))],
                   "bad" if jump is not None and (_num(la.get("added_db")) or 0) > jump else "ok")
                  for la in _top_layers(doc)]


def _jump_text(doc: dict) -> str:
    j = doc.get("first_jump")
    if not isinstance(j, dict):
        return f"No layer adds more than {_fmt(doc.get('threshold_db'), '.1f', ' dB')} of error."
    return (f"First jump at layer {_fmt(j.get('index'), '.0f')}: {_s(j.get('tensor'))} "
            f"({_s(j.get('op_type'))}, node {_s(j.get('node'))}): "
            f"SQNR {_fmt(j.get('sqnr_db'), '.1f', ' dB')}, added {_fmt(j.get('added_db'), '.1f', ' dB')}.")


def _diff_summary(doc: dict) -> str:
    providers = " → ".join(str(p) for p in doc.get("providers") or []) or _DASH
    return (f"{_s(doc.get('candidate'))} vs {_s(doc.get('reference'))} · providers {providers} · "
            f"{_fmt(doc.get('samples'), '.0f')} samples · {_fmt(doc.get('matched'), '.0f')} tensors matched"
            f" · jump threshold {_fmt(doc.get('threshold_db'), '.1f', ' dB')}")


# --- Markdown ---------------------------------------------------------------------------------------
def _md_table(head: list[str], rows: list[Row]) -> str:
    def cell(c: Cell) -> str:
        s = " / ".join(c) if isinstance(c, list) else c
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in cells) + " |" for cells, _ in rows]
    return "\n".join(lines) if rows else "(none)"


def to_markdown(doc: dict) -> str:
    """A Markdown report: verdict and rows (validation) or outputs, first jump and top layers (diff)."""
    if _kind(doc) == "onnxq.validation":
        return (f"# onnxq validation: {_verdict(doc)}\n\nReference: {_s(doc.get('reference'))} · golden "
                f"provider {_s(doc.get('golden_provider'))} · {_fmt(doc.get('samples'), '.0f')} samples\n\n"
                f"{_md_table(*_validation_table(doc))}\n")
    return (f"# onnxq diff\n\n{_diff_summary(doc)}\n\n## Outputs\n\n{_md_table(*_outputs_table(doc))}\n\n"
            f"## First jump\n\n{_jump_text(doc)}\n\n## Top layers by added error\n\n"
            f"{_md_table(*_layers_table(doc))}\n")


# --- SVG --------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _t(x: float, y: float, s: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_e(s)}</text>'


def _rect(x: float, y: float, w: float, h: float, cls: str, tip: str = "", fill: str = "") -> str:
    fill, title = (f' fill="{fill}"' if fill else ""), (f"<title>{_e(tip)}</title>" if tip else "")
    box = f'x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}"'
    return f'<rect {box} class="{cls}"{fill}>{title}</rect>'


def _clip(name: str, n: int) -> str:
    return name if len(name) <= n else "…" + name[1 - n:]


def _svg(width: float, height: float, label: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_e(label)}" class="plot">'
            f"<title>{_e(label)}</title>{''.join(body)}</svg>")


def _range(values: list[float], cosine: bool) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    if cosine:
        return min(0.99, max(-1.0, math.floor((min(finite) - 0.005) * 100) / 100)), 1.0
    return min(0.0, math.floor(min(finite) / 10) * 10), max(10.0, math.ceil(max(finite) / 10) * 10)


def _y_axis(lo: float, hi: float, left: float, top: float, height: float, right: float) -> list[str]:
    out = []
    for i in range(5):
        v, y = lo + (hi - lo) * i / 4, top + height - height * i / 4
        out.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(_t(left - 6, y + 4, f"{v:.3g}", "end"))
    return out


def _worst(row: dict, key: str) -> float | None:
    vals = [_num(o.get(key)) for o in row.get("outputs") or [] if isinstance(o, dict)]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return min(vals) if vals else None


def _bar_chart(doc: dict) -> str:
    """Grouped bars: worst-output SQNR (or cosine when no SQNR) per model, grouped by provider."""
    rows = _rows(doc)
    if not rows:
        return "<p>No rows.</p>"
    providers = list(dict.fromkeys(_s(r.get("provider")) for r in rows))
    models = list(dict.fromkeys(_s(r.get("model")) for r in rows))
    use_sqnr = any(_worst(r, "sqnr_db") is not None for r in rows)
    key, label = ("sqnr_db", "SQNR dB (worst output)") if use_sqnr else ("cosine", "cosine (worst output)")
    lo, hi = _range([v for r in rows if (v := _worst(r, key)) is not None], not use_sqnr)
    tol = _num((doc.get("tolerances") or {}).get("min_sqnr_db" if use_sqnr else "min_cosine"))
    left, top, ph, gw = 60, 30, 220, max(120, 40 * len(models) + 30)
    right = left + gw * len(providers)
    bw = (gw - 30) / len(models)
    y = lambda v: top + ph - ph * (min(max(v, lo), hi) - lo) / (hi - lo)  # noqa: E731
    body = [_t(left, 18, label, extra=' class="axis"'), *_y_axis(lo, hi, left, top, ph, right)]
    cells = {(_s(r.get("provider")), _s(r.get("model"))): r for r in rows}
    for gi, prov in enumerate(providers):
        gx = left + gi * gw + 15
        body.append(_t(gx + (gw - 30) / 2, top + ph + 18, prov, "middle"))
        for mi, model in enumerate(models):
            if (row := cells.get((prov, model))) is None:
                continue
            x, v, status = gx + mi * bw, _worst(row, key), _s(row.get("status"))
            note = "; ".join(str(f) for f in row.get("failures") or []) or str(row.get("reason") or "")
            tip = f"{model} on {prov}: {status}, {label} {_fmt(v, '.4g')}" + (f" — {note}" if note else "")
            if status != "ok" or v is None:
                cx, cy = x + bw / 2 + 4, top + ph - 6
                word = status if status in ("skipped", "failed") else "n/a"
                body.append(f"<g><title>{_e(tip)}</title>"
                            + _t(cx, cy, word, extra=f' class="na" transform="rotate(-90 {cx:.1f} {cy:.1f})"')
                            + "</g>")
                continue
            yv, bad = y(v), " bad" * (row.get("passed") is False)
            body.append(_rect(x + 2, yv, bw - 4, top + ph - yv, f"bar{bad}", tip, _COLORS[mi % len(_COLORS)]))
            if v == math.inf:
                body.append(_t(x + bw / 2, top - 4, "∞", "middle"))
    if tol is not None and lo <= tol <= hi:
        body.append(f'<line x1="{left}" x2="{right}" y1="{y(tol):.1f}" y2="{y(tol):.1f}" class="tol">'
                    f"<title>tolerance {_e(_fmt(tol, '.4g'))}</title></line>")
        body.append(_t(right + 4, y(tol) + 4, f"tolerance {_fmt(tol, '.4g')}", extra=' class="tollabel"'))
    for mi, model in enumerate(models):  # legend, right of the plot
        lx, ly = right + 20, top + 30 + 20 * mi
        body.append(_rect(lx, ly - 10, 12, 12, "key", fill=_COLORS[mi % len(_COLORS)]))
        body.append(_t(lx + 18, ly, _clip(model, 40)))
    height = max(top + ph + 30, top + 40 + 20 * len(models))
    return _svg(right + 320, height, f"{label} per model and provider", body)


def _placement_chart(doc: dict) -> str:
    """Stacked horizontal bars: kernels on the provider vs CPU fallback, per row that reports placement."""
    rows = [r for r in _rows(doc) if r.get("placement") and r.get("status") == "ok"]
    if not rows:
        return "<p>No provider reported kernel placement.</p>"
    left, bw, rh = 330, 600, 26
    body = [_t(left, 16, "kernels on the provider (blue) vs CPU fallback (orange)", extra=' class="axis"')]
    for i, r in enumerate(rows):
        on, cpu = _split_placement(r)
        y, won = 28 + i * rh, bw * on / max(1, on + cpu)
        name = f"{_s(r.get('model'))} @ {_s(r.get('provider'))}"
        body.append(_t(left - 8, y + 15, _clip(name, 48), "end"))
        body.append(f"<g><title>{_e(name)}: {_e(_placement_text(r))}</title>"
                    f"{_rect(left, y, won, rh - 6, 'on')}"
                    f"{_rect(left + won, y, bw - won, rh - 6, 'fallback' if cpu else 'empty')}</g>")
        body.append(_t(left + bw + 8, y + 15, f"{on} on provider, {cpu} CPU fallback"))
    return _svg(left + bw + 230, 36 + len(rows) * rh, "kernel placement per model and provider", body)


def _layer_plot(doc: dict) -> str:
    """Step plot of SQNR over the layers in graph order, the first jump marked; hover titles name tensors."""
    layers = [la for la in doc.get("layers") or [] if isinstance(la, dict)]
    if not layers:
        return "<p>No matched layers.</p>"
    vals = [_num(la.get("sqnr_db")) for la in layers]
    lo, hi = _range([v for v in vals if v is not None and not math.isnan(v)], False)
    left, top, pw, ph, n = 60, 30, 1000, 260, len(layers)
    x = lambda i: left + pw * (i + 0.5) / n  # noqa: E731
    y = lambda v: top + ph - ph * (min(max(v, lo), hi) - lo) / (hi - lo)  # noqa: E731
    body = [_t(left, 18, "SQNR dB per layer (graph order)", extra=' class="axis"'),
            *_y_axis(lo, hi, left, top, ph, left + pw),
            _t(left + pw / 2, top + ph + 34, "layer index", "middle")]
    for i in range(0, n, max(1, math.ceil(n / 10))):
        body.append(_t(x(i), top + ph + 16, _fmt(layers[i].get("index", i), ".0f"), "middle"))
    path, gap = [], True
    for i, v in enumerate(vals):
        if v is None or math.isnan(v):
            gap = True
            continue
        yv = y(v)
        path += [f"M{x(i) - pw / n / 2:.1f},{yv:.1f}" if gap else f"V{yv:.1f}", f"H{x(i) + pw / n / 2:.1f}"]
        gap = False
    body.append(f'<path d="{" ".join(path)}" class="line"/>')
    jump = doc.get("first_jump") if isinstance(doc.get("first_jump"), dict) else {}
    jump_key = (jump.get("tensor"), jump.get("index")) if jump else None
    for i, la in enumerate(layers):
        v, idx = vals[i], _fmt(la.get("index", i), ".0f")
        tip = (f"#{idx} {_s(la.get('tensor'))} ({_s(la.get('op_type'))}): SQNR {_fmt(v, '.1f', ' dB')}, "
               f"added {_fmt(la.get('added_db'), '.1f', ' dB')}")
        missing = v is None or math.isnan(v)
        yv = top + ph if missing else y(v)
        is_jump = (la.get("tensor"), la.get("index")) == jump_key
        cls = "pt jump" if is_jump else ("pt na" if missing else "pt")
        body.append(f'<circle cx="{x(i):.1f}" cy="{yv:.1f}" r="{5 if is_jump else 2.5}" class="{cls}">'
                    f"<title>{_e(tip)}</title></circle>")
        if is_jump:
            body.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{top}" y2="{top + ph}" class="jumpline">'
                        f"<title>{_e(tip)}</title></line>")
            text = f"first jump: #{idx} {_s(la.get('op_type'), '')} (+{_fmt(la.get('added_db'), '.1f')} dB)"
            anchor = ("start", 6) if i < n * 0.7 else ("end", -6)
            body.append(_t(x(i) + anchor[1], top + 12, text, anchor[0], ' class="jumplabel"'))
    return _svg(left + pw + 20, top + ph + 44, "SQNR per layer along the graph", body)


def _added_chart(doc: dict) -> str:
    """Horizontal bars of the layers that add the most error, red above the jump threshold."""
    top_layers = _top_layers(doc)
    if not top_layers:
        return "<p>No layers ranked.</p>"
    vals = [_num(la.get("added_db")) for la in top_layers]
    hi = max([10.0, *(v for v in vals if v is not None and math.isfinite(v))])
    threshold = _num(doc.get("threshold_db"))
    left, bw, rh = 420, 520, 20
    body = [_t(left, 14, "added error (dB) per layer, largest first", extra=' class="axis"')]
    for i, (la, v) in enumerate(zip(top_layers, vals, strict=True)):
        y, name = 24 + i * rh, _s(la.get("tensor"))
        w = 0.0 if v is None or math.isnan(v) else (bw if v == math.inf else bw * max(0.0, v) / hi)
        bad = threshold is not None and v is not None and v > threshold
        tip = f"#{_fmt(la.get('index'), '.0f')} {name} ({_s(la.get('op_type'))}): added {_fmt(v, '.1f')} dB"
        body.append(_t(left - 8, y + 12, _clip(name, 58), "end"))
        body.append(_rect(left, y, w, rh - 5, "hbar" + " bad" * bad, tip))
        body.append(_t(left + w + 6, y + 12, _fmt(v, ".1f")))
    if threshold is not None and 0 <= threshold <= hi:
        tx = left + bw * threshold / hi
        body.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="20" y2="{24 + len(top_layers) * rh}" class="tol">'
                    f"<title>jump threshold {_e(_fmt(threshold, '.1f'))} dB</title></line>")
    return _svg(left + bw + 80, 30 + len(top_layers) * rh, "top layers by added error", body)


# --- HTML -------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:26px 0 8px}.meta{color:#555}
.verdict{display:inline-block;padding:6px 14px;border-radius:6px;font-weight:600;color:#fff;margin:8px 0}
.verdict.pass{background:#2e9e5b}.verdict.fail{background:#c0392b}.verdict.unknown{background:#777}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #d5d9e0;padding:3px 6px;vertical-align:top}th{background:#eef1f6;text-align:left}
tr.bad td{background:#fdecea}tr.skip td{color:#888;background:#f7f7f7}td div{white-space:nowrap}
svg.plot{display:block;max-width:100%;height:auto;margin:8px 0;font-size:12px}
svg .grid{stroke:#e3e6eb}svg .axis{font-weight:600}svg .tol{stroke:#c0392b;stroke-dasharray:5 4}
svg .tollabel{fill:#c0392b}svg .bar.bad{stroke:#c0392b;stroke-width:3}svg .na{fill:#999}
svg .line{fill:none;stroke:#3b6fd4;stroke-width:2}svg .on{fill:#3b6fd4}svg .fallback{fill:#e08a1e}
svg .empty{fill:none}svg .pt{fill:#3b6fd4}svg .pt.na{fill:#bbb}svg .pt.jump{fill:#c0392b}
svg .jumplabel{fill:#c0392b;font-weight:600}svg .jumpline{stroke:#c0392b;stroke-dasharray:4 3}
svg .hbar{fill:#3b6fd4}svg .hbar.bad{fill:#c0392b}"""


def _html_cell(c: Cell) -> str:
    return "".join(f"<div>{_e(v)}</div>" for v in c) if isinstance(c, list) else _e(c)


def _html_table(head: list[str], rows: list[Row]) -> str:
    if not rows:
        return "<p>(none)</p>"
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join(f'<tr class="{_e(k)}">' + "".join(f"<td>{_html_cell(c)}</td>" for c in cells) + "</tr>"
                  for cells, k in rows)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>'


def to_html(doc: dict) -> str:
    """One self-contained HTML page (well-formed XML too): verdict, tables, inline SVG plots."""
    if _kind(doc) == "onnxq.validation":
        word = {True: "pass", False: "fail"}.get(doc.get("passed"), "unknown")
        title = f"onnxq validation: {_s(doc.get('reference'))}"
        body = (f'<h1>{_e(title)}</h1><div class="verdict {word}" id="verdict">{_e(_verdict(doc))}</div>'
                f"<p class=\"meta\">golden provider {_e(_s(doc.get('golden_provider')))} · "
                f"{_e(_fmt(doc.get('samples'), '.0f'))} samples</p>"
                f"<h2>Results</h2>{_html_table(*_validation_table(doc))}"
                f"<h2>Accuracy per provider</h2>{_bar_chart(doc)}<h2>Placement</h2>{_placement_chart(doc)}")
    else:
        title = f"onnxq diff: {_s(doc.get('candidate'))} vs {_s(doc.get('reference'))}"
        word = "fail" if isinstance(doc.get("first_jump"), dict) else "pass"
        body = (f'<h1>{_e(title)}</h1><p class="meta">{_e(_diff_summary(doc))}</p>'
                f'<div class="verdict {word}" id="verdict">{_e(_jump_text(doc))}</div>'
                f"<h2>Outputs</h2>{_html_table(*_outputs_table(doc))}"
                f"<h2>SQNR along the graph</h2>{_layer_plot(doc)}"
                f"<h2>Top layers by added error</h2>{_added_chart(doc)}{_html_table(*_layers_table(doc))}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{_e(title)}</title>'
            f"<style>{_CSS}\n</style></head><body>{body}</body></html>\n")


# --- files ------------------------------------------------------------------------------------------
_RENDERERS = {".json": to_json, ".html": to_html, ".htm": to_html, ".md": to_markdown}


def write_report(doc: dict, path: str | os.PathLike) -> Path:
    """Render by suffix (.json, .html, .md) and write atomically; never leaves a temp file behind."""
    target = Path(path)
    render = _RENDERERS.get(target.suffix.lower())
    if render is None:
        raise OutputError(f"cannot write a report to {target}: use a .json, .html or .md file name")
    text = render(doc)
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write the report {target}: {folder} is not an existing folder")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write the report {target}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target
