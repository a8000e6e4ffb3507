"""GPTQ and AWQ for integer weight-only quantization (``QuantConfig.weight_only(..., algorithm=...)``).

Both replace plain round-to-nearest (RTN) of MatMul/Gemm weights by something that looks at the
activations the weights multiply, and both emit exactly what the RTN pass emits (integer values,
per-block or per-channel scales, zero points for unsigned types, in the layout of
:func:`onnxq.lowbit.quantize_blocks`), so ONNX Runtime still fuses ``DequantizeLinear → MatMul``
into ``MatMulNBits`` and ``weight_format="matmul_nbits"`` works unchanged.

Modules: :mod:`onnxq.weight_stats` (targets, statistics, float rows: steps 1, 2 and 5),
:mod:`onnxq.gptq` (step 3), :mod:`onnxq.awq` (step 4) and this one, the entry point.

Pipeline (:func:`prepare_algorithm`, called by :func:`onnxq.weight_only.quantize_weight_only` after
the opset upgrade and before :class:`~onnxq.passes.weight_only.WeightOnlyQuantize`):

1. **Targets.** Every 2-D float initializer that the weight-only pass would quantize as a MatMul or
   Gemm weight (MatMul input 1, directly or through ``Transpose``; Gemm input 1 without ``transA``),
   not excluded by the config and not also read as a Gather table (a table keeps RTN), nor read
   inside an If/Loop/Scan body (its activations cannot be fetched; it keeps RTN). Its activations
   are input 0 of its readers (``X``, viewed as rows ``[-1, K]``).
2. **Statistics, one streaming pass.** The activations become extra outputs of an ORT session on the
   fp32 model (:class:`onnxq.calibrate._Augment`, weights not copied); each sample's tensors are
   folded into :class:`~onnxq.weight_stats.ActivationStats` and released, so memory holds one
   sample's activations plus the statistics, whatever the number of samples. Per distinct activation
   (q/k/v read one normed tensor and share its statistics): GPTQ keeps ``H = ΣXᵀX`` (float64
   ``K×K``: 19 MB at K = 1536); AWQ keeps ``Σ|X|`` per channel and a deterministic reservoir of at
   most ``AWQ.max_rows`` rows (each row gets a key from a generator seeded by the sample index, and
   the rows with the smallest keys are kept — the same rows whatever the sharding, so
   :meth:`~onnxq.weight_stats.ActivationStats.merge` is exact). The fp32 outputs of the first
   samples are kept for the fidelity report.
3. **GPTQ** (:func:`~onnxq.gptq.gptq_quantize`, called per weight by the pass, each Hessian released
   after its last weight): ``W [K, N]`` (ONNX MatMul layout, so the paper's "columns" are rows of K
   here and blocks run along K). Rows never active (``H_kk = 0``) are zeroed; ``damp · mean(diag
   H)`` is added to the diagonal; the upper Cholesky factor ``U`` of ``H⁻¹`` drives the update: row
   ``k`` is rounded with its block's scale, and its error ``(w_k - ŵ_k) / U_kk`` is subtracted from
   the later rows through ``U_k,k+1:`` (lazily, ``block_size_columns`` rows at a time). Scales are
   those of RTN (lowbit's convention: the signed extremum maps to ``qmin``), computed per block when
   the block is reached from the already-updated rows, or — with ``act_order`` (rows visited by
   ``diag H`` descending) or ``static_groups`` — for all blocks up front from the original weight,
   so blocks keep the original row order in either case. With ``clip_grid`` (default 20), each
   block's range may shrink (down to ``1 - max_shrink``) per output channel where that lowers the
   ``diag H``-weighted rounding error of the block. The factorisation of a Hessian is computed once
   for all weights sharing the activation. ``GPTQ(awq=AWQ())`` runs AWQ's scaling (step 4) first and
   GPTQ on the scaled weights with ``diag(1/s) H diag(1/s)``, from the same single pass. On
   SmolLM2-135M (int4, block 128, no clip search) act-order matters: without it, scales computed
   from the error-corrected rows gave a perplexity worse than RTN's.
4. **AWQ** (:func:`~onnxq.awq.apply_awq`, before the pass; it rewrites float weights and the pass
   then rounds them to nearest): for each activation ``X`` read only by target MatMuls (``q/k/v``,
   ``gate/up``, ``o``, ``down``, ``lm_head``), ``s = mean|X|^α`` normalised by ``sqrt(max s · min
   s)``, α on ``grid`` points of [0, 1) picked by ``‖X·W − (X/s)·Q(s·W)‖²`` on the sampled rows, all
   the group's weights concatenated. Then ``W`` rows ×= ``s`` and ``1/s`` is folded, in this order
   of preference, into: (a) the activation's producer ``Mul`` by a constant (RMSNorm/LayerNorm
   gamma: a new initializer ``gamma / s`` is written, so a gamma shared through Identity stays
   intact for its other readers); (b) the constant weight of a MatMul whose output is the producer
   or one operand of a producer ``Mul`` (the MLP's ``act(gate) · up`` → ``up``'s output columns);
   (c) otherwise a new ``Mul(X, 1/s)`` before the group (weight-only models keep float activations).
   Where ``X`` has other readers, only (c) is legal. All scales are searched on the original weights
   and then applied (scaling rows and columns commute). With ``clip``, each block's range is then
   shrunk to ``(1 - i / clip_grid) · max|W_block|`` for the ``i`` (up to ``max_shrink · clip_grid``)
   that minimises the block's partial-output error on the sampled rows, per output channel; weights
   are clamped to it. The modified float weights are held in memory until written back (the pass
   then quantizes and releases them one at a time). ``AWQ(loss="block")`` searches ``s`` on the
   output of the block the group feeds instead, as the AWQ paper and AutoAWQ do
   (:func:`~onnxq.awq.find_block_regions`: from the group's MatMuls forward to the next target
   MatMuls, so q/k/v → attention → o_proj and gate/up → act · up → down_proj; groups without one
   keep their own outputs): the block's run-time inputs (the activation, mask, rotary tables,
   shapes) of the first ``loss_samples`` samples are captured whole in the statistics pass (an
   :class:`~onnxq.segments.ActivationStore`, spilled to an anonymous temporary file past its budget)
   and ONNX Runtime runs the block with each candidate's weights as inputs. ``AWQ(sequential=True)``
   runs the searches layer by layer instead (:func:`~onnxq.weight_stats.layer_by_layer`, as GPTQ
   does): each group's statistics come from the outputs of the AWQ-quantized layers before it, and
   every scale is folded once all are known.
5. **Float rows** (``GPTQ.float_rows`` / ``AWQ.float_rows``, OWQ by Lee et al. 2024): per
   activation, the input features with the largest ``ΣX²`` (the Hessian diagonal; at most ``K //
   16``) keep their weight rows in float: the integer weight holds zeros there and
   :func:`~onnxq.weight_stats.add_float_rows` adds ``Gather(X, rows, axis=-1) → MatMul(·, W[rows]) →
   Add`` beside the MatMul (one Gather per activation; float32 rows stored as float16 behind a
   ``Cast`` that ONNX Runtime folds at load). GPTQ visits those rows first (zeroed, so no error is
   spread into them); AWQ leaves them out of its searches and takes them out after every scale is
   folded (so they carry the scales). Layer by layer, they are chosen from the Hessians of the
   quantized inputs and the next layer sees them float. Only activations whose readers are all plain
   MatMuls reading their weight as ``B`` get them. On SmolLM2-135M the two largest rows are the
   "massive activations" (thousands, where the rest is < 15): a weight's rounding error there is
   multiplied by them.

The float function is unchanged by AWQ's scaling (up to float rounding); only quantization error
moves. Calibration and evaluation data must be kept apart by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.awq import AWQReport, BlockRegion, apply_awq, awq_groups, find_block_regions, sequential_awq
from onnxq.config import GPTQ, QuantConfig, QuantSpec
from onnxq.gptq import GPTQQuantizer, SequentialGPTQ, sequential_gptq
from onnxq.passes._util import release
from onnxq.segments import ActivationStore, SampleFailed
from onnxq.weight_stats import (
    add_float_rows,
    choose_float_rows,
    collect_statistics,
    find_targets,
    float_row_readers,
)

log = logging.getLogger(__name__)


def fp32_references(model: ir.Model, inputs: list) -> tuple[list, list]:
    """The fp32 model's outputs on ``inputs`` (run segment by segment), for the fidelity check."""

    from onnxq.calibrate import KEEP_BYTES, proto_for_ort, segment_opener
    from onnxq.segments import SegmentRunner

    if not inputs:
        return [], []
    proto, folder = proto_for_ort(model)

    outputs: dict[int, dict[str, np.ndarray]] = {}
    try:
        for index, named in SegmentRunner(proto, segment_opener(folder)).run(inputs):
            outputs.setdefault(index, {}).update(named)
    except SampleFailed as exc:
        raise exc.calibration_error() from None
    kept, total = [], 0
    for i in sorted(outputs):
        if kept and total >= KEEP_BYTES:
            break
        kept.append(i)
        total += sum(a.nbytes for a in outputs[i].values())
    return [inputs[i] for i in kept], [outputs[i] for i in kept]


@dataclass
class Prepared:
    """What :func:`prepare_algorithm` hands the weight-only pipeline."""

    quantizer: GPTQQuantizer | SequentialGPTQ | None
    references: tuple[list, list]
    samples: int
    notes: list[str]


def prepare_algorithm(
    model: ir.Model,
    config: QuantConfig,
    samples: Iterable[dict[str, np.ndarray]],
    exclude: Callable[[ir.Node], str] | None = None,
    *,
    keep: int = 0,
    progress: bool = False,
) -> Prepared:
    """Gather the statistics of ``config.algorithm`` in one pass over ``samples`` and apply AWQ, or
    return the GPTQ hook for the weight-only pass (module docstring)."""
    import time

    algo = config.algorithm
    assert isinstance(config.weights, QuantSpec) and algo is not None
    t0 = time.perf_counter()
    targets = find_targets(model, exclude)
    acts = [a for t in targets.values() for a in t.activations]
    is_gptq = isinstance(algo, GPTQ)
    awq = algo.awq if isinstance(algo, GPTQ) else algo
    if is_gptq and awq is None and algo.sequential:  # type: ignore[union-attr]
        kept: list = []
        hook, n = sequential_gptq(
            model,
            targets,
            _keeping(samples, kept, keep),
            config.weights,
            algo,  # type: ignore[arg-type]
            progress=progress,
        )
        notes = [
            f"GPTQ layer by layer: {len(hook.results)} of {len(targets)} weights from {n} calibration "
            f"samples in {time.perf_counter() - t0:.1f} s"
        ]
        references = fp32_references(model, kept)  # before the float rows join the fp32 weights
        notes += add_float_rows(model, targets, hook.float_rows, hook.rows)
        return Prepared(hook, references, n, notes)  # type: ignore[arg-type]
    if not is_gptq and algo.sequential:  # type: ignore[union-attr]
        return _sequential_awq(model, config, samples, targets, t0, keep, progress)
    regions: dict[str, BlockRegion] = {}
    if awq is not None and awq.loss == "block":
        regions = find_block_regions(model, targets, awq_groups(targets))
    store = ActivationStore()
    try:
        return _prepare(model, config, samples, targets, acts, regions, store, t0, keep, progress)
    finally:
        store.close()


def _keeping(
    samples: Iterable[dict[str, np.ndarray]], kept: list, keep: int
) -> Iterator[dict[str, np.ndarray]]:
    """``samples`` as they are, the first ``keep`` of them also appended to ``kept``."""
    for sample in samples:
        if len(kept) < keep:
            kept.append(sample)
        yield sample


def _sequential_awq(model, config, samples, targets, t0, keep, progress) -> Prepared:
    """:func:`prepare_algorithm` for ``AWQ(sequential=True)``."""
    import time

    kept: list = []
    report, float_rows, n, apply = sequential_awq(
        model, targets, _keeping(samples, kept, keep), config.weights, config.algorithm, progress=progress
    )
    references = fp32_references(model, kept)  # before the model changes
    apply()
    notes = [
        f"AWQ layer by layer: {len(report.scaled)} activations for {len(targets)} weights from {n} "
        f"calibration samples in {time.perf_counter() - t0:.1f} s",
        _awq_note(report),
    ]
    return Prepared(None, references, n, notes + add_float_rows(model, targets, float_rows, report.rows))


def _awq_note(report: AWQReport) -> str:
    inserted = sum(1 for _, where in report.scaled.values() if where.startswith("Mul"))
    scaled = sum(1 for a, _ in report.scaled.values() if a > 0)
    block = f", {report.block_loss} searched on their block's output" if report.block_loss else ""
    return (
        f"AWQ: {scaled} of {len(report.scaled)} activations scaled ({inserted} Mul inserted{block}), "
        f"{report.clipped} weights clip-searched"
    )


def _prepare(model, config, samples, targets, acts, regions, store, t0, keep, progress) -> Prepared:
    """:func:`prepare_algorithm` from the statistics pass on (``store``: the block regions' inputs)."""
    import time

    algo = config.algorithm
    is_gptq = isinstance(algo, GPTQ)
    awq = algo.awq if isinstance(algo, GPTQ) else algo
    stats, n, kept_in, kept_out = collect_statistics(
        model,
        acts,
        samples,
        hessian=is_gptq,
        max_rows=0 if awq is None else awq.max_rows,
        keep=keep,
        progress=progress,
        capture=[name for r in regions.values() for name in r.inputs],
        store=store,
        capture_samples=awq.loss_samples if regions and awq is not None else 0,
    )
    t_stats = time.perf_counter() - t0
    notes = [
        f"{type(algo).__name__}: statistics of {len(stats)} activations for {len(targets)} weights "
        f"from {n} calibration samples in {t_stats:.1f} s"
    ]
    float_rows: dict[tuple[str, ...], np.ndarray] = {}
    for key in dict.fromkeys(tuple(t.activations) for t in targets.values()):
        found = [stats[a].energy() for a in key if a in stats]
        if (
            algo.float_rows
            and found
            and all(e is not None for e in found)
            and float_row_readers(targets, key)
        ):
            keep = choose_float_rows(sum(found), algo.float_rows)  # type: ignore[arg-type]
            if keep.size:
                float_rows[key] = keep
    if awq is not None:
        t1 = time.perf_counter()
        report = apply_awq(
            model,
            targets,
            stats,
            config.weights,
            awq,
            float_rows,
            (regions, store, min(n, awq.loss_samples)),
            progress=progress,
        )
        taken = {tuple(targets[n].activations) for n in report.rows}  # a group AWQ skipped keeps its rows
        float_rows = {k: v for k, v in float_rows.items() if k in taken}
        notes += add_float_rows(model, targets, float_rows, report.rows)
        notes.append(f"{_awq_note(report)}, {time.perf_counter() - t1:.1f} s")
        log.debug("AWQ folds: %s", report.scaled)
        for act, s in report.scales.items():  # GPTQ then sees X / s: H ← diag(1/s) H diag(1/s)
            st = stats[act]
            if st.hessian is not None:
                inv = 1.0 / s.astype(np.float64)
                st.hessian = st.hessian * inv[:, None] * inv[None, :]
        for st in stats.values():
            st.sample_rows = st.sample_keys = st.abs_sum = None
    elif float_rows:  # GPTQ in one pass: the rows as they are (the hook zeroes them in the weight)
        rows = {}
        for name, t in targets.items():
            keep = float_rows.get(tuple(t.activations))
            if keep is not None:
                w = t.value.const_value.numpy()  # type: ignore[union-attr]
                rows[name] = np.array((w.T if t.transposed else w)[keep])
                del w
                release(t.value)
        notes += add_float_rows(model, targets, float_rows, rows)
    if is_gptq:
        return Prepared(GPTQQuantizer(algo, targets, stats, float_rows), (kept_in, kept_out), n, notes)  # type: ignore[arg-type]
    del stats
    return Prepared(None, (kept_in, kept_out), n, notes)


__all__ = [
    "Prepared",
    "prepare_algorithm",
]
