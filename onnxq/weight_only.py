"""Weight-only quantization: ``onnxq.quantize(model, config=QuantConfig.weight_only(...))``.

No calibration data: weights are quantized round-to-nearest from their own values, activations
stay float. With ``config.algorithm`` (``GPTQ()``/``AWQ()``, :mod:`onnxq.weight_algorithms`) the
calibration data is required: one streaming pass gathers the statistics (and the fidelity
references) after the Constant lifting, then AWQ rewrites float weights before the pass, or GPTQ
replaces round-to-nearest inside it. The pipeline is short:

    load (weights stay memory-mapped in the file) → opset upgrade (21; 23 for float4e2m1; 25 for
    int2/uint2) → Constant → initializer, unused-node removal, naming → WeightOnlyQuantize (one
    weight at a time, each released after use) → check → save → fidelity (only when samples are
    given).

Integer types are symmetric when signed (no zero point) and asymmetric when unsigned (a zero point
per block). What is emitted for MatMul, Gemm and Gather, and how ONNX Runtime runs it, is in
:mod:`onnxq.passes.weight_only`; the arithmetic in :mod:`onnxq.lowbit` and :mod:`onnxq.codebook`.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, NameFixPass, RemoveUnusedNodesPass

from onnxq.config import Codebook, PerTensor, QuantConfig
from onnxq.errors import CalibrationDataError, ConfigError, OnnxqError, QuantizationError
from onnxq.lowbit import WEIGHT_TYPES
from onnxq.model_io import load_model, save_model
from onnxq.passes.name_body_nodes import NameBodyNodes
from onnxq.passes.upgrade_opset import UpgradeOpset
from onnxq.passes.weight_only import SpillFile, WeightOnlyQuantize
from onnxq.result import FloatNode, QuantizationResult, QuantizationSummary

log = logging.getLogger(__name__)

# ONNX IR version each opset needs (onnx.helper.VERSION_TABLE).
_IR_VERSION = {21: 10, 22: 10, 23: 11, 24: 11, 25: 11}


def required_opset(config: QuantConfig) -> int:
    """The default-domain opset a weight-only config's DequantizeLinear needs."""
    w = config.weights
    if isinstance(w, Codebook):
        return 21  # Cast from uint4
    return WEIGHT_TYPES[w.dtype].min_opset


def is_weight_only(config: QuantConfig) -> bool:
    """Whether ``config`` asks for weight-only quantization (``activations=None``)."""
    return config.activations is None


def excluder(config: QuantConfig):
    """The config's exclusions as a function: node -> why it stays float ("" when it does not)."""

    def reason(node: ir.Node) -> str:
        if config.op_types is not None and node.op_type not in config.op_types:
            return f"{node.op_type} not in config.op_types"
        if node.op_type in config.exclude_op_types:
            return f"{node.op_type} excluded by config"
        if any(fnmatch.fnmatchcase(node.name or "", pat) for pat in config.exclude_nodes):
            return f"node {node.name} excluded by name"
        if config.exclude_if is not None and config.exclude_if(node):
            return f"node {node.name} excluded by predicate"
        return ""

    return reason


def _upgrade(model: ir.Model, opset: int) -> int | None:
    """Raise the default opset to ``opset`` (onnxscript's converter up to 21, then the import is
    raised: 22-25 changed no op an exported transformer uses in a way that matters here, and the
    checker verifies the result)."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", opset))
    if version >= opset:
        return None
    up = UpgradeOpset(min(opset, 21))
    up(model)
    if opset > 21:
        model.opset_imports[""] = opset
    model.ir_version = max(model.ir_version or 0, _IR_VERSION.get(opset, 10))
    return version


def quantize_weight_only(
    model: Any,
    config: QuantConfig,
    output: Path | None,
    calib_data: Any = None,
    progress: bool = True,
) -> QuantizationResult:
    """Weight-only quantization of ``model`` (see the module docstring); ``output=None`` keeps the
    result in memory. ``calib_data``, when given, only feeds the fidelity check (and, with
    ``config.algorithm``, GPTQ's/AWQ's statistics: then it is required)."""
    from onnxq import pipeline  # the static pipeline's helpers (it imports this module lazily)

    if isinstance(config.weights, Codebook):
        pass
    elif isinstance(config.weights.granularity, PerTensor):
        raise ConfigError(
            "weight-only quantization needs PerBlock(size) or PerChannel() weights, not PerTensor()"
        )
    ir_model = load_model(model)
    pipeline._reject_quantized(ir_model)
    size_before = pipeline._size_of(model, ir_model)
    samples = None
    algorithm = getattr(config, "algorithm", None)
    if algorithm is not None:  # GPTQ / AWQ: statistics and references from one pass (weight_algorithms)
        from onnxq.data import model_inputs, peek_samples

        if calib_data is None:
            raise CalibrationDataError(
                f"{type(algorithm).__name__}() needs calibration data: pass calib_data (e.g. a few "
                "hundred tokens of representative text per sample), or drop algorithm= for "
                "round-to-nearest without data"
            )
        _, samples = peek_samples(calib_data, model_inputs(ir_model), config.num_samples)
        references: tuple[list, list] = ([], [])
    elif calib_data is not None and config.fidelity:
        from onnxq.data import model_inputs, peek_samples

        _, samples = peek_samples(calib_data, model_inputs(ir_model), pipeline.FIDELITY_SAMPLES)
    if algorithm is None:
        references = _fp32_outputs(ir_model, samples) if samples is not None else ([], [])
    wo = WeightOnlyQuantize(config.weights, config.weight_format, excluder(config))
    spill_dir = None
    if output is not None:  # quantized weights wait for the save in a file, not in memory
        spill_dir = tempfile.TemporaryDirectory(
            prefix=f".{Path(output).name}.spill-", dir=Path(output).parent
        )
        wo.spill = SpillFile(Path(spill_dir.name))
    extra_notes: list[str] = []
    n_calib = 0
    try:
        upgraded = _upgrade(ir_model, required_opset(config))
        ir.passes.PassManager(canonical_passes())(ir_model)
        if algorithm is not None:
            from onnxq.weight_algorithms import prepare_algorithm

            keep = pipeline.FIDELITY_SAMPLES if config.fidelity else 0
            prepared = prepare_algorithm(
                ir_model, config, samples, excluder(config), keep=keep, progress=progress
            )
            wo.precomputed, references = prepared.quantizer, prepared.references
            extra_notes, n_calib = prepared.notes, prepared.samples
        ir.passes.PassManager([wo])(ir_model)
    except OnnxqError:
        raise
    except Exception as exc:
        raise QuantizationError(f"weight-only quantization failed: {pipeline._root_cause(exc)}") from exc
    if any(n.domain == "com.microsoft" for n in ir.traversal.RecursiveGraphIterator(ir_model.graph)):
        ir_model.opset_imports.setdefault("com.microsoft", 1)
    ir_model.producer_name, ir_model.producer_version = "onnxq", pipeline._version()
    if output is not None:
        wo.spill.close()  # type: ignore[union-attr]
        verify = pipeline.VerifiedSave(*references)
        try:  # the spilled weights are pointed at their bytes in the saved file
            save_model(ir_model, output, verify=verify, repoint_from=[wo.spill.path])  # type: ignore[union-attr]
        finally:
            spill_dir.cleanup()  # type: ignore[union-attr]
        size_after, fidelity = pipeline._file_size(output), verify.fidelity
    else:
        pipeline._check_in_memory(ir_model)
        size_after = ir.to_proto(ir_model).ByteSize()
        fidelity = pipeline.measure_fidelity(ir_model, *references)  # () without references
    notes = [f"weight-only: {describe(config)}; largest float weight {wo.largest_weight / 1e6:.1f} MB"]
    notes += extra_notes
    summary = QuantizationSummary(
        quantized_nodes=dict(sorted(wo.quantized.items())),
        float_nodes=tuple(FloatNode(name, "weight", reason) for name, reason in wo.skipped.items()),
        size_before=size_before,
        size_after=size_after,
        calibration_samples=n_calib,
        fidelity=fidelity,
        fidelity_samples=len(references[0]),
        opset_upgraded_from=upgraded,
        notes=tuple(notes),
    )
    return QuantizationResult(output, ir_model, summary)


def quantized_weights(model: ir.Model, config: QuantConfig) -> dict[str, list[tuple[str, str]]]:
    """The weights ``config`` would quantize in ``model``, a model :func:`canonical_passes` ran on
    (no weight is changed): weight name → its ``(node name, op type)`` readers. Excluding any one
    reader keeps the weight float."""
    wo = WeightOnlyQuantize(config.weights, config.weight_format, excluder(config))
    wo.dry_run = True
    wo(model)
    return wo.readers


def canonical_passes() -> list[ir.passes.PassBase]:
    """What runs before the weight-only rewrite (node names included, so exclusions match)."""
    return [
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        RemoveUnusedNodesPass(),
        NameBodyNodes(),
        NameFixPass(),
    ]


def describe(config: QuantConfig) -> str:
    """One line naming a weight-only config's format and algorithm, for summaries."""
    w = config.weights
    if isinstance(w, Codebook):
        return f"codebook {w.kind} ({w.bits}-bit indices, block {w.block_size})"
    gran = w.granularity
    algo = getattr(config, "algorithm", None)
    how = "round-to-nearest" if algo is None else repr(algo)
    return f"{w.dtype} {type(gran).__name__}{getattr(gran, 'size', '')}, {config.weight_format}, {how}"


def _fp32_outputs(ir_model: ir.Model, samples) -> tuple[list, list]:
    """The first samples and the float model's outputs on them (for the fidelity check), run
    segment by segment like calibration (:mod:`onnxq.segments`), so a big model is never loaded
    whole; decoder logits (~100 MB a sample) keep the number of samples kept small."""
    from onnxq.pipeline import FIDELITY_SAMPLES
    from onnxq.weight_algorithms import fp32_references

    return fp32_references(ir_model, list(itertools.islice(samples, FIDELITY_SAMPLES)))


__all__ = ["is_weight_only", "quantize_weight_only", "quantized_weights", "required_opset"]
