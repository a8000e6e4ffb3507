"""Validate quantized models against their fp32 reference on every provider they ship to.

The same inputs go through the reference model on the *golden* provider (ORT's CPU EP by default:
fp32 on the CPU is the truth) and through every model — the reference itself and each candidate —
on every requested provider. Each (model, provider) row reports per-output fidelity to the golden
outputs (cosine, SQNR, max and mean abs error, top-1/top-5 agreement for logits), the median latency
and its ratio to the reference model on the same provider, and placement (kernels per ORT EP and the
nodes that fell back to the CPU, from ORT's profiling). A provider that cannot run here is reported
as skipped with the reason; a model a provider fails on is a failed row.

On a provider that is an emulator here (QNN-HTP on x86) latency is not measured and the fp32
reference is not run (each emulated inference takes seconds); the candidates' fidelity and placement
are what the emulator tells.

Verdict: every candidate row that was asked for and could be tried must meet every tolerance; a
candidate that fails to run on an available provider fails the verdict, a skipped provider does not
(it is listed). The fp32 reference's own rows are informative and never fail the verdict.
Models whose outputs follow a 2-D ``attention_mask`` input are compared on real positions only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxq import metrics
from onnxq.data import Sample, checked_samples, model_inputs
from onnxq.errors import ConfigError, ModelLoadError
from onnxq.model_io import load_model, model_in_folder, read_graph
from onnxq.pipeline import _real_positions
from onnxq.providers import Placement, ProviderError, get_provider, parse_providers

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 16
LOGIT_PATTERNS = ("*logit*", "*score*")


@dataclass(frozen=True)
class Tolerances:
    """Per-output bounds every candidate must meet on every provider (``None``: not checked).

    ``min_top1``: the fraction of positions whose argmax agrees with the golden one, checked on
    outputs that look like logits (name matching ``*logit*`` or ``*score*``)."""

    min_cosine: float | None = 0.99
    min_sqnr_db: float | None = None
    max_abs_error: float | None = None
    min_top1: float | None = None

    def check(self, out: OutputMetrics) -> list[str]:
        """The tolerances ``out`` breaks, one readable line each."""
        failures = []
        if self.min_cosine is not None and not out.cosine >= self.min_cosine:
            failures.append(f"cosine {out.cosine:.4f} < {self.min_cosine} on {out.name}")
        if self.min_sqnr_db is not None and not out.sqnr_db >= self.min_sqnr_db:
            failures.append(f"SQNR {out.sqnr_db:.1f} dB < {self.min_sqnr_db} dB on {out.name}")
        if self.max_abs_error is not None and not out.max_abs_error <= self.max_abs_error:
            failures.append(f"max abs error {out.max_abs_error:.4g} > {self.max_abs_error} on {out.name}")
        if self.min_top1 is not None and out.top1 is not None and not out.top1 >= self.min_top1:
            failures.append(f"top-1 agreement {out.top1:.3f} < {self.min_top1} on {out.name}")
        return failures


@dataclass(frozen=True)
class OutputMetrics:
    """One output of one model on one provider against the golden outputs."""

    name: str
    cosine: float
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float
    top1: float | None = None
    top5: float | None = None


@dataclass(frozen=True)
class ValidationRow:
    """One model on one provider."""

    model: str
    path: str
    role: str  # "reference" or "candidate"
    provider: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    latency_ms: float | None = None
    latency_ratio: float | None = None
    placement: Placement | None = None
    outputs: tuple[OutputMetrics, ...] = ()
    failures: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool | None:
        """True/False for candidate rows that were tried; None for reference and skipped rows."""
        if self.role != "candidate" or self.status == "skipped":
            return None
        return self.status == "ok" and not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "path": self.path,
            "role": self.role,
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "latency_ms": self.latency_ms,
            "latency_ratio": self.latency_ratio,
            "placement": self.placement.to_dict() if self.placement is not None else None,
            "outputs": [vars(o).copy() for o in self.outputs],
            "failures": list(self.failures),
            "notes": list(self.notes),
            "passed": self.passed,
        }


@dataclass(frozen=True)
class ValidationReport:
    """Every (model, provider) row and the verdict; ``to_dict`` is the documented JSON document."""

    reference: str
    golden_provider: str
    samples: int
    tolerances: Tolerances
    rows: tuple[ValidationRow, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """No candidate row that was tried breaks a tolerance or failed to run."""
        return all(row.passed is not False for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "onnxq.validation",
            "version": 1,
            "reference": self.reference,
            "golden_provider": self.golden_provider,
            "samples": self.samples,
            "tolerances": vars(self.tolerances).copy(),
            "passed": self.passed,
            "rows": [row.to_dict() for row in self.rows],
        }

    def to_markdown(self) -> str:
        from onnxq.report import to_markdown

        return to_markdown(self.to_dict())

    def __str__(self) -> str:
        return self.to_markdown()


def _is_logits(name: str, value: np.ndarray) -> bool:
    return (
        value.ndim >= 1
        and value.shape[-1] >= 2
        and any(fnmatch.fnmatch(name.lower(), p) for p in LOGIT_PATTERNS)
    )


def compare_outputs(
    samples: Sequence[Sample], golden: Sequence[dict[str, np.ndarray]], got: Sequence[dict[str, np.ndarray]]
) -> tuple[OutputMetrics, ...]:
    """Fidelity of ``got`` to ``golden`` per float output, over real positions (see the module doc)."""
    results = []
    for name in golden[0]:
        if name not in got[0] or not np.issubdtype(golden[0][name].dtype, np.floating):
            continue
        refs = [_real_positions(s, g[name]) for s, g in zip(samples, golden, strict=True)]
        outs = [_real_positions(s, o[name]) for s, o in zip(samples, got, strict=True)]
        if any(r.shape != o.shape for r, o in zip(refs, outs, strict=True)):
            raise ProviderError(f"output {name} has a different shape than the reference's")
        a, b = np.concatenate(refs), np.concatenate(outs)
        top1 = top5 = None
        if _is_logits(name, golden[0][name]):
            top1, top5 = _top_k_agreement(samples, golden, got, name)
        results.append(
            OutputMetrics(
                name,
                metrics.cosine(a, b),
                metrics.sqnr_db(a, b),
                metrics.max_abs_error(a, b),
                float(np.mean(np.abs(a.astype(np.float64) - b))) if a.size else 0.0,
                top1,
                top5,
            )
        )
    return tuple(results)


def _top_k_agreement(
    samples: Sequence[Sample],
    golden: Sequence[dict[str, np.ndarray]],
    got: Sequence[dict[str, np.ndarray]],
    name: str,
) -> tuple[float, float]:
    """Fractions of positions where the candidate's argmax equals the golden one, and where the
    golden argmax is in the candidate's top 5 (over the last axis, real positions only)."""
    hits1 = hits5 = total = 0
    for sample, g, o in zip(samples, golden, got, strict=True):
        ref, out = g[name], o[name]
        mask = sample.get("attention_mask")
        if mask is not None and mask.ndim == 2 and ref.ndim >= 3 and ref.shape[:2] == mask.shape:
            ref, out = ref[mask.astype(bool)], out[mask.astype(bool)]
        ref = ref.reshape(-1, ref.shape[-1])
        out = out.reshape(-1, out.shape[-1])
        want = ref.argmax(axis=-1)
        k = min(5, out.shape[-1])
        top = np.argpartition(-out, k - 1, axis=-1)[:, :k]
        hits1 += int(np.sum(out.argmax(axis=-1) == want))
        hits5 += int(np.sum(np.any(top == want[:, None], axis=-1)))
        total += want.size
    return (hits1 / total, hits5 / total) if total else (1.0, 1.0)


@contextlib.contextmanager
def _as_file(model: Any, label: str) -> Iterator[Path]:
    """A path for ``model``: itself for a file, the model inside a folder, or a temporary file
    (removed afterwards) for an in-memory ``ModelProto``/``onnx_ir.Model``/``QuantizationResult``."""
    output_path = getattr(model, "output_path", None)
    if output_path is not None:
        model = output_path
    elif hasattr(model, "model") and isinstance(model.model, ir.Model):
        model = model.model
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.is_dir():
            path = model_in_folder(path)
        if not path.is_file():
            raise ModelLoadError(f"{label} {path} does not exist; check the path")
        yield path
        return
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if not isinstance(model, onnx.ModelProto):
        raise ModelLoadError(
            f"{label} must be a path, an onnx.ModelProto, an onnx_ir.Model or a QuantizationResult, "
            f"not {type(model).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix="onnxq-validate-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path))
        yield path


def _check_same_inputs(reference: ir.Model, candidate: ir.Model, name: str) -> None:
    want = {i.name for i in model_inputs(reference)}
    got = {i.name for i in model_inputs(candidate)}
    if want != got:
        raise ConfigError(
            f"candidate {name} takes inputs {sorted(got)} but the reference takes {sorted(want)}; "
            "compare models of the same network"
        )


def validate(
    reference: Any,
    candidates: Any,
    data: Any,
    *,
    providers: str | Sequence[str] = ("cpu",),
    tolerances: Tolerances | None = None,
    num_samples: int | None = DEFAULT_SAMPLES,
    golden: str = "cpu",
    timed: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Run the fp32 ``reference`` and each of ``candidates`` on every provider and compare them.

    ``reference``/``candidates``: paths (files or folders), ``onnx.ModelProto``, ``onnx_ir.Model`` or
    ``QuantizationResult`` (one candidate or a list). ``data``: inputs in any form
    ``onnxq.quantize`` accepts for calibration (at most ``num_samples`` are used). ``providers``:
    names from :data:`onnxq.providers.PROVIDERS` (``"cpu,qnn-htp"`` or a list). The models are never
    modified. Raises :class:`onnxq.OnnxqError` on bad input; returns the report (check ``.passed``).
    """
    tolerances = tolerances or Tolerances()
    names = parse_providers(providers)
    golden_provider = get_provider(golden)
    if not isinstance(candidates, list | tuple):
        candidates = [candidates]
    if not candidates:
        raise ConfigError("give at least one candidate model to validate")
    with contextlib.ExitStack() as stack:
        ref_path = stack.enter_context(_as_file(reference, "reference model"))
        paths = [stack.enter_context(_as_file(c, "candidate model")) for c in candidates]
        ref_model = load_model(ref_path)
        for path in paths:
            _check_same_inputs(ref_model, load_model(path), path.name)
        samples = list(checked_samples(data, model_inputs(ref_model), num_samples))
        del ref_model
        reason = golden_provider.unavailable()
        if reason:
            raise ConfigError(f"the golden provider {golden} cannot run here: {reason}")
        try:
            golden_outputs = golden_provider.run(ref_path, samples, timed=False).outputs
        except ProviderError as exc:
            raise ModelLoadError(f"the reference model does not run on {golden}: {exc}") from None
        models = [(ref_path, "reference")] + [(p, "candidate") for p in paths]
        rows: list[ValidationRow] = []
        bar = tqdm(
            total=len(names) * len(models), desc="validating", unit="run", disable=not progress, leave=False
        )
        for name in names:
            provider = get_provider(name)
            ref_latency = None
            for path, role in models:
                bar.set_postfix_str(f"{path.name} on {name}")
                row = _row(provider, path, role, samples, golden_outputs, tolerances, timed, ref_latency)
                if role == "reference":
                    ref_latency = row.latency_ms
                rows.append(row)
                bar.update()
        bar.close()
    label = str(reference) if isinstance(reference, str | os.PathLike) else ref_path.name
    return ValidationReport(label, golden, len(samples), tolerances, tuple(rows))


def _row(
    provider: Any,
    path: Path,
    role: str,
    samples: list[Sample],
    golden: list[dict[str, np.ndarray]],
    tolerances: Tolerances,
    timed: bool,
    ref_latency: float | None,
) -> ValidationRow:
    """Run one model on one provider and compare it with the golden outputs."""
    base = {"model": path.name, "path": str(path), "role": role, "provider": provider.name}
    reason = provider.unavailable(read_graph(path))
    if reason:
        return ValidationRow(**base, status="skipped", reason=reason)
    emulated = provider.emulated
    if emulated and role == "reference":
        reason = f"{emulated}: the fp32 reference is not run there (its latency would mean nothing)"
        return ValidationRow(**base, status="skipped", reason=reason)
    try:
        run = provider.run(path, samples, timed=timed and not emulated)
        if emulated:
            run.notes.append(f"{emulated}: latency not measured")
        outputs = compare_outputs(samples, golden, run.outputs)
    except ProviderError as exc:
        log.info("%s failed on %s: %s", path.name, provider.name, exc)
        return ValidationRow(**base, status="failed", reason=str(exc))
    failures: list[str] = []
    if role == "candidate":
        for out in outputs:
            failures.extend(tolerances.check(out))
    ratio = run.latency_ms / ref_latency if run.latency_ms and ref_latency else None
    return ValidationRow(
        **base,
        status="ok",
        latency_ms=run.latency_ms,
        latency_ratio=ratio,
        placement=run.placement,
        outputs=outputs,
        failures=tuple(failures),
        notes=tuple(run.notes),
    )
