"""``onnxq.quantize``: the whole static pipeline, one readable list of passes.

prepare (opset, constant folding, Constant → initializer, BatchNorm folding, Identity removal,
shape inference; for targets that need them, static input shapes and finite mask sentinels) → plan
→ calibration (MinMax or a histogram method) → rewrite (QDQ insertion, weight pre-quantization,
int32 bias, clean-up) → check → save → fidelity. ``config.target``'s rules (``onnxq.plan.RULES``)
say which of the optional steps run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveUnusedNodesPass,
)

from onnxq import metrics, model_io
from onnxq.calibrate import CalibrationResult, calibrate, proto_for_ort, segment_opener
from onnxq.config import Dynamic, MinMax, QuantConfig, QuantSpec
from onnxq.data import Sample, model_inputs, peek_samples
from onnxq.errors import (
    CalibrationDataError,
    ConfigError,
    ModelLoadError,
    OnnxqError,
    OutputError,
    QuantizationError,
)
from onnxq.model_io import load_model, model_in_folder, save_model
from onnxq.passes._util import SpillFile
from onnxq.passes.bias_correction import BiasStatistics, CorrectBias
from onnxq.passes.cleanup import Cleanup
from onnxq.passes.declared_types import KeepDeclaredTypes, declared_types
from onnxq.passes.dynamic import DynamicPlanner, dynamic_passes, dynamic_references
from onnxq.passes.eliminate_identity import EliminateIdentity
from onnxq.passes.equalize import equalize_model
from onnxq.passes.finite_mask import FiniteMaskSentinels
from onnxq.passes.fold_batchnorm import FoldBatchNorm
from onnxq.passes.fold_constants import FoldConstants
from onnxq.passes.fuse_gelu import FuseGelu
from onnxq.passes.hoist_constants import HoistBodyConstants
from onnxq.passes.implicit_zero_points import ImplicitZeroPoints
from onnxq.passes.infer_shapes import InferShapes
from onnxq.passes.insert_qdq import InsertQDQ
from onnxq.passes.name_body_nodes import NameBodyNodes
from onnxq.passes.prequantize_weights import PrequantizeWeights
from onnxq.passes.quantize_bias import QuantizeBias
from onnxq.passes.quantize_bodies import QuantizeBodies
from onnxq.passes.smooth import (
    SmoothActivations,
    SmoothBodies,
    body_channels,
    choose_scales,
    find_body_candidates,
    find_candidates,
    smooth_bodies,
    summary_fields,
)
from onnxq.passes.static_shapes import FixInputShapes, RefreshShapes
from onnxq.passes.upcast_half import UpcastHalf
from onnxq.passes.upgrade_opset import MIN_OPSET, OPSET_16BIT, UpgradeOpset
from onnxq.plan import QUANTIZED_OPS, RULES, Planner, QuantPlan, TargetRules
from onnxq.result import FloatNode, OutputFidelity, QuantizationResult, QuantizationSummary
from onnxq.segments import SegmentRunner

log = logging.getLogger(__name__)

# Calibration samples (the first ones) whose fp32 outputs are kept to measure fidelity afterwards.
FIDELITY_SAMPLES = 8
# Models with more weight bytes than this write new weights (smoothed, quantized) to a spill file
# beside the output as they are made, instead of keeping them all in memory until the save.
SPILL_ABOVE_BYTES = 2**30


def prepare_passes(
    upgrade: UpgradeOpset,
    static_shapes: FixInputShapes | None = None,
    finite_mask: FiniteMaskSentinels | None = None,
    fuse_gelu: FuseGelu | None = None,
    upcast: UpcastHalf | None = None,
) -> ir.passes.PassManager:
    """Passes that put any model into the canonical form the planner reads. With ``static_shapes``,
    input dimensions are fixed first and shapes inferred before folding, so shape arithmetic
    (Shape → Gather → Concat → Reshape chains) folds into constants; ``finite_mask`` then makes
    mask sentinels finite and ``fuse_gelu`` turns erf-GELU into ``Gelu``."""
    fold = [
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        FoldConstants(),
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
    ]
    if static_shapes is not None:  # each round folds the shape arithmetic the previous one exposed
        again = [RefreshShapes(), InferShapes(), *fold[1:]]
        fold = [static_shapes, InferShapes(), *fold, *again, *again]
    return ir.passes.PassManager(
        [
            upcast or UpcastHalf(),
            upgrade,
            *fold,
            HoistBodyConstants(),
            *([finite_mask] if finite_mask is not None else []),
            *([fuse_gelu] if fuse_gelu is not None else []),
            FoldBatchNorm(),
            EliminateIdentity(),
            RemoveUnusedNodesPass(),
            NameBodyNodes(),
            NameFixPass(),
            InferShapes(),
        ]
    )


def rewrite_passes(
    plan: QuantPlan,
    ranges: dict[str, tuple[float, float]],
    smoothing: SmoothActivations | None = None,
    rules: TargetRules = RULES["cpu"],
    bias_correction: CorrectBias | None = None,
    body_ranges: dict[int, dict[str, tuple[float, float]]] | None = None,
    body_smoothing: SmoothBodies | None = None,
) -> ir.passes.PassManager:
    """Passes that apply a calibrated plan (SmoothQuant first, in the main graph then in the bodies,
    when it has anything to smooth), as
    the target's ``rules`` say (int32 biases or not, pairs around data movement kept or not);
    ``bias_correction`` corrects float biases between Q/DQ insertion and weight pre-quantization.
    The plan's If/Loop/Scan bodies are rewritten last, with ``body_ranges``; then int8 activation
    zero points become implicit at opset ≥ 21 (:mod:`onnxq.passes.implicit_zero_points`)."""
    passes: list[ir.passes.PassBase] = [smoothing] if smoothing is not None else []
    if body_smoothing is not None:
        passes.append(body_smoothing)
    passes.append(InsertQDQ(plan, ranges))
    if bias_correction is not None:
        passes.append(bias_correction)
    passes.append(PrequantizeWeights())
    if rules.quantize_bias:
        ops = ("Conv", "Gemm", "LayerNormalization") if rules.every_op else ("Conv", "Gemm")
        passes.append(QuantizeBias(ops))
    passes.append(Cleanup(drop_data_movement=rules.drop_data_movement_pairs))
    if plan.bodies:
        passes.append(QuantizeBodies(plan.bodies, body_ranges or {}, rules))
    passes.append(ImplicitZeroPoints())
    return ir.passes.PassManager(passes)


def _same_shapes(first: Sample, samples: Iterator[Sample], target: str) -> Iterator[Sample]:
    """The samples, each checked to have the first one's shapes (the model's inputs were fixed to
    them for a static-shape target)."""
    for i, sample in enumerate(samples):
        for name, array in sample.items():
            if name in first and array.shape != first[name].shape:
                raise CalibrationDataError(
                    f"calibration sample {i}: {name} has shape {list(array.shape)}, but target "
                    f"{target!r} compiles static shapes, fixed from the first sample "
                    f"({list(first[name].shape)}); give samples of one shape (for texts: "
                    "from_texts(..., padding='max_length'))"
                )
        yield sample


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _reject_quantized(model: ir.Model) -> None:
    ops = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if ops:
        raise QuantizationError(
            f"the model is already quantized (it contains {', '.join(ops)}); quantize the float model instead"
        )


def required_opset(config: QuantConfig) -> int:
    """The lowest default-domain opset the config's QDQ needs (21 for 16-bit types, else 13, or
    the target's own minimum if higher)."""
    specs = [config.activations, config.weights, *(s for s in config.overrides.values() if s is not None)]
    needed = OPSET_16BIT if any(s.dtype in ("uint16", "int16") for s in specs) else MIN_OPSET
    return max(needed, RULES[config.target].min_opset)


def prepare(model: Any, config: QuantConfig | None = None) -> tuple[ir.Model, UpgradeOpset]:
    """Load ``model`` and run the prepare passes (the input itself is never modified)."""
    ir_model = load_model(model)
    config = config or QuantConfig()
    return ir_model, prepare_model(ir_model, required_opset(config), RULES[config.target])


def prepare_model(
    ir_model: ir.Model,
    min_opset: int = MIN_OPSET,
    rules: TargetRules | None = None,
    sample: Sample | None = None,
    notes: list[str] | None = None,
) -> UpgradeOpset:
    """Run the prepare passes on a loaded model in place; returns the opset pass (what it upgraded).

    ``rules``: the target's; with ``static_shapes`` and a ``sample``, symbolic input dimensions are
    fixed to the sample's shapes. What the target-specific passes changed is appended to ``notes``.
    """
    _reject_quantized(ir_model)
    upgrade = UpgradeOpset(min_opset)
    rules = rules or RULES["cpu"]
    static = FixInputShapes(sample) if rules.static_shapes and sample is not None else None
    mask = FiniteMaskSentinels(rules.finite_mask) if rules.finite_mask is not None else None
    gelu = FuseGelu() if rules.fuse_gelu else None
    upcast = UpcastHalf()
    try:
        prepare_passes(upgrade, static, mask, gelu, upcast)(ir_model)
    except OnnxqError:
        raise
    except Exception as exc:
        raise QuantizationError(f"could not prepare the model for quantization: {_root_cause(exc)}") from exc
    if notes is not None and upcast.upcast:
        notes.append(f"{upcast.upcast} model: quantized through float32; inputs and outputs keep their type")
    if notes is not None and static is not None and static.fixed:
        shapes = ", ".join(f"{k} {list(v)}" for k, v in static.fixed.items())
        notes.append(
            f"static shapes (the target compiles fixed shapes only): inputs fixed to the first "
            f"calibration sample's shapes: {shapes}"
        )
    if notes is not None and mask is not None and mask.replaced:
        notes.append(
            f"mask sentinels (|v| >= 1e9, e.g. float32.min) replaced by ±{mask.value:g} so the mask "
            f"path can be quantized: {', '.join(mask.replaced)}"
        )
    if notes is not None and gelu is not None and gelu.fused:
        notes.append(f"{gelu.fused} erf-GELU subgraphs fused into Gelu (the target has no Erf)")
    return upgrade


def make_plan(model: ir.Model, config: QuantConfig) -> QuantPlan:
    """The quantization plan of a prepared model."""
    planner = DynamicPlanner if isinstance(config.calibration, Dynamic) else Planner
    return planner(config).plan(model)


def _default_output(model: Any) -> Path | None:
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.is_dir():
            try:
                path = model_in_folder(path)
            except ModelLoadError:
                return path / "model.quant.onnx"  # load_model reports the problem
        return path.with_name(path.stem + ".quant.onnx")
    return None


def _file_size(path: Path) -> int:
    """Bytes of a model file plus its ``<name>.data`` external-data file, if any."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def _size_of(model: Any, ir_model: ir.Model) -> int:
    if isinstance(model, str | os.PathLike) and Path(model).is_file():
        return _file_size(Path(model))
    return sum(
        v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None
    )


MASK_INPUT = "attention_mask"


def _real_positions(sample: Sample, value: np.ndarray) -> np.ndarray:
    """``value`` flattened, keeping only the positions a 2-D ``attention_mask`` input marks real when
    the output's leading axes are ``[batch, sequence]`` (padding positions are computed but unused, and
    their errors say nothing about the model); the whole of ``value`` otherwise."""
    mask = sample.get(MASK_INPUT)
    if mask is not None and mask.ndim == 2 and value.ndim >= 2 and value.shape[:2] == mask.shape:
        return value[mask.astype(bool)].ravel()
    return value.ravel()


def measure_fidelity(
    model: ir.Model | Path, inputs: list[Sample], references: list[dict[str, np.ndarray]]
) -> tuple[OutputFidelity, ...]:
    """Cosine, SQNR and max abs error of ``model``'s outputs (a model or a saved file) against fp32
    ``references``, over the real (not padded) positions when the model takes an ``attention_mask``.
    A model with more weights than one calibration segment runs segment by segment
    (:mod:`onnxq.segments`), so this check holds no more weights in memory than calibration did."""
    if not inputs:
        return ()
    if isinstance(model, Path):
        proto, folder = model_io.read_graph(model), model.parent.resolve()
    else:
        proto, folder = proto_for_ort(model)

    runner = SegmentRunner(proto, segment_opener(folder))
    del proto
    errors: dict[str, metrics.RunningError] = {}
    try:
        for index, outputs in runner.run(inputs):
            sample, ref = inputs[index], references[index]
            # each output is folded at once: logits are large
            for name, value in outputs.items():
                if name in ref and np.issubdtype(value.dtype, np.floating):
                    errors.setdefault(name, metrics.RunningError()).fold(
                        _real_positions(sample, ref[name]), _real_positions(sample, value)
                    )
    except OnnxqError:
        raise
    except Exception as exc:
        raise QuantizationError(
            f"ONNX Runtime's CPU EP cannot run the quantized model ({_root_cause(exc).rstrip('.')}); "
            "nothing was written: exclude the nodes involved from quantization (--exclude) or report it"
        ) from None
    names = [o.name for o in runner.model.graph.output]
    result = [
        OutputFidelity(n, errors[n].cosine(), errors[n].sqnr_db(), errors[n].max_err)
        for n in names
        if n in errors
    ]
    return tuple(result)


class VerifiedSave:
    """``save_model``'s check of the written file before it is renamed into place: the full
    ``onnx.checker`` check, then, with ``inputs``, the fidelity check on ORT's CPU EP (kept in
    ``fidelity``). A model that fails either is never left at the output."""

    def __init__(
        self, inputs: Sequence[Sample] = (), references: Sequence[dict[str, np.ndarray]] = ()
    ) -> None:
        self.inputs, self.references = list(inputs), list(references)
        self.fidelity: tuple[OutputFidelity, ...] = ()

    def __call__(self, path: Path) -> None:
        check_model_file(path)
        if self.inputs:
            self.fidelity = measure_fidelity(path, self.inputs, self.references)


def quantize(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    calib_data: Any = None,
    *,
    config: QuantConfig | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize ``model`` statically with ``calib_data`` and return the result.

    With ``config.calibration=Dynamic()`` activations are quantized at run time instead: no data is
    needed, and ``calib_data``, when given, is validated and used for the fidelity report only
    (``onnxq.passes.dynamic`` says what the rewrite emits per target).

    ``model``: a path (file, or a folder holding one .onnx), an ``onnx.ModelProto`` or an
    ``onnx_ir.Model``. ``calib_data``: an iterable of ``{input_name: array}`` dicts, an array or list
    of arrays for a single-input model, or a ``.npz`` path. ``output``: where to write; by default a
    model given as a path is written beside it as ``<name>.quant.onnx`` and an in-memory model is
    not written.

    Guarantees: the input is never modified; calibration data is validated before any heavy work;
    the output passes ``onnx.checker`` and is written atomically; the same inputs give a
    byte-identical file; every failure a user can cause raises an :class:`onnxq.OnnxqError`.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an onnxq.QuantConfig, not {type(config).__name__}")
    output_path = Path(output) if output is not None else _default_output(model)
    if output_path is not None and not output_path.parent.is_dir():
        raise OutputError(f"output folder {output_path.parent} does not exist; create it first")
    if config.activations is None:  # weight-only: no calibration (onnxq/weight_only.py)
        from onnxq.weight_only import quantize_weight_only

        return quantize_weight_only(model, config, output_path, calib_data, progress)
    ir_model = load_model(model)
    declared = declared_types(ir_model)
    dynamic = isinstance(config.calibration, Dynamic)
    if dynamic and calib_data is None:
        first, samples = None, iter(())
    else:
        first, samples = peek_samples(calib_data, model_inputs(ir_model), config.num_samples)
    size_before = _size_of(model, ir_model)
    rules = RULES[config.target]
    notes: list[str] = []
    upgrade = prepare_model(ir_model, required_opset(config), rules, first, notes)
    if config.equalization is not None:  # data-free, after BatchNorm folding, before the plan
        equalize_model(ir_model, config.equalization, notes)
    if rules.static_shapes:
        samples = _same_shapes(first, samples, config.target)

    keep = FIDELITY_SAMPLES if config.fidelity else 0
    if dynamic:  # no calibration: DynamicQuantizeLinear computes activation scales at run time
        plan, scales = make_plan(ir_model, config), {}
        calibration = dynamic_references(ir_model, samples, keep)
        rewrite = dynamic_passes(plan, config)
    else:
        plan, calibration, scales, rewrite = _calibrated_rewrite(ir_model, config, samples, keep, progress)
    with _spill_for(ir_model, output_path) as spill:
        for step in rewrite.passes:
            if hasattr(step, "spill"):
                step.spill = spill
        try:
            rewrite(ir_model)
            KeepDeclaredTypes(declared)(ir_model)
        except OnnxqError:
            raise
        except Exception as exc:
            raise QuantizationError(f"rewriting the graph failed: {_root_cause(exc)}") from exc
        ir_model.producer_name, ir_model.producer_version = "onnxq", _version()
        if output_path is not None:
            if spill is not None:
                spill.close()
            verify = VerifiedSave(calibration.kept_inputs, calibration.kept_outputs)
            save_model(ir_model, output_path, verify=verify, release=True)
            size_after, fidelity = _file_size(output_path), verify.fidelity
        else:
            _check_in_memory(ir_model)
            size_after = ir.to_proto(ir_model).ByteSize()
            fidelity = measure_fidelity(ir_model, calibration.kept_inputs, calibration.kept_outputs)
    in_bodies = sum(n.quantized for b in plan.bodies for n in b.plan.nodes.values())
    if in_bodies and not dynamic and not isinstance(config.calibration, MinMax):
        notes.append(
            f"{in_bodies} nodes inside If/Loop/Scan bodies read MinMax ranges: "
            f"{type(config.calibration).__name__} needs whole activations, which a body cannot return"
        )
    summary = QuantizationSummary(
        quantized_nodes=plan.quantized_counts(),
        float_nodes=tuple(FloatNode(n.name, n.op_type, n.reason) for n in plan.float_nodes()),
        size_before=size_before,
        size_after=size_after,
        calibration_samples=calibration.samples_seen,
        fidelity=fidelity,
        fidelity_samples=len(calibration.kept_inputs),
        opset_upgraded_from=upgrade.upgraded_from,
        **summary_fields(scales),
        notes=tuple(notes),
        dynamic=dynamic,
    )
    log.info("quantized %d nodes", sum(summary.quantized_nodes.values()))
    return QuantizationResult(output_path, ir_model, summary)


@contextlib.contextmanager
def _spill_for(model: ir.Model, output: Path | None) -> Iterator[SpillFile | None]:
    """A spill file in a private folder beside ``output`` (removed on exit) when the model's weights
    exceed :data:`SPILL_ABOVE_BYTES`: new weights then wait for the save on disk, not in memory."""
    values = model.graph.initializers.values()
    weights = sum(v.const_value.nbytes for v in values if v.const_value is not None)
    if output is None or weights <= SPILL_ABOVE_BYTES:
        yield None
        return
    if not os.access(output.parent, os.W_OK):
        raise OutputError(f"output folder {output.parent} is not writable; choose another output path")
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.spill-", dir=output.parent) as folder:
        spill = SpillFile(Path(folder))
        try:
            yield spill
        finally:
            spill.close()


def calibrate_plan(
    model: ir.Model,
    plan: QuantPlan,
    config: QuantConfig,
    tensors: Mapping[str, QuantSpec],
    samples: Iterator[Sample],
    channels: Iterable[str],
    *,
    keep: int,
    progress: bool,
) -> tuple[CalibrationResult, dict[str, tuple[str, int]]]:
    """One streaming pass for ``plan``: the ranges of ``tensors``, the per-channel statistics of
    ``channels`` and of the SmoothQuant candidates in its bodies, and, with ``config``'s bias
    correction, the input means of every node the plan quantizes. Returns the calibration and bias
    correction's inputs (node -> its mean tensor and axis; empty without it); the temporary
    statistics nodes are gone from ``model`` again."""
    in_bodies = find_body_candidates(plan.bodies) if config.smoothing is not None else {}
    bc = config.bias_correction
    bc_stats = BiasStatistics(model, plan, bc) if bc is not None else None
    try:
        calibration = calibrate(
            model,
            tensors,
            samples,
            config.calibration,
            total=config.num_samples,
            keep=keep,
            progress=progress,
            channels=channels,
            means=bc_stats.tensors if bc_stats is not None else None,
            bodies={id(b.graph): b.plan.calibration_tensors() for b in plan.bodies},
            body_channels=body_channels(in_bodies),
        )
    finally:
        if bc_stats is not None:
            bc_stats.remove()
    return calibration, bc_stats.inputs if bc_stats is not None else {}


def _calibrated_rewrite(
    ir_model: ir.Model, config: QuantConfig, samples: Iterator[Sample], keep: int, progress: bool
) -> tuple[QuantPlan, CalibrationResult, dict[str, Any], ir.passes.PassManager]:
    """The static path: plan, calibrate (with SmoothQuant's statistics), and the rewrite to apply."""
    plan = make_plan(ir_model, config)
    candidates = find_candidates(ir_model, plan) if config.smoothing is not None else {}
    in_bodies = find_body_candidates(plan.bodies) if config.smoothing is not None else {}
    tensors = {name: plan.activations[name].spec for name in plan.calibration_tensors()}
    calibration, bias_inputs = calibrate_plan(
        ir_model, plan, config, tensors, samples, candidates, keep=keep, progress=progress
    )
    scales = (
        choose_scales(candidates, calibration.channels, plan, config.smoothing)
        if config.smoothing is not None
        else {}
    )
    smoothing = SmoothActivations(plan, calibration.ranges, candidates, scales, calibration.channels)
    body_smoothing = smooth_bodies(
        in_bodies, calibration.body_channels, calibration.body_ranges, config.smoothing
    )
    bc = config.bias_correction
    correct = CorrectBias(bc, bias_inputs, calibration.means) if bc is not None else None
    rewrite = rewrite_passes(
        plan,
        calibration.ranges,
        smoothing,
        RULES[config.target],
        correct,
        calibration.body_ranges,
        body_smoothing,
    )
    return plan, calibration, {**scales, **body_smoothing.scales}, rewrite


def check_model_file(path: Path) -> None:
    """Full ``onnx.checker`` check (with shape inference) of a saved model, large weights left on disk
    (:func:`onnxq.model_io.check_model_file`); QuantizationError if it fails."""
    try:
        model_io.check_model_file(path)
    except Exception as exc:
        raise QuantizationError(
            f"the quantized model fails onnx.checker: {str(exc).splitlines()[0]}"
        ) from None


def _check_in_memory(model: ir.Model) -> None:
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except Exception as exc:
        raise QuantizationError(
            f"the quantized model fails onnx.checker: {str(exc).splitlines()[0]}"
        ) from None


def _version() -> str:
    from onnxq import __version__

    return __version__
