"""Automatic mixed precision: the fewest nodes kept in float (or moved to 16 bits) to meet a budget.

:func:`quantize_mixed` quantizes a model with a base :class:`~onnxq.QuantConfig`, ranks the nodes
that config quantizes by the error each one *adds* (``added_db`` of :func:`onnxq.diff`), and keeps
the highest-ranked ones out of 8 bits until a :class:`MixedPrecision` budget is met: a minimum
cosine / SQNR of every model output against fp32 on evaluation samples, or a user's
``eval_fn(model_path) -> score`` (higher is better) that may drop at most ``max_drop`` below the
fp32 model's score.

Algorithm (deterministic: the same inputs give the same nodes and a byte-identical file):

1. **calibrate once**: the model is prepared and planned with the base config and calibrated in one
   streaming pass (bounded memory, as ``onnxq.quantize``); the ranges, the per-channel
   statistics SmoothQuant needs and the input means of bias correction are kept (a base with
   cross-layer equalization is equalized before the plan, in the calibration and every trial,
   as ``onnxq.quantize`` does). Keeping a node in float only *removes* tensors from the
   plan, so every later quantization reuses these ranges instead of running calibration again: a
   trial costs a prepare, a rewrite, a save and the budget evaluation. A trial's file is
   byte-identical to ``onnxq.quantize(model, calib, config=result.config)`` (``tests/
   test_mixed_precision.py`` checks it), and ``result.config`` is a plain serialisable QuantConfig
   (``exclude_nodes`` holds the chosen names with fnmatch metacharacters escaped). A base with
   ``calibration=Dynamic()`` has nothing to calibrate: the samples are only read (and validated),
   and every trial is the dynamic rewrite (:mod:`onnxq.passes.dynamic`) with the chosen nodes
   excluded. A weight-only base (``activations=None``, round-to-nearest or a codebook: GPTQ/AWQ
   would recalibrate per trial, so they are refused) is searched the same way over its weights:
   one candidate per weight the rewrite would quantize, named by its first reader (keeping that
   node float keeps the whole weight float, every reader of it), each trial the weight-only
   pipeline's file; ``fallback`` must be ``"float"``. Below, "8 bits" reads "the base's type".
2. **rank**: a candidate is every node the base plan quantizes except pure data movement
   (Reshape, Transpose, MaxPool, ...: they do not round): MatMul/Gemm/Conv, integer islands (Add,
   Softmax, pooling, ...) and embedding Gathers with an int8 table. Each gets the ``added_db`` of
   the tensor it produces in ``onnxq.diff(fp32, base quantized, the first diff_samples evaluation
   samples)`` (a node whose output is not compared, an int8 Gather output, takes the score of the
   first compared tensor downstream). With ``ranking="measured"`` (and ``"auto"``, the default,
   for cosine / SQNR budgets up to ``max_measured`` candidates) the order is then measured: each
   candidate alone is kept out of 8 bits, and candidates are ranked by the worst output's SQNR
   gain over the base (ties by ``added_db``): one quantization per candidate, the leave-one-out
   ranking a brute-force check computes. ``added_db`` is local: an error that the rest of the
   network damps (a value projection in front of a residual Add, a projection whose output a
   LayerNorm rescales) scores as high as one that reaches the outputs; on all-MiniLM-L6-v2 the
   two orders are uncorrelated (Spearman +0.01 over 39 candidates), and a cosine ≥ 0.9993 budget
   needs 5 float nodes in the measured order, 13 in the added-error one. Otherwise the
   added-error order is used as it is (ties by graph order).
3. **search the prefix**: the smallest ``k`` such that keeping the top ``k`` out of 8 bits meets
   the budget, by galloping (k = 0, 1, 2, 4, ...) then bisection between the last failing and the
   first passing ``k``: O(log n) quantizations instead of n. This assumes that more float nodes do
   not make the model worse, which holds in practice but is not guaranteed; hence step 4.
4. **refine** (``refine=True``): each node of the chosen prefix, lowest-ranked first, is put back
   to 8 bits if the budget still holds without it (one quantization each, at most ``k - 1``). The
   result is minimal with respect to removing any single node (when ``k - 1 <=
   max_refine_trials``; otherwise for the nodes tried).

If even ``max_float_nodes`` (default: every candidate) nodes do not meet the budget, the result has
``met=False`` and the model with that prefix in float is written: the flag, not an exception, so
the report still says how close it came.

``fallback="int16"`` moves the chosen nodes' activation inputs to 16-bit (uint16 for uint8
activations, int16 for int8) through ``QuantConfig.overrides`` instead of float; their weights stay
int8 (A16W8: int16 weights make int32 biases, scaled by input × weight scale, saturate).
Overrides are per tensor, so every reader of such a tensor sees 16 bits; every trial is prepared
at opset 21 (16-bit QDQ needs it); it needs ``MinMax`` calibration (other methods choose
ranges per integer type, which would need a calibration per trial). ONNX Runtime's CPU EP has no
16-bit integer kernels: such nodes run as DequantizeLinear + float op there (accuracy of 16 bits,
speed of float); it is meant for targets that run A16W16 (QNN-HTP).

Budget evaluation uses the first ``eval_samples`` samples of ``eval_data`` (default: of the
calibration data, captured while calibrating). Their fp32 outputs are kept in memory when they
total at most :data:`REFERENCE_BYTES`, and recomputed per trial otherwise; cosine / SQNR are folded
per sample into running sums (over real positions for models with a 2-D ``attention_mask``), so
memory does not grow with the outputs' size. With ``eval_fn`` the output metrics are measured on
the base and final models only (they are informative there).

The report (:class:`MixedPrecisionResult`) lists the nodes kept out of 8 bits with their rank and
``added_db``, the budget metric before and after, every trial, the number of quantizations, the
file sizes (fp32, base, final) and the latency of each on ORT's CPU EP (interleaved rounds of
block-timed runs on the first evaluation samples; ratio to fp32 = median over rounds).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxq.calibrate import CalibrationResult, session_options
from onnxq.config import Dynamic, MinMax, QuantConfig, QuantSpec
from onnxq.data import Sample, checked_samples, model_inputs, peek_samples
from onnxq.diff import DiffReport, diff
from onnxq.errors import ConfigError, OnnxqError, OutputError, QuantizationError
from onnxq.metrics import RunningError
from onnxq.model_io import load_model, save_model
from onnxq.passes.bias_correction import CorrectBias
from onnxq.passes.declared_types import KeepDeclaredTypes, declared_types
from onnxq.passes.dynamic import dynamic_passes
from onnxq.passes.equalize import equalize_model
from onnxq.passes.smooth import (
    SmoothActivations,
    Smoothing,
    choose_scales,
    find_body_candidates,
    find_candidates,
    smooth_bodies,
    summary_fields,
)
from onnxq.passes.upgrade_opset import OPSET_16BIT
from onnxq.pipeline import (
    _default_output,
    _file_size,
    _real_positions,
    _same_shapes,
    calibrate_plan,
    check_model_file,
    make_plan,
    prepare_model,
    required_opset,
    rewrite_passes,
)
from onnxq.plan import DATA_MOVEMENT_OPS, FLOAT_TYPES, OUTPUT_QUANTIZED_OPS, RULES, NodePlan, QuantPlan
from onnxq.providers import CPU_EP, timed_runs
from onnxq.result import FloatNode, OutputFidelity, QuantizationSummary

log = logging.getLogger(__name__)

__all__ = [
    "BudgetMetrics",
    "FloatChoice",
    "MixedPrecision",
    "MixedPrecisionResult",
    "Trial",
    "escape_name",
    "quantize_mixed",
]

# fp32 reference outputs of the evaluation samples are kept in memory up to this many bytes.
REFERENCE_BYTES = 256 * 2**20
# Evaluation samples the latency is timed on.
LATENCY_SAMPLES = 4


@dataclass(frozen=True)
class MixedPrecision:
    """An accuracy budget and how to meet it (see the module docstring).

    - ``min_cosine`` / ``min_sqnr_db``: every float model output must reach this cosine / SQNR
      against fp32 on the evaluation samples.
    - ``eval_fn`` + ``max_drop``: ``eval_fn(path) -> score`` (higher is better) on a saved model;
      the quantized score may be at most ``max_drop`` below the fp32 model's. For a metric where
      lower is better return its negative (perplexity within +3 %: ``-log(ppl)``, ``max_drop =
      log(1.03)``). Not serialisable.
    - ``fallback``: ``"float"`` keeps chosen nodes in float, ``"int16"`` moves their activation
      inputs to 16 bits (weights stay int8).
    - ``max_float_nodes``: at most this many nodes leave 8 bits (``None``: no limit).
    - ``eval_samples``: evaluation samples used for cosine / SQNR and latency;
      ``diff_samples``: the first of them used for the added-error scores.
    - ``ranking``: the order the search puts nodes out of 8 bits in. ``"measured"``: by the output
      SQNR each candidate gains alone out of 8 bits (one quantization per candidate, the
      leave-one-out that a brute-force check would do); ``"added_error"``: by the error each
      adds where it is (``onnxq.diff``'s ``added_db``, no quantization: cheap, but blind to how
      much of that error reaches the outputs); ``"auto"``: measured for a cosine / SQNR budget
      with at most ``max_measured`` candidates, else by added error. An ``eval_fn`` budget is not
      measured by default: output SQNR is then a proxy either way, and on MiniLM's accuracy
      budget the SQNR order needed 19 float nodes where the added-error order needed 8.
    - ``refine``: after the prefix search, put back to 8 bits every chosen node the budget does
      not need, trying at most ``max_refine_trials`` nodes (the lowest-ranked first).
    - ``measure_latency``: time fp32, base and final on ORT's CPU EP (``latency_rounds`` rounds)
      with ``latency_threads`` intra-op threads (``None``: ORT's default, one per physical core),
      their spinning off unless ``latency_spinning`` (ORT's default is on). Set these as the
      deployment will: at batch 1 an int8 model's kernels are small enough that a second thread
      which must be woken per kernel can cost more than it gains.
    """

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    eval_fn: Callable[[Path], float] | None = field(default=None, compare=False)
    max_drop: float | None = None
    fallback: Literal["float", "int16"] = "float"
    max_float_nodes: int | None = None
    eval_samples: int = 16
    diff_samples: int = 8
    refine: bool = True
    max_refine_trials: int = 8
    ranking: Literal["auto", "measured", "added_error"] = "auto"
    max_measured: int = 64
    measure_latency: bool = True
    latency_rounds: int = 3
    latency_threads: int | None = None
    latency_spinning: bool = False

    def __post_init__(self) -> None:
        if self.min_cosine is None and self.min_sqnr_db is None and self.eval_fn is None:
            raise ConfigError(
                "MixedPrecision needs a budget: min_cosine, min_sqnr_db, or eval_fn with max_drop"
            )
        if (self.eval_fn is None) != (self.max_drop is None):
            raise ConfigError("MixedPrecision: eval_fn and max_drop go together (give both or neither)")
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise ConfigError("MixedPrecision(eval_fn=...) must be a callable taking a model path")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ConfigError("MixedPrecision(max_drop=d) needs d >= 0")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError("MixedPrecision(min_cosine=c) needs -1 <= c <= 1")
        if self.fallback not in ("float", "int16"):
            raise ConfigError(f"MixedPrecision(fallback={self.fallback!r}): use 'float' or 'int16'")
        if self.max_float_nodes is not None and self.max_float_nodes < 0:
            raise ConfigError("MixedPrecision(max_float_nodes=n) needs n >= 0")
        if self.max_refine_trials < 0:
            raise ConfigError("MixedPrecision(max_refine_trials=n) needs n >= 0")
        if self.ranking not in ("auto", "measured", "added_error"):
            raise ConfigError(
                f"MixedPrecision(ranking={self.ranking!r}): use 'auto', 'measured' or 'added_error'"
            )
        if self.max_measured < 0:
            raise ConfigError("MixedPrecision(max_measured=n) needs n >= 0")
        if self.latency_threads is not None and self.latency_threads < 1:
            raise ConfigError("MixedPrecision(latency_threads=n) needs n >= 1 (or None: ORT's default)")
        for name in ("eval_samples", "diff_samples", "latency_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MixedPrecision({name}=n) needs n >= 1")

    def latency_setting(self) -> str:
        """The ORT session setting latency is timed with, in words."""
        n = self.latency_threads
        threads = "ORT's default threads" if n is None else f"{n} thread{'s' if n > 1 else ''}"
        return f"{threads}, spinning {'on' if self.latency_spinning else 'off'}"

    def describe(self) -> str:
        """The budget in words."""
        parts = []
        if self.min_cosine is not None:
            parts.append(f"output cosine >= {self.min_cosine:g}")
        if self.min_sqnr_db is not None:
            parts.append(f"output SQNR >= {self.min_sqnr_db:g} dB")
        if self.eval_fn is not None:
            parts.append(f"eval_fn drop <= {self.max_drop:g}")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (an ``eval_fn`` cannot be serialised: ConfigError)."""
        if self.eval_fn is not None:
            raise ConfigError("a MixedPrecision budget with an eval_fn cannot be serialised")
        return {
            k: getattr(self, k)
            for k in (
                "min_cosine",
                "min_sqnr_db",
                "max_drop",
                "fallback",
                "max_float_nodes",
                "eval_samples",
                "diff_samples",
                "refine",
                "max_refine_trials",
                "ranking",
                "max_measured",
                "measure_latency",
                "latency_rounds",
                "latency_threads",
                "latency_spinning",
            )
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixedPrecision:
        known = set(cls.__dataclass_fields__) - {"eval_fn"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MixedPrecision keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class BudgetMetrics:
    """One model measured against the budget: per-output fidelity and the eval_fn score."""

    outputs: tuple[OutputFidelity, ...] = ()
    score: float | None = None
    met: bool = False

    def min_cosine(self) -> float | None:
        return min((o.cosine for o in self.outputs), default=None)

    def min_sqnr_db(self) -> float | None:
        return min((o.sqnr_db for o in self.outputs), default=None)


@dataclass(frozen=True)
class FloatChoice:
    """A candidate node: its rank in the search's order (1 = first out of 8 bits), the error it adds
    where it is (``added_db``), the output SQNR it gains alone out of 8 bits (``gain_db``; None when
    not measured), and why it left 8 bits (if it did)."""

    name: str
    op_type: str
    added_db: float
    rank: int
    reason: str = ""
    gain_db: float | None = None


@dataclass(frozen=True)
class Trial:
    """One quantization tried: the nodes out of 8 bits and the budget metrics it reached."""

    nodes: tuple[str, ...]
    metrics: BudgetMetrics
    step: str


@dataclass(frozen=True)
class MixedPrecisionResult:
    """What :func:`quantize_mixed` chose and what it cost (``to_text()`` for people)."""

    output_path: Path | None
    model: ir.Model
    config: QuantConfig
    budget: MixedPrecision
    met: bool
    chosen: tuple[FloatChoice, ...]
    ranking: tuple[FloatChoice, ...]
    fp32_score: float | None
    before: BudgetMetrics
    after: BudgetMetrics
    trials: tuple[Trial, ...]
    size_fp32: int
    size_base: int
    size_after: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_ratio: dict[str, float] = field(default_factory=dict)
    summary: QuantizationSummary | None = None
    diff: DiffReport | None = None
    notes: tuple[str, ...] = ()
    ranked_by: Literal["measured", "added_error"] = "added_error"
    ranking_quantizations: int = 0  # the measured ranking's models (one per candidate)

    @property
    def quantizations(self) -> int:
        """Quantized models built and evaluated (calibration ran once for all of them)."""
        return len(self.trials) + self.ranking_quantizations

    def to_dict(self) -> dict[str, Any]:
        def metrics(m: BudgetMetrics) -> dict[str, Any]:
            return {"outputs": [vars(o).copy() for o in m.outputs], "score": m.score, "met": m.met}

        return {
            "kind": "onnxq.mixed_precision",
            "version": 1,
            "output": str(self.output_path) if self.output_path else None,
            "budget": self.budget.describe(),
            "fallback": self.budget.fallback,
            "met": self.met,
            "chosen": [vars(c).copy() for c in self.chosen],
            "ranking": [vars(c).copy() for c in self.ranking],
            "ranked_by": self.ranked_by,
            "fp32_score": self.fp32_score,
            "before": metrics(self.before),
            "after": metrics(self.after),
            "trials": [{"nodes": list(t.nodes), "step": t.step, **metrics(t.metrics)} for t in self.trials],
            "quantizations": self.quantizations,
            "size_fp32": self.size_fp32,
            "size_base": self.size_base,
            "size_after": self.size_after,
            "latency_ms": dict(self.latency_ms),
            "latency_ratio": dict(self.latency_ratio),
            "latency_setting": self.budget.latency_setting() if self.latency_ms else None,
            "config": self.config.to_dict() if self.config.exclude_if is None else None,
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        what = "float" if self.budget.fallback == "float" else "16-bit"
        lines = [
            f"mixed precision: budget {self.budget.describe()}: "
            + ("MET" if self.met else "NOT MET")
            + f" with {len(self.chosen)} of {len(self.ranking)} candidate nodes in {what} "
            f"({self.quantizations} quantizations, one calibration)",
        ]
        if self.chosen:
            lines.append(f"nodes kept in {what}:")
            lines.append(f"  {'rank':>4} {'added dB':>9} {'gain dB':>8}  op / node: why")
            for c in self.chosen:
                gain = "-" if c.gain_db is None else f"{c.gain_db:.2f}"
                lines.append(f"  {c.rank:>4} {c.added_db:>9.2f} {gain:>8}  {c.op_type} {c.name}: {c.reason}")
        lines.append("budget metric:")
        lines.append(f"  base (all quantized): {_metrics_text(self.before, self.fp32_score)}")
        lines.append(f"  chosen:               {_metrics_text(self.after, self.fp32_score)}")
        mb = 1e6
        lines.append(
            f"size: fp32 {self.size_fp32 / mb:.2f} MB, base {self.size_base / mb:.2f} MB, "
            f"chosen {self.size_after / mb:.2f} MB ({100 * self.size_after / max(self.size_fp32, 1):.1f}% "
            "of fp32)"
        )
        if self.latency_ms:
            parts = [
                f"{k} {v:.2f} ms"
                + (f" ({self.latency_ratio[k]:.3f}x fp32)" if k in self.latency_ratio else "")
                for k, v in self.latency_ms.items()
            ]
            lines.append(f"latency on ORT CPU EP ({self.budget.latency_setting()}): " + ", ".join(parts))
        lines.append("trials:")
        for t in self.trials:
            lines.append(
                f"  {len(t.nodes):>4} nodes  {_metrics_text(t.metrics, self.fp32_score)}  "
                f"{'pass' if t.metrics.met else 'fail'}  ({t.step})"
            )
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _metrics_text(m: BudgetMetrics, fp32_score: float | None) -> str:
    parts = []
    if m.outputs:
        parts.append(f"cosine {m.min_cosine():.6f}, SQNR {m.min_sqnr_db():.2f} dB")
    if m.score is not None:
        drop = f" (drop {fp32_score - m.score:+.4g})" if fp32_score is not None else ""
        parts.append(f"score {m.score:.6g}{drop}")
    return ", ".join(parts) or "-"


# ----------------------------------------------------------------------------------------------------


def escape_name(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself (``[``, ``*``, ``?`` escaped)."""
    return "".join(f"[{c}]" if c in "[*?" else c for c in name)


def _capture(samples: Iterator[Sample], keep: int, into: list[Sample]) -> Iterator[Sample]:
    for sample in samples:
        if len(into) < keep:
            into.append(sample)
        yield sample


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


class _Reference:
    """fp32 outputs of the evaluation samples: kept when small, else recomputed on demand."""

    def __init__(self, fp32: Path, samples: list[Sample]) -> None:
        self.fp32, self.samples = fp32, samples
        session = _session(fp32)
        self.names = [o.name for o in session.get_outputs()]
        self.kept: list[dict[str, np.ndarray]] | None = []
        total = 0
        for sample in samples:
            out = dict(zip(self.names, session.run(self.names, sample), strict=True))
            total += sum(v.nbytes for v in out.values())
            if total > REFERENCE_BYTES:
                self.kept = None
                break
            self.kept.append(out)

    def outputs(self) -> Iterator[dict[str, np.ndarray]]:
        if self.kept is not None:
            yield from self.kept
            return
        session = _session(self.fp32)
        for sample in self.samples:
            yield dict(zip(self.names, session.run(self.names, sample), strict=True))


def _output_metrics(path: Path, reference: _Reference) -> tuple[OutputFidelity, ...]:
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    stats: dict[str, RunningError] = {}
    scratch = np.empty((3, 2**18), np.float64)
    for sample, ref in zip(reference.samples, reference.outputs(), strict=True):
        for name, value in zip(names, session.run(names, sample), strict=True):
            if name in ref and np.issubdtype(value.dtype, np.floating) and value.shape == ref[name].shape:
                a, b = _real_positions(sample, ref[name]), _real_positions(sample, value)
                stats.setdefault(name, RunningError()).fold(a, b, scratch)
    return tuple(OutputFidelity(n, s.cosine(), s.sqnr_db(), s.max_err) for n, s in stats.items())


def _latencies(
    paths: dict[str, Path], samples: Sequence[Sample], budget: MixedPrecision
) -> tuple[dict, dict]:
    """Median ms per model over interleaved rounds, and the median over rounds of each model's
    time over fp32's in the same round, on ORT's CPU EP with the budget's latency setting. Each
    timed block has a session of its own, the only one alive: no other model's threads spin or
    sleep beside it, and memory holds one model at a time."""
    so = session_options(threads=budget.latency_threads, spinning=budget.latency_spinning)
    per_round: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(budget.latency_rounds):
        for key, path in paths.items():
            sess = ort.InferenceSession(str(path), so, providers=[CPU_EP])
            names = [o.name for o in sess.get_outputs()]
            per_round[key].append(timed_runs(lambda s, sess=sess, names=names: sess.run(names, s), samples))
            del sess
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    ratio = {
        k: statistics.median(t / f for t, f in zip(v, per_round["fp32"], strict=True))
        for k, v in per_round.items()
        if k != "fp32"
    }
    return ms, ratio


class _Builder:
    """Builds quantized models for sets of nodes kept out of 8 bits, from one calibration."""

    def __init__(
        self,
        source: Path,
        base: QuantConfig,
        budget: MixedPrecision,
        first: Sample,
        folder: Path,
        file_name: str,
    ) -> None:
        self.source, self.base, self.budget = source, base, budget
        self.first, self.folder, self.file_name = first, folder, file_name
        self.rules = RULES[base.target]
        self.min_opset = required_opset(base) if base.activations is not None else 0
        if budget.fallback == "int16":
            self.min_opset = max(self.min_opset, OPSET_16BIT)
        self.count = 0
        self.base_plan: QuantPlan | None = None
        # bias correction: corrected node -> (its input-mean tensor, axis), from the base plan
        self.bias_inputs: dict[str, tuple[str, int]] = {}

    def prepared(self, notes: list[str] | None = None) -> ir.Model:
        model = load_model(self.source)
        if self.weight_only:  # as the weight-only rewrite sees it (names fixed, constants lifted)
            from onnxq.weight_only import canonical_passes

            ir.passes.PassManager(canonical_passes())(model)
            return model
        self.declared = declared_types(model)
        prepare_model(model, self.min_opset, self.rules, self.first, notes)
        if self.base.equalization is not None:  # as quantize does: data-free, before the plan
            equalize_model(model, self.base.equalization, notes)
        return model

    @property
    def weight_only(self) -> bool:
        """The base config quantizes weights only: trials are the weight-only pipeline's."""
        return self.base.activations is None

    @property
    def dynamic(self) -> bool:
        """The base config quantizes activations at run time: no calibration, no ranges."""
        return isinstance(self.base.calibration, Dynamic)

    def calibrate(self, samples: Iterator[Sample]) -> None:
        notes: list[str] = []
        model = self.prepared(notes)
        self.notes = notes
        if self.weight_only:  # one candidate per quantized weight: its first reader
            from onnxq.weight_only import quantized_weights

            self.weights = quantized_weights(model, self.base)
        if self.dynamic or self.weight_only:  # nothing to measure; the samples are read (validated)
            self.calibration = CalibrationResult({}, sum(1 for _ in samples))
            self.body_ranges, self.body_stats = {}, {}
            return
        plan = make_plan(model, self.base)
        tensors, channels = _measured(model, plan, self.base)
        # Bodies keep the base plan's quantization in every trial (the search ranks main-graph
        # nodes), with their ranges and SmoothQuant statistics keyed by body label: every trial
        # loads the model afresh, so its bodies are other objects.
        # Bias correction's input means, for every node the base plan quantizes: a trial corrects
        # those it still quantizes, from the same fp32 statistics quantize gathers.
        self.calibration, self.bias_inputs = calibrate_plan(
            model, plan, self.base, tensors, samples, channels, keep=0, progress=False
        )
        labels = {id(b.graph): b.label for b in plan.bodies}
        self.body_ranges = {labels[k]: v for k, v in self.calibration.body_ranges.items()}
        self.body_stats = {labels[k]: v for k, v in self.calibration.body_channels.items()}

    def config(self, nodes: Sequence[str]) -> QuantConfig:
        """The plain QuantConfig that keeps ``nodes`` out of 8 bits."""
        if not nodes:
            return self.base
        if self.budget.fallback == "float":
            return self.base.with_changes(
                exclude_nodes=(*self.base.exclude_nodes, *(escape_name(n) for n in nodes))
            )
        assert self.base_plan is not None
        chosen = set(nodes)
        overrides: dict[str, QuantSpec | None] = dict(self.base.overrides)
        for tensor in self.base_plan.activations.values():
            if tensor.kind == "activation" and any(c in chosen for c, _ in tensor.consumers):
                dtype = "int16" if tensor.spec.dtype.startswith("int") else "uint16"
                overrides[tensor.name] = QuantSpec(
                    dtype, tensor.spec.symmetric, tensor.spec.granularity, tensor.spec.calibration
                )
        return self.base.with_changes(overrides=dict(sorted(overrides.items())))

    def build(self, nodes: Sequence[str]) -> tuple[Path, QuantPlan, dict[str, Smoothing], QuantConfig]:
        """Quantize with ``nodes`` out of 8 bits; returns the saved file, the plan (after the
        rewrite), what SmoothQuant chose per activation and the config."""
        config = self.config(nodes)
        if self.weight_only:
            return self._weight_only_trial(config), self._weight_plan(nodes), {}, config
        model = self.prepared()
        plan = make_plan(model, config)
        if self.dynamic:
            return self._save(model, nodes, plan, dynamic_passes(plan, config)), plan, {}, config
        needed = plan.calibration_tensors()
        ranges = self.calibration.ranges
        missing = [n for n in needed if n not in ranges]
        if missing:
            raise QuantizationError(
                f"mixed precision: the plan needs tensors the base calibration did not measure "
                f"({', '.join(missing[:3])}); report this as a bug"
            )
        trial_ranges = {n: ranges[n] for n in needed}
        channels = self.calibration.channels
        candidates = find_candidates(model, plan) if config.smoothing is not None else {}
        stats = {n: channels[n] for n in candidates if n in channels}
        scales = (
            choose_scales(candidates, stats, plan, config.smoothing) if config.smoothing is not None else {}
        )
        smoothing = SmoothActivations(plan, trial_ranges, candidates, scales, stats)
        ids = {b.label: id(b.graph) for b in plan.bodies}
        body_ranges = {ids[k]: dict(v) for k, v in self.body_ranges.items() if k in ids}
        body_stats = {ids[k]: v for k, v in self.body_stats.items() if k in ids}
        in_bodies = find_body_candidates(plan.bodies) if config.smoothing is not None else {}
        body_smoothing = smooth_bodies(in_bodies, body_stats, body_ranges, config.smoothing)
        bc = config.bias_correction
        correct = CorrectBias(bc, self.bias_inputs, self.calibration.means) if bc is not None else None
        rewrite = rewrite_passes(
            plan,
            trial_ranges,
            smoothing,
            self.rules,
            correct,
            body_ranges=body_ranges,
            body_smoothing=body_smoothing,
        )
        return self._save(model, nodes, plan, rewrite), plan, {**scales, **body_smoothing.scales}, config

    def _weight_only_trial(self, config: QuantConfig) -> Path:
        """The weight-only pipeline's file for ``config`` (no fidelity check: the search measures)."""
        from onnxq.weight_only import quantize_weight_only

        path = self._trial_path()
        quantize_weight_only(self.source, config.with_changes(fidelity=False), path, None, progress=False)
        return path

    def _weight_plan(self, nodes: Sequence[str]) -> QuantPlan:
        """A plan with one node per weight (its first reader), quantized unless in ``nodes``."""
        plan = QuantPlan()
        for readers in self.weights.values():
            name, op = readers[0]
            plan.nodes[name] = NodePlan(
                name, op, name not in nodes, "" if name not in nodes else "kept float"
            )
        return plan

    def _save(
        self, model: ir.Model, nodes: Sequence[str], plan: QuantPlan, rewrite: ir.passes.PassManager
    ) -> Path:
        """Run ``rewrite`` on ``model`` and save it as the next trial's file."""
        try:
            rewrite(model)
            KeepDeclaredTypes(self.declared)(model)
        except OnnxqError:
            raise
        except Exception as exc:
            raise QuantizationError(f"rewriting the graph failed: {type(exc).__name__}: {exc}") from exc
        from onnxq import __version__

        model.producer_name, model.producer_version = "onnxq", __version__
        path = save_model(model, self._trial_path())
        if not nodes:
            self.base_plan = plan
        return path

    def _trial_path(self) -> Path:
        """Where the next trial's file goes (a folder of its own, for external data)."""
        self.count += 1
        folder = self.folder / f"trial{self.count}"
        folder.mkdir()
        return folder / self.file_name


def _measured(
    model: ir.Model, plan: QuantPlan, config: QuantConfig
) -> tuple[dict[str, QuantSpec], list[str]]:
    """What the one calibration measures: every float activation a plan with fewer quantized nodes
    could need (keeping a node in float only un-quantizes others, but can turn a tensor that
    inherited its scale into one with its own range), and per-channel statistics of those read by
    MatMuls with constant weights (SmoothQuant candidates of such plans).

    Every tensor a plan quantizes is an input or output of a node it quantizes (or the Relu after
    a quantized Conv), and those nodes are a subset of the base plan's quantized nodes."""
    quantized = {n.name for n in plan.nodes.values() if n.quantized}
    tensors: dict[str, QuantSpec] = {}
    channels: list[str] = []
    for node in model.graph:
        if node.name not in quantized:
            continue
        values = [*node.inputs, *node.outputs]
        if node.op_type in OUTPUT_QUANTIZED_OPS and node.outputs:
            values += [
                v for user in node.outputs[0].consumers() if user.op_type == "Relu" for v in user.outputs
            ]
        for value in values:
            if value is None or value.is_initializer() or value.dtype not in FLOAT_TYPES:
                continue
            if value.producer() is not None and value.producer().op_type == "Constant":
                continue
            spec = config.overrides.get(value.name, config.activations)
            if spec is not None and value.name not in tensors:
                tensors[value.name] = spec
        if node.op_type == "MatMul" and len(node.inputs) > 1 and node.inputs[1] is not None:
            data = node.inputs[0]
            weight_is_constant = node.inputs[1].is_initializer()
            if weight_is_constant and data is not None and data.name in tensors and data.name not in channels:
                channels.append(data.name)
    for name, tensor in plan.activations.items():  # anything the rules placed elsewhere
        if tensor.kind == "activation" and name not in tensors:
            tensors[name] = tensor.spec
    return tensors, channels


def _candidates(plan: QuantPlan, model: ir.Model, report: DiffReport) -> list[FloatChoice]:
    """Quantized nodes worth keeping in float, scored by added error, ranked (ties: graph order)."""
    by_node = {layer.node: layer.added_db for layer in report.layers}
    by_tensor = {layer.tensor: layer.added_db for layer in report.layers}
    nodes = {n.name: n for n in model.graph}
    order = {name: i for i, name in enumerate(nodes)}

    def score(node: ir.Node) -> float:
        if node.name in by_node:
            return by_node[node.name]
        todo, seen = [v for v in node.outputs], set()
        while todo:  # breadth-first to the first compared tensor downstream
            value = todo.pop(0)
            if value.name in seen:
                continue
            seen.add(value.name)
            if value.name in by_tensor:
                return by_tensor[value.name]
            for user in value.consumers():
                todo.extend(user.outputs)
        return -math.inf

    out = []
    for plan_node in plan.nodes.values():
        node = nodes.get(plan_node.name)
        if not plan_node.quantized or node is None:
            continue
        table = node.inputs[0] if node.inputs else None
        if node.op_type in DATA_MOVEMENT_OPS and not (
            node.op_type == "Gather" and table is not None and table.is_initializer()
        ):
            continue
        out.append((node, score(node)))
    out.sort(key=lambda item: (-item[1], order[item[0].name]))
    return [FloatChoice(n.name, n.op_type, s, rank) for rank, (n, s) in enumerate(out, start=1)]


def _by_gain(ranking: list[FloatChoice], gains: dict[str, float]) -> list[FloatChoice]:
    """``ranking`` reordered by measured gain (largest first; ties keep the added-error order),
    renumbered, each with its ``gain_db``."""
    ordered = sorted(ranking, key=lambda c: (-round(gains[c.name], 9), c.rank))
    return [dataclasses.replace(c, rank=i, gain_db=gains[c.name]) for i, c in enumerate(ordered, start=1)]


def quantize_mixed(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    calib_data: Any,
    budget: MixedPrecision,
    *,
    config: QuantConfig | None = None,
    eval_data: Any = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
) -> MixedPrecisionResult:
    """Quantize ``model`` with the fewest nodes out of 8 bits that meet ``budget`` (see the module
    docstring). ``config``: the base config (default ``QuantConfig()``). ``eval_data``: the samples
    the output metrics are measured on (default: the calibration data's first ones). ``output``:
    as for :func:`onnxq.quantize`. Calibration data is read once."""
    if not isinstance(budget, MixedPrecision):
        raise ConfigError(f"budget must be an onnxq MixedPrecision, not {type(budget).__name__}")
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an onnxq.QuantConfig, not {type(config).__name__}")
    if config.activations is None and config.algorithm is not None:
        raise ConfigError(
            f"quantize_mixed with a weight-only {type(config.algorithm).__name__}() base would rerun "
            "its calibration for every trial: search with the round-to-nearest base (algorithm=None), "
            "then quantize with the algorithm and the returned config's exclude_nodes"
        )
    if config.activations is None and budget.fallback != "float":
        raise ConfigError("a weight-only base has no activations to move to 16 bits: use fallback='float'")
    if budget.fallback == "int16" and not (
        isinstance(config.calibration, MinMax)
        and all(s is None or s.calibration is None for s in config.overrides.values())
    ):
        raise ConfigError("MixedPrecision(fallback='int16') reuses MinMax ranges; use calibration=MinMax()")
    output_path = Path(output) if output is not None else _default_output(model)
    if output_path is not None and not output_path.parent.is_dir():
        raise OutputError(f"output folder {output_path.parent} does not exist; create it first")
    given_path = isinstance(model, str | os.PathLike)
    ir_model = load_model(model)
    inputs = model_inputs(ir_model)
    first, samples = peek_samples(calib_data, inputs, config.num_samples)
    if RULES[config.target].static_shapes:
        samples = _same_shapes(first, samples, config.target)
    tmp_parent = output_path.parent if output_path is not None else None
    file_name = output_path.name if output_path is not None else "model.onnx"
    with tempfile.TemporaryDirectory(prefix=".onnxq-mixed.", dir=tmp_parent) as tmp_name:
        tmp = Path(tmp_name)
        if given_path and Path(model).is_file():
            source = Path(model).resolve()
        elif given_path:
            from onnxq.model_io import model_in_folder

            source = model_in_folder(Path(model)).resolve()
        else:
            (tmp / "source").mkdir()
            source = save_model(ir_model, tmp / "source" / "model.onnx")
        del ir_model
        builder = _Builder(source, config, budget, first, tmp, file_name)
        eval_list: list[Sample] = []
        keep = 0 if eval_data is not None else budget.eval_samples
        log.info("mixed precision: calibrating once")
        builder.calibrate(_capture(samples, keep, eval_list))
        if eval_data is not None:
            eval_list = list(checked_samples(eval_data, inputs, budget.eval_samples))
        (tmp / "fp32").mkdir()
        fp32_prepared = save_model(builder.prepared(), tmp / "fp32" / "model.onnx")
        reference = _Reference(fp32_prepared, eval_list)
        fp32_score = float(budget.eval_fn(source)) if budget.eval_fn is not None else None

        trials: list[Trial] = []
        cache: dict[frozenset[str], BudgetMetrics] = {}
        files: dict[frozenset[str], Path] = {}
        extras: dict[frozenset[str], tuple[QuantPlan, dict[str, float], QuantConfig]] = {}

        def evaluate(path: Path, with_outputs: bool) -> BudgetMetrics:
            outputs = _output_metrics(path, reference) if with_outputs else ()
            score = float(budget.eval_fn(path)) if budget.eval_fn is not None else None
            ok = True
            if budget.min_cosine is not None:
                ok &= all(o.cosine >= budget.min_cosine for o in outputs)
            if budget.min_sqnr_db is not None:
                ok &= all(o.sqnr_db >= budget.min_sqnr_db for o in outputs)
            if budget.eval_fn is not None:
                assert fp32_score is not None and score is not None and budget.max_drop is not None
                ok &= fp32_score - score <= budget.max_drop + 1e-12
            return BudgetMetrics(outputs, score, bool(ok))

        def trial(nodes: Sequence[str], step: str, keep_file: bool = False) -> BudgetMetrics:
            key = frozenset(nodes)
            if key in cache:
                return cache[key]
            path, plan, smoothing, cfg = builder.build(nodes)
            with_outputs = budget.eval_fn is None or not nodes or keep_file
            metrics = evaluate(path, with_outputs)
            cache[key] = metrics
            trials.append(Trial(tuple(nodes), metrics, step))
            log.info(
                "mixed precision: %d nodes out of 8 bits -> %s (%s)",
                len(nodes),
                _metrics_text(metrics, fp32_score),
                "pass" if metrics.met else "fail",
            )
            if metrics.met:  # a passing trial supersedes the previous one (each is smaller)
                for old in [k for k in files if k and k != key]:
                    shutil.rmtree(files.pop(old).parent, ignore_errors=True)
                    extras.pop(old)
            if keep_file or metrics.met:
                files[key], extras[key] = path, (plan, smoothing, cfg)
            else:
                shutil.rmtree(path.parent, ignore_errors=True)
            return metrics

        before = trial([], "base", keep_file=True)
        base_key = frozenset()
        base_path = files[base_key]
        report = diff(
            fp32_prepared,
            base_path,
            eval_list[: budget.diff_samples],
            progress=progress,
        )
        ranking = _candidates(extras[base_key][0], builder.prepared(), report)
        ranked_by: Literal["measured", "added_error"] = "added_error"
        ranking_quantizations = 0
        notes: list[str] = list(builder.notes)
        measure = budget.ranking == "measured" or (
            budget.ranking == "auto" and budget.eval_fn is None and len(ranking) <= budget.max_measured
        )
        if measure and ranking and not before.met and before.outputs:  # float outputs to measure
            base_sqnr = min(o.sqnr_db for o in before.outputs)
            gains: dict[str, float] = {}
            for c in tqdm(ranking, desc="mixed precision: ranking", unit="node", disable=not progress):
                path = builder.build([c.name])[0]
                try:
                    gains[c.name] = min(o.sqnr_db for o in _output_metrics(path, reference)) - base_sqnr
                finally:
                    shutil.rmtree(path.parent, ignore_errors=True)
            ranking, ranked_by, ranking_quantizations = _by_gain(ranking, gains), "measured", len(gains)
            notes.append(
                f"ranking measured: each of the {len(gains)} candidates quantized alone out of 8 bits "
                f"(output SQNR gain {max(gains.values()):+.2f} .. {min(gains.values()):+.2f} dB)"
            )
        elif not before.met and ranking:
            why = ""
            if budget.ranking == "auto":
                why = (
                    " (an eval_fn budget: ranking='measured' would rank by output SQNR)"
                    if budget.eval_fn is not None
                    else f" (more than max_measured={budget.max_measured})"
                )
            notes.append(f"ranking by added error: {len(ranking)} candidates{why}")
        order = "output SQNR it gains alone" if ranked_by == "measured" else "added error"
        names = [c.name for c in ranking]
        cap = len(names) if budget.max_float_nodes is None else min(budget.max_float_nodes, len(names))

        # Prefix search: gallop, then bisect.
        k: int | None = 0 if before.met else None
        if k is None:
            lo, probe = 0, 1
            while lo < cap:
                probe = min(probe, cap)
                if trial(names[:probe], f"gallop k={probe}").met:
                    k = probe
                    break
                lo, probe = probe, 2 * probe
            if k is not None:
                while k - lo > 1:
                    mid = (lo + k) // 2
                    if trial(names[:mid], f"bisect k={mid}").met:
                        k = mid
                    else:
                        lo = mid
        met = k is not None
        chosen_names = list(names[: (k if met else cap)])
        reasons = {
            n: f"ranked {i + 1} of {len(names)} by {order}; the top {len(chosen_names)} meet the "
            f"budget, the top {len(chosen_names) - 1} do not"
            for i, n in enumerate(chosen_names)
        }
        if not met:
            notes.append(
                f"budget not met even with the top {cap} of {len(names)} candidate nodes out of 8 bits"
            )
            reasons = {
                n: f"ranked {i + 1} of {len(names)}; budget not met" for i, n in enumerate(chosen_names)
            }
        elif budget.refine and len(chosen_names) > 1:
            for name in list(reversed(chosen_names))[: budget.max_refine_trials + 1]:
                rest = [n for n in chosen_names if n != name]
                if not rest:
                    break
                if trial(rest, f"refine: without {name}").met:
                    chosen_names = rest
                    reasons.pop(name)
            reasons = {
                n: f"ranked {names.index(n) + 1} of {len(names)} by {order}; the budget fails without it"
                for n in chosen_names
            }
        final_key = frozenset(chosen_names)
        if final_key not in files:  # the capped model of an unmet budget, or a dropped file
            cache.pop(final_key, None)
            trial(chosen_names, "final", keep_file=True)
        after = cache[final_key]
        if budget.eval_fn is not None and not after.outputs:
            after = BudgetMetrics(_output_metrics(files[final_key], reference), after.score, after.met)
        final_path = files[final_key]
        plan, smoothing, final_config = extras[final_key]

        latency_ms: dict[str, float] = {}
        latency_ratio: dict[str, float] = {}
        if budget.measure_latency and eval_list:
            latency_ms, latency_ratio = _latencies(
                {"fp32": source, "base": base_path, "chosen": final_path},
                eval_list[:LATENCY_SAMPLES],
                budget,
            )
        size_fp32 = _file_size(source)
        size_base = _file_size(base_path)
        size_after = _file_size(final_path)
        check_model_file(final_path)
        if output_path is not None:
            try:
                os.replace(final_path, output_path)
                data = final_path.with_name(final_path.name + ".data")
                if data.exists():
                    os.replace(data, output_path.with_name(output_path.name + ".data"))
            except OSError as exc:
                raise OutputError(f"cannot write {output_path}: {exc.strerror}") from None
            result_model = load_model(output_path)
        else:
            result_model = ir.load(final_path)
            for graph in result_model.graphs():  # detach from the temporary file
                for value in graph.initializers.values():
                    if isinstance(value.const_value, ir.ExternalTensor):
                        value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)

    rank = {c.name: c for c in ranking}
    chosen = tuple(
        FloatChoice(n, rank[n].op_type, rank[n].added_db, rank[n].rank, reasons[n], rank[n].gain_db)
        for n in sorted(chosen_names, key=lambda n: rank[n].rank)
    )
    summary = QuantizationSummary(
        quantized_nodes=plan.quantized_counts(),
        float_nodes=tuple(FloatNode(n.name, n.op_type, n.reason) for n in plan.float_nodes()),
        size_before=size_fp32,
        size_after=size_after,
        calibration_samples=builder.calibration.samples_seen,
        fidelity=after.outputs,
        fidelity_samples=len(eval_list),
        **summary_fields(smoothing),
        notes=tuple(notes),
        dynamic=builder.dynamic,
    )
    return MixedPrecisionResult(
        output_path=output_path,
        model=result_model,
        config=final_config,
        budget=budget,
        met=met and after.met,
        chosen=chosen,
        ranking=tuple(ranking),
        fp32_score=fp32_score,
        before=before,
        after=after,
        trials=tuple(trials),
        size_fp32=size_fp32,
        size_base=size_base,
        size_after=size_after,
        latency_ms=latency_ms,
        latency_ratio=latency_ratio,
        summary=summary,
        diff=report,
        notes=tuple(notes),
        ranked_by=ranked_by,
        ranking_quantizations=ranking_quantizations,
    )
