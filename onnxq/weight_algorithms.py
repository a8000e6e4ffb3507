"""GPTQ and AWQ for integer weight-only quantization (``QuantConfig.weight_only(..., algorithm=...)``).

Both replace plain round-to-nearest (RTN) of MatMul/Gemm weights by something that looks at the
activations the weights multiply, and both emit exactly what the RTN pass emits (integer values,
per-block or per-channel scales, zero points for unsigned types, in the layout of
:func:`onnxq.lowbit.quantize_blocks`), so ONNX Runtime still fuses ``DequantizeLinear → MatMul``
into ``MatMulNBits`` and ``weight_format="matmul_nbits"`` works unchanged.

Pipeline (:func:`prepare_algorithm`, called by :func:`onnxq.weight_only.quantize_weight_only` after
the opset upgrade and before :class:`~onnxq.passes.weight_only.WeightOnlyQuantize`):

1. **Targets.** Every 2-D float initializer that the weight-only pass would quantize as a MatMul or
   Gemm weight (MatMul input 1, directly or through ``Transpose``; Gemm input 1 without ``transA``),
   not excluded by the config and not also read as a Gather table (a table keeps RTN), nor read
   inside an If/Loop/Scan body (its activations cannot be fetched; it keeps RTN). Its
   activations are input 0 of its readers (``X``, viewed as rows ``[-1, K]``).
2. **Statistics, one streaming pass.** The activations become extra outputs of an ORT session on
   the fp32 model (:class:`onnxq.calibrate._Augment`, weights not copied); each sample's tensors
   are folded into :class:`ActivationStats` and released, so memory holds one sample's
   activations plus the statistics, whatever the number of samples. Per distinct activation
   (q/k/v read one normed tensor and share its statistics): GPTQ keeps ``H = ΣXᵀX`` (float64
   ``K×K``: 19 MB at K = 1536); AWQ keeps ``Σ|X|`` per channel and a deterministic reservoir of at
   most ``AWQ.max_rows`` rows (each row gets a key from a generator seeded by the sample index, and
   the rows with the smallest keys are kept — the same rows whatever the sharding, so
   :meth:`ActivationStats.merge` is exact). The fp32 outputs of the first samples are kept for the
   fidelity report.
3. **GPTQ** (:func:`gptq_quantize`, called per weight by the pass, each Hessian released after its
   last weight): ``W [K, N]`` (ONNX MatMul layout, so the paper's "columns" are rows of K here and
   blocks run along K). Rows never active (``H_kk = 0``) are zeroed; ``damp · mean(diag H)`` is
   added to the diagonal; the upper Cholesky factor ``U`` of ``H⁻¹`` drives the update: row ``k`` is
   rounded with its block's scale, and its error ``(w_k - ŵ_k) / U_kk`` is subtracted from the later
   rows through ``U_k,k+1:`` (lazily, ``block_size_columns`` rows at a time). Scales are those of
   RTN (lowbit's convention: the signed extremum maps to ``qmin``), computed per block when the
   block is reached from the already-updated rows, or — with ``act_order`` (rows visited by
   ``diag H`` descending) or ``static_groups`` — for all blocks up front from the original weight,
   so blocks keep the original row order in either case. With ``clip_grid`` (default 20), each
   block's range may shrink (down to ``1 - max_shrink``) per output channel where that lowers the
   ``diag H``-weighted rounding error of the block. The factorisation of a Hessian is computed once
   for all weights sharing the activation. ``GPTQ(awq=AWQ())`` runs AWQ's scaling (step 4) first
   and GPTQ on the scaled weights with ``diag(1/s) H diag(1/s)``, from the same single pass.
   On SmolLM2-135M (int4, block 128, no clip search) act-order matters: without it, scales
   computed from the error-corrected rows gave a perplexity worse than RTN's.
4. **AWQ** (:func:`apply_awq`, before the pass; it rewrites float weights and the pass then rounds
   them to nearest): for each activation ``X`` read only by target MatMuls (``q/k/v``, ``gate/up``,
   ``o``, ``down``, ``lm_head``), ``s = mean|X|^α`` normalised by ``sqrt(max s · min s)``, α on
   ``grid`` points of [0, 1) picked by ``‖X·W − (X/s)·Q(s·W)‖²`` on the sampled rows, all the
   group's weights concatenated. Then ``W`` rows ×= ``s`` and ``1/s`` is folded, in this order of
   preference, into: (a) the activation's producer ``Mul`` by a constant (RMSNorm/LayerNorm gamma:
   a new initializer ``gamma / s`` is written, so a gamma shared through Identity stays intact for
   its other readers); (b) the constant weight of a MatMul whose output is the producer or one
   operand of a producer ``Mul`` (the MLP's ``act(gate) · up`` → ``up``'s output columns);
   (c) otherwise a new ``Mul(X, 1/s)`` before the group (weight-only models keep float
   activations). Where ``X`` has other readers, only (c) is legal. All scales are searched on the
   original weights and then applied (scaling rows and columns commute). With ``clip``, each
   block's range is then shrunk to ``(1 - i / clip_grid) · max|W_block|`` for the ``i`` (up to
   ``max_shrink · clip_grid``) that minimises the block's partial-output error on the sampled rows,
   per output channel; weights are clamped to it. The modified float weights are held in memory
   until written back (the pass then quantizes and releases them one at a time).
   ``AWQ(loss="block")`` searches ``s`` on the output of the block the group feeds instead, as the
   AWQ paper and AutoAWQ do (:func:`find_block_regions`: from the group's MatMuls forward to the
   next target MatMuls, so q/k/v → attention → o_proj and gate/up → act · up → down_proj; groups
   without one keep their own outputs): the block's run-time inputs (the activation, mask, rotary
   tables, shapes) of the first ``loss_samples`` samples are captured whole in the statistics
   pass (an :class:`~onnxq.segments.ActivationStore`, spilled to an anonymous temporary file past
   its budget) and ONNX Runtime runs the block with each candidate's weights as inputs.
   ``AWQ(sequential=True)`` runs the searches layer by layer instead (:func:`layer_by_layer`, as
   GPTQ does): each group's statistics come from the outputs of the AWQ-quantized layers before
   it, and every scale is folded once all are known.
5. **Float rows** (``GPTQ.float_rows`` / ``AWQ.float_rows``, OWQ by Lee et al. 2024): per
   activation, the input features with the largest ``ΣX²`` (the Hessian diagonal; at most
   ``K // 16``) keep their weight rows in float: the integer weight holds zeros there and
   :func:`add_float_rows` adds ``Gather(X, rows, axis=-1) → MatMul(·, W[rows]) → Add`` beside the
   MatMul (one Gather per activation; float32 rows stored as float16 behind a ``Cast`` that ONNX
   Runtime folds at load). GPTQ visits those rows first (zeroed, so no error is spread into them);
   AWQ leaves them out of its searches and takes them out after every scale is folded (so they
   carry the scales). Layer by layer, they are chosen from the Hessians of the quantized inputs
   and the next layer sees them float. Only activations whose readers are all plain MatMuls
   reading their weight as ``B`` get them. On SmolLM2-135M the two largest rows are the
   "massive activations" (thousands, where the rest is < 15): a weight's rounding error there is
   multiplied by them.

The float function is unchanged by AWQ's scaling (up to float rounding); only quantization error
moves. Calibration and evaluation data must be kept apart by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxq.config import AWQ, GPTQ, QuantConfig, QuantSpec
from onnxq.errors import CalibrationDataError
from onnxq.lowbit import WEIGHT_TYPES, WeightType, dequantize_blocks, quantize_blocks
from onnxq.passes._util import Namer, add_float_channels, release
from onnxq.segments import ActivationStore, SampleFailed, run_sample

log = logging.getLogger(__name__)

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
_SEED = 0x5EED


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Mergeable statistics of one activation, viewed as rows ``[-1, K]``.

    ``hessian``: ``ΣXᵀX`` (float64, or None when not asked for); ``abs_sum``/``sq_sum``: ``Σ|X|``
    and ``ΣX²`` per channel (with the reservoir); ``rows``: rows folded in;
    ``sample_rows``/``sample_keys``: the reservoir (at most ``max_rows`` rows with the smallest
    keys). ``update`` per sample, ``merge`` shards (exact)."""

    hessian_wanted: bool = True
    max_rows: int = 0
    hessian: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    sq_sum: np.ndarray | None = None
    rows: int = 0
    sample_rows: np.ndarray | None = None
    sample_keys: np.ndarray | None = None

    def update(self, x: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Fold rows ``x [n, K]`` in; ``keys`` (one per row, uniform in [0, 1)) for the reservoir."""
        x = np.asarray(x, np.float32)
        if self.hessian_wanted:
            h = (x.T @ x).astype(np.float64)
            self.hessian = h if self.hessian is None else self.hessian + h
        if self.max_rows:
            a = np.abs(x).sum(axis=0, dtype=np.float64)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
            q = np.square(x, dtype=np.float64).sum(axis=0)
            self.sq_sum = q if self.sq_sum is None else self.sq_sum + q
            if keys is None:
                raise ValueError("reservoir sampling needs one key per row")
            self._keep(x, np.asarray(keys, np.float64))
        self.rows += len(x)

    def _keep(self, x: np.ndarray, keys: np.ndarray) -> None:
        if self.sample_rows is not None:
            x = np.concatenate([self.sample_rows, x])
            keys = np.concatenate([self.sample_keys, keys])  # type: ignore[list-item]
        if len(keys) > self.max_rows:
            pick = np.sort(np.argpartition(keys, self.max_rows - 1)[: self.max_rows])
            x, keys = x[pick], keys[pick]
        self.sample_rows, self.sample_keys = np.ascontiguousarray(x), keys

    def merge(self, other: ActivationStats) -> ActivationStats:
        """The statistics of both sample sets together."""
        if other.hessian is not None:
            self.hessian = other.hessian.copy() if self.hessian is None else self.hessian + other.hessian
        if other.abs_sum is not None:
            self.abs_sum = other.abs_sum.copy() if self.abs_sum is None else self.abs_sum + other.abs_sum
        if other.sq_sum is not None:
            self.sq_sum = other.sq_sum.copy() if self.sq_sum is None else self.sq_sum + other.sq_sum
        if other.sample_rows is not None:
            self._keep(other.sample_rows, other.sample_keys)  # type: ignore[arg-type]
        self.rows += other.rows
        return self

    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)  # type: ignore[operator]

    def energy(self) -> np.ndarray | None:
        """``ΣX²`` per channel (the Hessian's diagonal), or None without either statistic."""
        if self.hessian is not None:
            return np.diag(self.hessian).copy()
        return None if self.sq_sum is None else self.sq_sum.copy()


@dataclass
class Target:
    """One weight the algorithm handles: its initializer, readers and their activation inputs."""

    value: ir.Value
    readers: list[ir.Node]
    transposed: bool  # stored [N, K] (read through Transpose, or Gemm transB=1)
    activations: list[str]


def _resolve_constant(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array, through Identity chains (None for run-time values)."""
    while value is not None:
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return None
        value = producer.inputs[0]
    return None


def find_targets(model: ir.Model, exclude: Callable[[ir.Node], str] | None = None) -> dict[str, Target]:
    """The MatMul/Gemm weights the weight-only pass quantizes (see the module docstring)."""
    from onnxq.passes.weight_only import _uses

    exclude = exclude or (lambda node: "")
    targets: dict[str, Target] = {}
    for name, value in model.graph.initializers.items():
        const = value.const_value
        if const is None or value.dtype not in FLOAT_TYPES or len(const.shape) != 2:
            continue
        uses = _uses(value)
        if uses.other or uses.gather:
            continue
        readers = [*uses.matmul, *uses.gemm]
        via_t = [m for _, ms in uses.transposed for m in ms]
        if not readers and not via_t:
            continue
        if (readers and via_t) or any(exclude(n) for n in (*readers, *via_t)):
            continue
        gemm_t = [g.attributes.get_int("transB", 0) for g in uses.gemm]
        if uses.gemm and (uses.matmul or len(set(gemm_t)) > 1):
            continue
        if any(g.attributes.get_int("transA", 0) for g in uses.gemm):
            continue
        nodes = readers or via_t
        if any(n.graph is not model.graph for n in nodes):
            continue  # read inside an If/Loop/Scan body: its activations cannot be fetched, RTN
        acts = list(dict.fromkeys(n.inputs[0].name for n in nodes if n.inputs[0] is not None))
        if len(acts) != len({id(n.inputs[0]) for n in nodes}) or not all(acts):
            continue
        targets[name] = Target(value, nodes, bool(via_t) or bool(gemm_t and gemm_t[0]), acts)
    return targets


def float_row_readers(targets: dict[str, Target], key: tuple[str, ...]) -> list[ir.Node] | None:
    """The MatMuls that read the targets of activation ``key`` when float rows can be added beside
    them (each reads its weight directly as ``B`` and all read one activation), else None."""
    names = [n for n, t in targets.items() if tuple(t.activations) == key]
    readers: list[ir.Node] = []
    for name in names:
        t = targets[name]
        if t.transposed:
            return None
        for node in t.readers:
            if (
                node.op_type != "MatMul"
                or node.domain not in ("", "ai.onnx")
                or node.inputs[1] is not t.value
            ):
                return None
            readers.append(node)
    if not readers or len({id(r.inputs[0]) for r in readers}) != 1:
        return None
    return readers


def add_float_rows(
    model: ir.Model,
    targets: dict[str, Target],
    float_rows: dict[tuple[str, ...], np.ndarray],
    rows: dict[str, np.ndarray],
) -> list[str]:
    """Add ``X[..., float_rows] @ rows`` beside the MatMuls of every target in ``rows`` (whose
    integer weight has zeros there); float32 rows are stored as float16. Returns the summary's
    note on them (none when nothing was added)."""
    namer = Namer(model.graph)
    groups = count = nbytes = 0
    for key, keep in float_rows.items():
        readers = float_row_readers(targets, key)
        by_weight = {
            id(t.value): rows[n] for n, t in targets.items() if tuple(t.activations) == key and n in rows
        }
        if readers is None or not keep.size or not by_weight:
            continue
        readers = [r for r in readers if id(r.inputs[1]) in by_weight]
        dtype = readers[0].inputs[1].dtype or ir.DataType.FLOAT  # type: ignore[union-attr]
        storage = ir.DataType.FLOAT16 if dtype == ir.DataType.FLOAT else None
        by_weight = {k: v.astype(dtype.numpy()) for k, v in by_weight.items()}  # half models: half rows
        add_float_channels(model.graph, namer, readers, keep, by_weight, storage=storage)
        groups += 1
        count += keep.size
        nbytes += sum(a.size * (2 if storage is not None else a.itemsize) for a in by_weight.values())
    if not groups:
        return []
    return [f"float rows: {count} input features of {groups} activations kept float ({nbytes / 1e6:.2f} MB)"]


def collect_statistics(
    model: ir.Model,
    activations: Iterable[str],
    samples: Iterable[dict[str, np.ndarray]],
    *,
    hessian: bool,
    max_rows: int = 0,
    keep: int = 0,
    progress: bool = False,
    capture: Iterable[str] = (),
    store: ActivationStore | None = None,
    capture_samples: int = 0,
) -> tuple[dict[str, ActivationStats], int, list, list]:
    """One streaming pass of ``samples`` through the fp32 ``model``: :class:`ActivationStats` per
    activation, the number of samples, and the first ``keep`` inputs with their fp32 outputs. The
    values named in ``capture`` (activations, graph inputs or any other) of the first
    ``capture_samples`` samples are put whole into ``store``."""
    from onnxq.calibrate import _Augment, make_session, release_freed_memory, session_options

    names = list(dict.fromkeys(activations))
    stats = {n: ActivationStats(hessian, max_rows) for n in names}
    model_outputs = [v.name for v in model.graph.outputs]
    graph_inputs = {v.name for v in model.graph.inputs}
    capture = list(dict.fromkeys(capture)) if store is not None and capture_samples else []
    extra = [n for n in capture if n not in names and n not in graph_inputs]
    with _Augment(model, [], raw=names + extra):
        try:
            session = make_session(model, session_options(calibration=True))
        except Exception as exc:
            raise CalibrationDataError(f"ONNX Runtime cannot run the model for calibration: {exc}") from None
    kept_in: list = []
    kept_out: list = []
    seen = 0
    bar = tqdm(samples, desc="weight statistics", unit="sample", disable=not progress, leave=False)
    for sample in bar:
        fetch = names + ([n for n in model_outputs if n not in names] if len(kept_in) < keep else [])
        if seen < capture_samples:
            fetch += [n for n in extra if n not in fetch]
        try:
            outputs = dict(zip(fetch, run_sample(session, fetch, sample, seen), strict=True)) if fetch else {}
        except SampleFailed as exc:
            raise exc.calibration_error() from None
        if len(kept_in) < keep:
            kept_in.append(sample)
            kept_out.append({n: outputs[n] for n in model_outputs})
        if seen < capture_samples:
            for name in capture:
                store.put(seen, name, sample[name] if name in graph_inputs else outputs[name])  # type: ignore[union-attr]
            for name in extra:
                outputs.pop(name)
        keys: dict[int, np.ndarray] = {}  # reservoir keys per row count: same rows in every tensor
        for name in names:
            x = outputs.pop(name)
            if x.size == 0 or not np.issubdtype(x.dtype, np.floating):
                continue
            x2 = x.reshape(-1, x.shape[-1])
            if max_rows and len(x2) not in keys:
                keys[len(x2)] = np.random.default_rng([_SEED, seen, len(x2)]).random(len(x2))
            stats[name].update(x2, keys.get(len(x2)))
            del x, x2
        del outputs
        seen += 1
    del session
    release_freed_memory()
    if seen == 0:
        raise CalibrationDataError("the calibration data holds no samples")
    return stats, seen, kept_in, kept_out


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------


def _params(
    w: np.ndarray,
    wtype: WeightType,
    symmetric: bool,
    weights: np.ndarray | None = None,
    clip_grid: int = 0,
    max_shrink: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """RTN scale (and zero point) of the rows of ``w`` as one block per column: ``[N]`` each.

    With ``clip_grid``, the range is shrunk per column to ``(1 - i / clip_grid)`` of its extremes
    (``i`` up to ``max_shrink · clip_grid``) where that lowers ``Σ_k weights_k (w_k − ŵ_k)²``
    (``weights``: the Hessian diagonal of the rows)."""
    w = np.asarray(w, np.float32)
    _, scale, zp = quantize_blocks(w, wtype, 0, None, symmetric)
    scale, zp = scale[0], None if zp is None else zp[0].astype(np.float32)
    if not clip_grid:
        return scale, zp
    d = np.ones(len(w)) if weights is None else np.asarray(weights, np.float64)

    def error(sc: np.ndarray, z: np.ndarray | None) -> np.ndarray:
        zz = 0.0 if z is None else z
        q = np.clip(np.rint(w / sc) + zz, wtype.qmin, wtype.qmax)
        return d @ ((q - zz) * sc - w) ** 2

    best = error(scale, zp)
    lo, hi = np.minimum(w.min(axis=0), 0), np.maximum(w.max(axis=0), 0)
    for i in range(1, int(max_shrink * clip_grid) + 1):
        r = 1.0 - i / clip_grid
        _, sc, z = quantize_blocks(np.clip(w, lo * r, hi * r), wtype, 0, None, symmetric)
        sc, z = sc[0], None if z is None else z[0].astype(np.float32)
        err = error(sc, z)
        better = err < best
        best = np.where(better, err, best)
        scale = np.where(better, sc, scale).astype(np.float32)
        if zp is not None:
            zp = np.where(better, z, zp).astype(np.float32)  # type: ignore[arg-type]
    return scale, zp


def _inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (``H⁻¹ = UᵀU``); damping
    grows tenfold until ``H`` is positive definite."""
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    eye = np.eye(len(h))
    for factor in (damp, damp * 10, damp * 100, 0.1, 1.0):
        try:
            low = np.linalg.cholesky(h + max(factor, 1e-8) * mean_diag * eye)
            low_inv = np.linalg.solve(low, eye)  # L⁻¹ (lower)
            hinv = low_inv.T @ low_inv
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")


@dataclass
class HessianFactor:
    """What GPTQ derives from one Hessian, shared by every weight reading the same activation:
    the dead rows, the visiting order, the diagonal (in that order) and ``U``."""

    dead: np.ndarray
    perm: np.ndarray
    diag: np.ndarray
    upper: np.ndarray
    float_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def choose_float_rows(energy: np.ndarray | None, count: int | float) -> np.ndarray:
    """The rows kept float for an activation with per-channel ``energy`` (``ΣX²``): the ``count``
    largest (a float: that fraction of ``K``, rounded; at most ``K // 16``, none without energy),
    in ascending order."""
    if energy is not None and isinstance(count, float):
        count = round(count * len(energy))
    if energy is None or count <= 0:
        return np.empty(0, np.int64)
    top = np.argsort(-np.asarray(energy), kind="stable")[: min(count, len(energy) // 16)]
    return np.sort(top[np.asarray(energy)[top] > 0]).astype(np.int64)


def factor_hessian(hessian: np.ndarray, config: GPTQ, float_rows: np.ndarray | None = None) -> HessianFactor:
    """Dead rows, visiting order (``float_rows`` first, then act order) and the damped
    inverse-Hessian Cholesky factor."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if config.act_order else np.arange(len(h))
    first = np.empty(0, np.int64) if float_rows is None else np.asarray(float_rows, np.int64)
    if first.size:
        perm = np.concatenate([first, perm[~np.isin(perm, first)]])
    h = h[np.ix_(perm, perm)]
    diag = np.diag(h).copy()
    return HessianFactor(dead, perm, diag, _inverse_hessian_factor(h, config.damp), first)


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray | HessianFactor,
    wtype: WeightType,
    block: int | None,
    symmetric: bool,
    config: GPTQ,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of ``w [K, N]`` (blocks of ``block`` along K, or one scale per column when None) with
    ``hessian [K, K]`` (any positive multiple of ``XᵀX``, or its :func:`factor_hessian`). Returns
    ``(q, scale, zero_point)`` in the layout of :func:`onnxq.lowbit.quantize_blocks` with ``axis=0``;
    the factor's ``float_rows`` are zero (exactly: visited first, nothing is spread into them)."""
    f = hessian if isinstance(hessian, HessianFactor) else factor_hessian(hessian, config)
    W = np.array(w, dtype=np.float64)
    k, n = W.shape
    W[f.dead] = 0.0
    W[f.float_rows] = 0.0
    g = k if block is None else min(block, k)
    n_groups = -(-k // g)
    static = config.act_order or block is None or bool(config.static_groups)
    scale = np.ones((n_groups, n), np.float32)
    zero = None if symmetric else np.zeros((n_groups, n), np.float32)
    search = (config.clip_grid, config.max_shrink)
    hdiag = np.empty(k)
    hdiag[f.perm] = f.diag  # Hessian diagonal in the original row order
    if static:
        for b in range(n_groups):
            rows = slice(b * g, (b + 1) * g)
            scale[b], z = _params(W[rows], wtype, symmetric, hdiag[rows], *search)
            if zero is not None:
                zero[b] = z
    perm = f.perm
    W = W[perm]
    U = f.upper
    group_of = perm // g  # block (original order) of each visited row
    qvals = np.empty((k, n), np.float32)
    qmin, qmax = float(wtype.qmin), float(wtype.qmax)
    step = config.block_size_columns
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[i1:i2].copy()
        err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            if not static and r % g == 0:  # identity order: rows r .. r+g are block r // g
                rows = W1[i : i + g] if r + g <= i2 else np.concatenate([W1[i:], W[i2 : r + g]])
                scale[r // g], z = _params(rows, wtype, symmetric, f.diag[r : r + g], *search)
                if zero is not None:
                    zero[r // g] = z
            s = scale[group_of[r]].astype(np.float64)
            z = 0.0 if zero is None else zero[group_of[r]].astype(np.float64)
            q = np.clip(np.rint(W1[i] / s) + z, qmin, qmax)
            qvals[r] = q
            err = (W1[i] - (q - z) * s) / U1[i, i]
            W1[i + 1 :] -= U1[i, i + 1 :, None] * err[None, :]
            err1[i] = err
        if i2 < k:
            W[i2:] -= U[i1:i2, i2:].T @ err1
    q_orig = np.empty_like(qvals)
    q_orig[perm] = qvals
    q_out = q_orig.astype(np.int8 if wtype.signed else np.uint8).astype(wtype.np_dtype)
    zp = None if zero is None else zero.astype(np.uint8).astype(wtype.np_dtype)
    return q_out, scale, zp


class GPTQQuantizer:
    """The weight-only pass's hook: GPTQ for each target weight from the gathered Hessians. The
    factorisation of a Hessian is shared by the weights reading the same activation (q/k/v,
    gate/up), and both are released once its last weight is quantized."""

    def __init__(
        self,
        config: GPTQ,
        targets: dict[str, Target],
        stats: dict[str, ActivationStats],
        float_rows: dict[tuple[str, ...], np.ndarray] | None = None,
    ) -> None:
        self.config = config
        self.targets = targets
        self.stats = stats
        self.float_rows = float_rows or {}
        self.remaining: dict[tuple[str, ...], int] = {}
        for t in targets.values():
            key = tuple(t.activations)
            self.remaining[key] = self.remaining.get(key, 0) + 1
        self.factors: dict[tuple[str, ...], HessianFactor] = {}
        self.done: set[str] = set()
        self.seconds = 0.0

    def __call__(
        self, name: str, w: np.ndarray, wtype: WeightType, axis: int, block: int | None, symmetric: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """``(q, scale, zero_point)`` of ``w`` quantized along ``axis``, or None for RTN."""
        import time

        target = self.targets.get(name)
        if target is None:
            return None
        k = w.shape[axis]
        key = tuple(target.activations)
        t0 = time.perf_counter()
        factor = self.factors.get(key)
        if factor is None:
            hs = [self.stats[a] for a in key if a in self.stats]
            hs = [s for s in hs if s.hessian is not None and s.hessian.shape == (k, k)]
            if not hs:
                return None
            h = sum(s.hessian for s in hs) / max(sum(s.rows for s in hs), 1)  # type: ignore[misc]
            factor = self.factors[key] = factor_hessian(h, self.config, self.float_rows.get(key))
            del h
        wk = w if axis == 0 else w.T
        q, scale, zp = gptq_quantize(wk, factor, wtype, block, symmetric, self.config)
        if name not in self.done:
            self.done.add(name)
            self.remaining[key] -= 1
            if self.remaining[key] <= 0:  # released: bounded memory while the pass runs
                self.factors.pop(key, None)
                for a in key:
                    if all(
                        tuple(t.activations) == key or a not in t.activations for t in self.targets.values()
                    ):
                        self.stats.pop(a, None)
        self.seconds += time.perf_counter() - t0
        if axis == 1:
            return q.T, scale.T, None if zp is None else zp.T
        return q, scale, zp


class SequentialGPTQ:
    """GPTQ layer by layer, each layer's Hessians from the outputs of the already quantized layers
    before it (the papers' sequential procedure; :func:`sequential_gptq` computes it). The weight-only
    pass's hook: it hands out the precomputed ``(q, scale, zero_point)`` of each target."""

    def __init__(
        self,
        results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]],
        float_rows: dict[tuple[str, ...], np.ndarray] | None = None,
        rows: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.results = results
        self.float_rows = float_rows or {}  # activation key → rows kept float
        self.rows = rows or {}  # target → its float rows [len(rows), N] (original values)
        self.seconds = 0.0

    def __call__(
        self, name: str, w: np.ndarray, wtype: WeightType, axis: int, block: int | None, symmetric: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        found = self.results.get(name)
        if found is None or found[3] != block or found[0].shape != (w if axis == 0 else w.T).shape:
            return None
        q, scale, zp, _ = found
        if axis == 1:
            return q.T, scale.T, None if zp is None else zp.T
        return q, scale, zp


def _weight_block(spec: QuantSpec, length: int) -> int | None:
    """The block along K the weight-only pass uses for a weight with ``length`` rows of K."""
    from onnxq.config import PerBlock

    gran = spec.granularity
    if isinstance(gran, PerBlock):
        return gran.size if gran.size < length else None
    return None


def layer_by_layer(
    model: ir.Model,
    targets: dict[str, Target],
    samples: Iterable[dict[str, np.ndarray]],
    new_stats: Callable[[], ActivationStats],
    quantize_segment: Callable[[list[str], dict[str, ActivationStats]], dict[str, np.ndarray]],
    *,
    desc: str,
    progress: bool = False,
) -> int:
    """Drive an algorithm segment by segment (:mod:`onnxq.segments`, about one decoder layer a
    segment): the samples run through segment ``k`` once with its fp32 weights, to fold the
    statistics (``new_stats()`` per activation; rows keyed as in :func:`collect_statistics`) of
    the activations it produces, then ``quantize_segment(names, stats)`` handles the targets read
    in segment ``k`` and returns their dequantized weights (stored orientation), and the samples
    run through the segment once more with those, to produce what the next segment reads. Each
    layer thus sees the error of the layers before it. Statistics are dropped once every target
    reading them is done. Memory: one segment's weights twice, its statistics, and the cut
    activations of all samples (spilled to disk past :data:`onnxq.segments.STORE_BYTES`). Returns
    the number of samples."""
    from onnx import numpy_helper

    from onnxq.calibrate import _Augment, proto_for_ort, release_freed_memory, segment_opener
    from onnxq.segments import (
        node_reads,
        segment_model,
        segment_types,
        split,
        tensor_bytes,
        value_types,
    )

    acts = list(dict.fromkeys(a for t in targets.values() for a in t.activations))
    with _Augment(model, [], raw=acts):
        proto, folder = proto_for_ort(model)
    sizes = {t.name: tensor_bytes(t) for t in proto.graph.initializer}
    types = value_types(proto)
    total = sum(sizes.values())
    largest = max((sizes.get(n, 0) for n in targets), default=0)
    segments = split(proto.graph, max(total // 32, largest, 1))
    graph_inputs = {i.name for i in proto.graph.input}
    weight_segment: dict[str, int] = {}
    for k, seg in enumerate(segments):
        for i in seg.nodes:
            for n in node_reads(proto.graph.node[i]):
                if n in targets:
                    weight_segment.setdefault(n, k)
    last_use: dict[str, int] = {}  # activation → the last segment reading a target of it
    for n, t in targets.items():
        for a in t.activations:
            last_use[a] = max(last_use.get(a, -1), weight_segment.get(n, -1))
    stats: dict[str, ActivationStats] = {}
    open_session = segment_opener(folder)

    def fold(name: str, x: np.ndarray, i: int) -> None:
        if x.size and np.issubdtype(x.dtype, np.floating):
            stat = stats.setdefault(name, new_stats())
            x2 = x.reshape(-1, x.shape[-1])
            keys = np.random.default_rng([_SEED, i, len(x2)]).random(len(x2)) if stat.max_rows else None
            stat.update(x2, keys)

    store = ActivationStore()
    later = [{n for s in segments[k + 1 :] for n in s.inputs} for k in range(len(segments))]
    count = 0
    bar = tqdm(total=len(segments), desc=desc, unit="segment", disable=not progress, leave=False)
    try:
        for k, seg in enumerate(segments):
            part = segment_model(proto, seg, segment_types(types, store, seg, count))
            stat_fetch = [a for a in seg.outputs if a in acts]
            fp32 = open_session(part.SerializeToString(), True) if stat_fetch else None
            feeds: Iterable[tuple[int, dict[str, np.ndarray]]]
            if k == 0:
                feeds = enumerate(samples)
            else:
                feeds = ((i, {n: store.get(i, n) for n in seg.inputs}) for i in range(count))
            # pass 1: fp32 weights of this segment, statistics of the activations it produces
            cached: list[tuple[int, dict[str, np.ndarray]]] = []
            for i, feed in feeds:
                if k == 0:
                    count += 1
                    for name in later[0] & feed.keys():
                        store.put(i, name, feed[name])
                    for a in acts:
                        if a in graph_inputs and a in feed:
                            fold(a, feed[a], i)
                    feed = {n: feed[n] for n in seg.inputs if n in feed}
                    cached.append((i, feed))
                if fp32 is not None:
                    for name, x in zip(stat_fetch, run_sample(fp32, stat_fetch, feed, i), strict=True):
                        fold(name, x, i)
            del fp32
            # pass 2: this segment's weights quantized, outputs for the segments after it
            dequantized = quantize_segment([n for n in targets if weight_segment.get(n) == k], stats)
            for a in [a for a in stats if last_use.get(a, -1) <= k]:
                del stats[a]
            hand_on = [n for n in seg.outputs if n in later[k]]
            if hand_on:
                for init in part.graph.initializer:
                    if init.name in dequantized:
                        init.CopyFrom(numpy_helper.from_array(dequantized[init.name], init.name))
                del dequantized
                quantized = open_session(part.SerializeToString(), True)
                del part
                feeds = (
                    cached
                    if k == 0
                    else ((i, {n: store.get(i, n) for n in seg.inputs}) for i in range(count))
                )
                for i, feed in feeds:
                    for name, x in zip(hand_on, run_sample(quantized, hand_on, feed, i), strict=True):
                        store.put(i, name, x)
                del quantized
            cached = []
            store.drop(n for n in {key[1] for key in (*store.memory, *store.spilled)} if n not in later[k])
            release_freed_memory()
            bar.update(1)
    except SampleFailed as exc:
        raise exc.calibration_error() from None
    finally:
        bar.close()
        store.close()
    if count == 0:
        raise CalibrationDataError("the calibration data holds no samples")
    return count


def _stored(t: Target, wk: np.ndarray) -> np.ndarray:
    """A ``[K, N]`` array in ``t``'s stored orientation."""
    return wk.T if t.transposed else wk


def _read(t: Target) -> np.ndarray:
    """``t``'s weight as float32 ``[K, N]`` (its file-backed data released)."""
    w = t.value.const_value.numpy()  # type: ignore[union-attr]
    wk = np.array(w.T if t.transposed else w, np.float32)
    del w
    release(t.value)
    return wk


def sequential_gptq(
    model: ir.Model,
    targets: dict[str, Target],
    samples: Iterable[dict[str, np.ndarray]],
    spec: QuantSpec,
    config: GPTQ,
    *,
    progress: bool = False,
) -> tuple[SequentialGPTQ, int]:
    """GPTQ of every target layer by layer (:func:`layer_by_layer`): each segment's Hessians come
    from the outputs of the GPTQ-quantized segments before it. Returns the hook and the number of
    samples."""
    wtype = WEIGHT_TYPES[spec.dtype]
    symmetric = wtype.signed or wtype.is_float
    results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int | None]] = {}
    branchable = {
        key for key in {tuple(t.activations) for t in targets.values()} if float_row_readers(targets, key)
    }
    float_rows: dict[tuple[str, ...], np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}

    def quantize_segment(names: list[str], stats: dict[str, ActivationStats]) -> dict[str, np.ndarray]:
        """GPTQ of the targets read in one segment; returns their dequantized weights."""
        factors: dict[tuple[str, ...], HessianFactor] = {}
        dequantized = {}
        for name in names:
            t = targets[name]
            key = tuple(t.activations)
            hs = [stats[a] for a in key if a in stats and stats[a].hessian is not None]
            if not hs or hs[0].hessian.shape[0] != _k(t):  # type: ignore[union-attr]
                continue  # never reached by the samples, or not a [K, N] read: RTN in the pass
            wk = _read(t)
            if key not in factors:
                h = sum(s.hessian for s in hs) / max(sum(s.rows for s in hs), 1)  # type: ignore[misc]
                keep = choose_float_rows(np.diag(h), config.float_rows if key in branchable else 0)
                if keep.size:
                    float_rows[key] = keep
                factors[key] = factor_hessian(h, config, keep)
            block = _weight_block(spec, wk.shape[0])
            q, scale, zp = gptq_quantize(wk, factors[key], wtype, block, symmetric, config)
            results[name] = (q, scale, zp, block)
            deq = dequantize_blocks(q, scale, zp, 0, block).astype(wk.dtype)
            if key in float_rows:
                rows[name] = wk[float_rows[key]].copy()
                deq[float_rows[key]] = rows[name]
            dequantized[name] = _stored(t, deq).astype((t.value.dtype or ir.DataType.FLOAT).numpy())
        return dequantized

    count = layer_by_layer(
        model,
        targets,
        samples,
        lambda: ActivationStats(True, 0),
        quantize_segment,
        desc="GPTQ layer by layer",
        progress=progress,
    )
    return SequentialGPTQ(results, float_rows, rows), count


def _k(t: Target) -> int:
    """``K`` (the rows of the ``[K, N]`` view) of ``t``'s weight."""
    shape = t.value.shape
    return int(shape[1] if t.transposed else shape[0])  # type: ignore[index]


# ------------------------------------------------------------------------------------------------
# AWQ
# ------------------------------------------------------------------------------------------------


def _rtn(w: np.ndarray, wtype: WeightType, block: int | None, symmetric: bool) -> np.ndarray:
    """``w [K, N]`` quantized to nearest and dequantized (blocks along K)."""
    q, scale, zp = quantize_blocks(np.asarray(w, np.float32), wtype, 0, block, symmetric)
    return dequantize_blocks(q, scale, zp, 0, block)


def awq_search_scale(
    mean_abs: np.ndarray,
    x: np.ndarray,
    weights: list[np.ndarray],
    wtype: WeightType,
    block: int | None,
    symmetric: bool,
    grid: int,
    duo: bool = False,
    loss: Callable[[list[np.ndarray]], float] | None = None,
) -> tuple[np.ndarray, float]:
    """The AWQ scale ``s [K]`` (and its α) minimising the group's output error on rows ``x``:
    ``mean|X|^α``, or with ``duo`` ``mean|X|^α / mean|Ŵ|^(1-α)`` (``Ŵ``: the weights relative to
    their block's extremum per output channel; AutoAWQ's ``duo_scaling``). With ``loss``, the error
    is ``loss([Q(s·W)/s for W in weights])`` instead (a block's output error, :class:`BlockLoss`)."""
    wcat = np.concatenate([np.asarray(w, np.float32) for w in weights], axis=1)
    splits = np.cumsum([w.shape[1] for w in weights])[:-1]
    x = np.asarray(x, np.float32)
    ref = x @ wcat if loss is None else None
    best = (np.inf, np.ones(len(mean_abs), np.float32), 0.0)
    base = np.maximum(np.asarray(mean_abs, np.float64), 1e-8)
    w_mean = _relative_weight_mean(wcat, block) if duo else None
    empty = ~wcat.any(axis=1)  # rows without weights (float rows): any scale, keep them at 1
    for i in range(grid):
        alpha = i / grid
        s = base**alpha
        if w_mean is not None:
            s = s / (w_mean ** (1 - alpha) + 1e-4)
        s = np.maximum(s, 1e-4)
        s[empty] = 1.0
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        wq = _rtn(wcat * s[:, None], wtype, block, symmetric) / s[:, None]
        err = float(np.mean((x @ wq - ref) ** 2)) if loss is None else loss(np.split(wq, splits, axis=1))
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


# Ops that end a block: the scale search's block never reaches past a normalization.
_NORMS = {
    "ReduceMean",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "InstanceNormalization",
}
_REGION_NODES = 256


@dataclass
class BlockRegion:
    """The nodes from a group's MatMuls to the next target MatMuls (included), in graph order; the
    nodes computing the constants they read from outside (``constant_nodes``: Constant, Transpose
    of a weight, ...; initializers are read directly), the run-time values they read from outside
    (``inputs``: captured per sample) and the values the loss compares (``outputs``: the next
    MatMuls' outputs)."""

    nodes: list[ir.Node]
    constant_nodes: list[ir.Node]
    inputs: list[str]
    outputs: list[str]


def find_block_regions(
    model: ir.Model, targets: dict[str, Target], groups: dict[str, list[str]]
) -> dict[str, BlockRegion]:
    """Per activation of ``groups``: the block its MatMuls feed, walking forward from their outputs
    and stopping at the readers of other targets (q/k/v → attention → o_proj; gate/up → act · up →
    down_proj). The walk does not follow ``Shape``/``Size`` (what they compute does not depend on
    the weights: it is captured like any other input). None where the walk meets a normalization,
    a subgraph, more than 256 nodes, or no other target (o_proj, down_proj, lm_head: their own
    outputs are the block)."""
    graph = model.graph
    order = {id(n): i for i, n in enumerate(graph)}
    stop = {id(r) for t in targets.values() for r in t.readers}
    found: dict[str, BlockRegion] = {}
    for act, names in groups.items():
        own = {id(r): r for n in names for r in targets[n].readers}
        region = dict(own)
        todo = [o for r in own.values() for o in r.outputs]
        outputs: list[str] = []
        ok = True
        while todo and ok:
            v = todo.pop()
            for node, _ in v.uses():
                if id(node) in region or node.op_type in ("Shape", "Size"):
                    continue  # shapes do not depend on the weights: their values are captured
                if node.graph is not graph or node.op_type in _NORMS or len(region) >= _REGION_NODES:
                    ok = False
                    break
                region[id(node)] = node
                if id(node) in stop:
                    outputs.extend(o.name for o in node.outputs if o.name)
                else:
                    todo.extend(node.outputs)
        if not ok or not outputs:
            continue
        inside = {id(o) for n in region.values() for o in n.outputs}
        group_weights = {id(targets[n].value) for n in names}
        consts: dict[int, ir.Node] = {}
        inputs: dict[str, None] = {}

        for node in region.values():
            for v in node.inputs:
                if v is None or id(v) in inside or id(v) in group_weights:
                    continue
                if not _constant(v, graph, consts):
                    ok = ok and bool(v.name)  # an unnamed value cannot be captured
                    inputs[v.name or ""] = None
        if ok:
            key = lambda n: order[id(n)]  # noqa: E731
            found[act] = BlockRegion(
                sorted(region.values(), key=key), sorted(consts.values(), key=key), list(inputs), outputs
            )
    return found


def _constant(v: ir.Value, graph: ir.Graph, consts: dict[int, ir.Node]) -> bool:
    """Whether ``v`` is computed from constants alone (adding its producers to ``consts``)."""
    p = v.producer()
    if p is None:
        return v.const_value is not None and not v.is_graph_input()
    if p.graph is not graph:
        return False
    if id(p) not in consts:
        if p.op_type != "Constant" and not (
            p.inputs and all(i is None or _constant(i, graph, consts) for i in p.inputs)
        ):
            return False
        consts[id(p)] = p
    return True


class BlockLoss:
    """The squared error of a :class:`BlockRegion`'s outputs when the group's weights are replaced,
    summed over the captured samples and divided by the outputs' total size. One ONNX Runtime
    session per region; the group's weights are its inputs (in their stored orientation and type),
    every other weight a copy of the model's."""

    def __init__(
        self,
        model: ir.Model,
        region: BlockRegion,
        targets: dict[str, Target],
        names: list[str],
        store: ActivationStore,
        samples: int,
    ) -> None:
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        from onnxq.calibrate import session_options

        self.names = names
        self.targets = targets
        self.store = store
        self.inputs = region.inputs
        self.samples = [i for i in range(samples) if all(store.has(i, n) for n in region.inputs)]
        weights = {targets[n].value.name for n in names}
        nodes = [ir.serde.serialize_node(n) for n in region.constant_nodes + region.nodes]
        read = {v.name: v for n in region.constant_nodes + region.nodes for v in n.inputs if v is not None}
        inits = [
            numpy_helper.from_array(v.const_value.numpy(), name)  # type: ignore[union-attr]
            for name, v in read.items()
            if v.producer() is None and v.const_value is not None and name not in weights
        ]

        def info(name: str, dtype: ir.DataType | None, rank: int | None = None):
            elem = (dtype or ir.DataType.FLOAT).value
            return helper.make_tensor_value_info(name, elem, None if rank is None else [None] * rank)

        first = self.samples[0] if self.samples else None
        graph_inputs = [
            info(n, ir.DataType.from_numpy(store.get(first, n).dtype) if first is not None else read[n].dtype)
            for n in region.inputs
        ]
        graph_inputs += [info(targets[n].value.name, targets[n].value.dtype, 2) for n in names]  # type: ignore[arg-type]
        outs = {o.name: o for n in region.nodes for o in n.outputs}
        graph_outputs = [info(n, outs[n].dtype) for n in region.outputs]
        g = helper.make_graph(nodes, "awq_block", graph_inputs, graph_outputs, inits)
        opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
        proto = helper.make_model(g, opset_imports=opsets, ir_version=model.ir_version)
        self.session = ort.InferenceSession(
            proto.SerializeToString(), session_options(calibration=True), providers=["CPUExecutionProvider"]
        )
        self.dtypes = {n: (targets[n].value.dtype or ir.DataType.FLOAT).numpy() for n in names}
        self.reference = [self.run_sample(i, {}) for i in self.samples]

    def run_sample(self, i: int, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        feed = {n: self.store.get(i, n) for n in self.inputs}
        for n in self.names:
            t = self.targets[n]
            w = weights.get(n)
            if w is None:
                feed[t.value.name] = t.value.const_value.numpy()  # type: ignore[union-attr]
            else:
                feed[t.value.name] = np.ascontiguousarray((w.T if t.transposed else w).astype(self.dtypes[n]))
        return [np.asarray(o, np.float32) for o in self.session.run(None, feed)]

    def __call__(self, weights: list[np.ndarray]) -> float:
        """The error with ``weights`` (``[K, N]`` each, in ``names`` order)."""
        given = dict(zip(self.names, weights, strict=True))
        err = size = 0.0
        for i, ref in zip(self.samples, self.reference, strict=True):
            for out, r in zip(self.run_sample(i, given), ref, strict=True):
                err += float(np.sum(np.square(out - r, dtype=np.float64)))
                size += r.size
        return err / max(size, 1.0)


def _relative_weight_mean(w: np.ndarray, block: int | None) -> np.ndarray:
    """Per row of ``w [K, N]``: the mean over columns of ``|w|`` relative to its block's (along K)
    largest ``|w|`` in that column."""
    a = np.abs(np.asarray(w, np.float64))
    g = len(a) if block is None else block
    rel = np.empty_like(a)
    for b0 in range(0, len(a), g):
        blk = a[b0 : b0 + g]
        rel[b0 : b0 + g] = blk / (blk.max(axis=0, keepdims=True) + 1e-6)
    return rel.mean(axis=1)


def awq_clip(
    w: np.ndarray,
    x: np.ndarray,
    wtype: WeightType,
    block: int | None,
    symmetric: bool,
    clip_grid: int,
    max_shrink: float,
) -> np.ndarray:
    """``w [K, N]`` clamped per block and output channel to the shrunk range that minimises the
    block's partial output error ``‖x_b·(Q(clamp(w_b)) − w_b)‖²`` on rows ``x``."""
    w = np.array(w, np.float32)
    k = w.shape[0]
    g = k if block is None else block
    x = np.asarray(x, np.float32)
    steps = max(1, int(max_shrink * clip_grid))
    for b0 in range(0, k, g):
        wb = w[b0 : b0 + g]
        xb = x[:, b0 : b0 + g]
        ref = xb @ wb
        absmax = np.abs(wb).max(axis=0)
        best_err = np.full(w.shape[1], np.inf)
        best_max = absmax.copy()
        for i in range(steps):
            m = absmax * (1.0 - i / clip_grid)
            wc = np.clip(wb, -m, m)
            deq = _rtn(wc, wtype, None, symmetric)
            err = np.mean((xb @ deq - ref) ** 2, axis=0)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_max = np.where(better, m, best_max)
        w[b0 : b0 + g] = np.clip(wb, -best_max, best_max)
    return w


@dataclass
class AWQReport:
    """What :func:`apply_awq` did."""

    scaled: dict[str, tuple[float, str]] = field(default_factory=dict)  # activation → (α, where folded)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # activation → s (applied)
    clipped: int = 0
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # target → float rows (scaled, [r, N])
    block_loss: int = 0  # groups whose scale was searched on their block's output


def apply_awq(
    model: ir.Model,
    targets: dict[str, Target],
    stats: dict[str, ActivationStats],
    spec: QuantSpec,
    config: AWQ,
    float_rows: dict[tuple[str, ...], np.ndarray] | None = None,
    blocks: tuple[dict[str, BlockRegion], ActivationStore, int] | None = None,
    *,
    progress: bool = False,
) -> AWQReport:
    """AWQ's scale search, folding and clip search on ``model`` in place (module docstring). The
    ``float_rows`` of an activation are left out of both searches, and taken out of the weights
    (into ``AWQReport.rows``, zero in the weights) after every scale is applied. ``blocks``: the
    regions of :func:`find_block_regions`, the store holding their inputs and the number of samples
    there; a group with a region has its scale searched on the region's outputs."""
    float_rows = float_rows or {}
    regions, store, captured = blocks if blocks is not None else ({}, ActivationStore(), 0)
    graph = model.graph
    wtype = WEIGHT_TYPES[spec.dtype]
    block = getattr(spec.granularity, "size", None)
    symmetric = wtype.signed
    report = AWQReport()
    arrays: dict[str, np.ndarray] = {}  # modified weights, [K, N] orientation for targets

    def weight(name: str) -> np.ndarray:
        if name not in arrays:
            t = targets[name]
            w = np.array(t.value.const_value.numpy(), np.float32)  # type: ignore[union-attr]
            arrays[name] = np.ascontiguousarray(w.T) if t.transposed else w
        return arrays[name]

    groups = {act: names for act, names in awq_groups(targets).items() if act in stats}
    scales: dict[str, np.ndarray] = {}
    for act, names in tqdm(
        groups.items(), desc="AWQ search", unit="activation", disable=not progress, leave=False
    ):
        st = stats[act]
        if st.sample_rows is None or st.abs_sum is None:
            continue
        k = weight(names[0]).shape[0]
        if any(weight(n).shape[0] != k for n in names) or st.sample_rows.shape[1] != k:
            continue
        keep = float_rows.get((act,), np.empty(0, np.int64))
        loss = _block_loss(model, regions.get(act), targets, names, store, captured, keep, weight)
        report.block_loss += loss is not None
        s, alpha = awq_search_scale(
            st.mean_abs(),
            st.sample_rows,
            [_zero_rows(weight(n), keep) for n in names],
            wtype,
            block,
            symmetric,
            config.grid,
            config.duo,
            loss,
        )
        del loss
        if alpha == 0.0 and not config.duo:
            report.scaled[act] = (0.0, "not scaled (α = 0 is best)")
            continue
        scales[act] = s
        report.scaled[act] = (alpha, "")
    for act, s in scales.items():
        for n in groups[act]:
            arrays[n] = weight(n) * s[:, None]
    _fold_scales(graph, targets, groups, scales, weight, arrays, report)
    _take_rows(groups, float_rows, weight, arrays, report)
    if config.clip:
        for act, names in groups.items():
            st = stats[act]
            if st.sample_rows is None:
                continue
            x = st.sample_rows / scales[act][None, :] if act in scales else st.sample_rows
            for n in names:
                if weight(n).shape[0] == x.shape[1]:
                    arrays[n] = awq_clip(
                        weight(n), x, wtype, block, symmetric, config.clip_grid, config.max_shrink
                    )
                    report.clipped += 1
    report.scales = scales
    for name, w in arrays.items():
        _write_back(targets[name].value, np.ascontiguousarray(w.T) if targets[name].transposed else w)
    return report


def _fold_scales(graph, targets, groups, scales, weight, arrays, report: AWQReport) -> None:
    """Fold ``1/s`` of every scaled activation (its weights already hold ``s``)."""
    namer = Namer(graph)
    values = {v.name: v for v in _all_values(graph)}
    for act, s in scales.items():
        report.scaled[act] = (
            report.scaled[act][0],
            _fold(graph, namer, values[act], s, groups[act], targets, weight, arrays),
        )


def _take_rows(groups, float_rows, weight, arrays, report: AWQReport) -> None:
    """Move the float rows out of the weights into ``report.rows`` (after every fold: a fold may
    scale another group's rows)."""
    for act, names in groups.items():
        keep = float_rows.get((act,))
        if keep is not None and keep.size:
            for n in names:
                report.rows[n] = weight(n)[keep].copy()
                arrays[n][keep] = 0.0


def sequential_awq(
    model: ir.Model,
    targets: dict[str, Target],
    samples: Iterable[dict[str, np.ndarray]],
    spec: QuantSpec,
    config: AWQ,
    *,
    progress: bool = False,
) -> tuple[AWQReport, dict[tuple[str, ...], np.ndarray], int, Callable[[], None]]:
    """AWQ layer by layer (:func:`layer_by_layer`): each group's scale, clip and float rows are
    searched on the activations the already quantized layers before it produce (the reference is
    the fp32 weights on those inputs). Returns the report, the float rows per activation, the
    number of samples and ``apply()``, which changes the model: it folds every scale and takes the
    float rows out, as :func:`apply_awq` does."""
    wtype = WEIGHT_TYPES[spec.dtype]
    block = getattr(spec.granularity, "size", None)
    symmetric = wtype.signed
    groups = awq_groups(targets)
    report = AWQReport()
    arrays: dict[str, np.ndarray] = {}  # scaled and clipped weights (float rows still in), [K, N]
    scales: dict[str, np.ndarray] = {}
    float_rows: dict[tuple[str, ...], np.ndarray] = {}
    pending: dict[str, np.ndarray] = {}  # dequantized weights not handed on yet
    done: set[str] = set()

    def quantize_segment(names: list[str], stats: dict[str, ActivationStats]) -> dict[str, np.ndarray]:
        for act, group in groups.items():
            st = stats.get(act)
            if act in done or not any(n in names for n in group) or st is None or st.sample_rows is None:
                continue
            done.add(act)
            if any(_k(targets[n]) != st.sample_rows.shape[1] for n in group):
                continue
            ws = {n: _read(targets[n]) for n in group}
            keep = choose_float_rows(
                st.energy(), config.float_rows if float_row_readers(targets, (act,)) else 0
            )
            s, alpha = awq_search_scale(
                st.mean_abs(),
                st.sample_rows,
                [_zero_rows(ws[n], keep) for n in group],
                wtype,
                block,
                symmetric,
                config.grid,
                config.duo,
            )
            if alpha == 0.0 and not config.duo:
                report.scaled[act] = (0.0, "not scaled (α = 0 is best)")
                s = np.ones(len(s), np.float32)
            else:
                scales[act] = s
                report.scaled[act] = (alpha, "")
            x = st.sample_rows / s[None, :]
            if keep.size:
                float_rows[(act,)] = keep
            for n in group:
                t = targets[n]
                w = ws.pop(n) * s[:, None]
                c = _zero_rows(w, keep) if keep.size else w.copy()
                if config.clip:
                    c = awq_clip(c, x, wtype, block, symmetric, config.clip_grid, config.max_shrink)
                    report.clipped += 1
                deq = _rtn(c, wtype, _weight_block(spec, len(c)), symmetric)
                if keep.size:
                    c[keep] = w[keep]
                    deq[keep] = w[keep]
                arrays[n] = c
                deq /= s[:, None]
                pending[n] = np.ascontiguousarray(_stored(t, deq)).astype(
                    (t.value.dtype or ir.DataType.FLOAT).numpy()
                )
        return {n: pending.pop(n) for n in names if n in pending}

    count = layer_by_layer(
        model,
        targets,
        samples,
        lambda: ActivationStats(False, config.max_rows),
        quantize_segment,
        desc="AWQ layer by layer",
        progress=progress,
    )
    report.scales = scales

    def apply() -> None:
        """Fold every scale, take the float rows out, write the weights back."""

        def weight(name: str) -> np.ndarray:
            if name not in arrays:
                arrays[name] = _read(targets[name])
            return arrays[name]

        _fold_scales(model.graph, targets, groups, scales, weight, arrays, report)
        _take_rows(groups, float_rows, weight, arrays, report)
        for name, w in arrays.items():
            _write_back(targets[name].value, np.ascontiguousarray(_stored(targets[name], w)))

    return report, float_rows, count, apply


def awq_groups(targets: dict[str, Target]) -> dict[str, list[str]]:
    """Activation → the targets reading it and nothing else (one scale search each)."""
    groups: dict[str, list[str]] = {}
    for name, t in targets.items():
        if len(t.activations) == 1:
            groups.setdefault(t.activations[0], []).append(name)
    return groups


def _block_loss(
    model: ir.Model,
    region: BlockRegion | None,
    targets: dict[str, Target],
    names: list[str],
    store: ActivationStore,
    captured: int,
    keep: np.ndarray,
    weight: Callable[[str], np.ndarray],
) -> Callable[[list[np.ndarray]], float] | None:
    """The block-output loss for one group (its float rows put back into every candidate), or None
    where the group has no region or ONNX Runtime cannot run it (the layer loss is used then)."""
    if region is None or not captured:
        return None
    try:
        block = BlockLoss(model, region, targets, names, store, captured)
    except Exception as exc:  # an op ORT cannot run alone: fall back to the group's own outputs
        log.debug("AWQ: no block loss for %s: %s", names, str(exc).splitlines()[0] if str(exc) else exc)
        return None
    if not block.samples:
        return None
    if not keep.size:
        return block
    originals = [weight(n)[keep] for n in names]

    def loss(ws: list[np.ndarray]) -> float:
        restored = []
        for w, rows in zip(ws, originals, strict=True):
            w = w.copy()
            w[keep] = rows
            restored.append(w)
        return block(restored)

    return loss


def _zero_rows(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``w`` with ``rows`` set to zero (a copy when there are any)."""
    if not rows.size:
        return w
    w = w.copy()
    w[rows] = 0.0
    return w


def _fold(graph, namer, x: ir.Value, s, group, targets, weight, arrays) -> str:
    """Fold ``1/s`` into ``x``'s producer, or insert ``Mul(x, 1/s)`` before the group's readers."""
    readers = {id(n) for name in group for n in targets[name].readers}
    only_group = not x.is_graph_output() and all(  # Shape/Size read no values: scaling is invisible
        id(node) in readers or node.op_type in ("Shape", "Size") for node, _ in x.uses()
    )
    producer = x.producer()
    inv = (1.0 / s).astype(np.float32)
    if (
        only_group
        and producer is not None
        and producer.op_type == "Mul"
        and producer.domain in ("", "ai.onnx")
    ):
        k = len(s)
        for idx, operand in enumerate(producer.inputs):
            c = _resolve_constant(operand)
            other = producer.inputs[1 - idx]
            if c is None or _resolve_constant(other) is not None:
                continue
            if not (c.size == 1 or (c.size == k and c.shape[-1] == k)):
                continue
            folded = (np.broadcast_to(c.reshape(-1), (k,)) * inv).astype(c.dtype)
            name = namer(f"{operand.name or 'awq'}_awq")
            new = ir.Value(name=name, const_value=ir.Tensor(folded, name=name))
            new.shape, new.dtype = ir.Shape([k]), ir.DataType.from_numpy(folded.dtype)
            graph.register_initializer(new)
            producer.replace_input_with(idx, new)
            if operand.is_initializer() and not operand.uses() and not operand.is_graph_output():
                graph.initializers.pop(operand.name, None)  # nothing reads the old constant now
            return f"into {producer.name} (constant {operand.name})"
        for operand in producer.inputs:  # Mul(a, MatMul(y, W_up)): scale W_up's output columns
            where = _fold_into_matmul(operand, x, inv, targets, weight, arrays)
            if where:
                return where
    if only_group and producer is not None:
        where = _fold_into_matmul(x, x, inv, targets, weight, arrays)
        if where:
            return where
    node = ir.node("Mul", [x, None], name=namer(f"{x.name}_awq/Mul"))
    inv_name = namer(f"{x.name}_awq_inv_scale")
    dtype = x.dtype or ir.DataType.FLOAT
    inv_v = ir.Value(name=inv_name, const_value=ir.Tensor(inv.astype(dtype.numpy()), name=inv_name))
    inv_v.shape, inv_v.dtype = ir.Shape([len(s)]), dtype
    graph.register_initializer(inv_v)
    node.replace_input_with(1, inv_v)
    node.outputs[0].name = namer(f"{x.name}_awq")
    node.outputs[0].shape, node.outputs[0].dtype = x.shape, dtype
    first = min((n for name in group for n in targets[name].readers), key=_order(graph))
    graph.insert_before(first, node)
    for name in group:
        for r in targets[name].readers:
            r.replace_input_with(0, node.outputs[0])
    return f"Mul {node.name} inserted"


def _fold_into_matmul(v: ir.Value | None, x: ir.Value, inv, targets, weight, arrays) -> str:
    """Scale the output columns of the constant weight of the MatMul producing ``v`` (only read
    there, ``v`` only read on the way to ``x``)."""
    if v is None:
        return ""
    mm = v.producer()
    if mm is None or mm.op_type != "MatMul" or len(v.uses()) != 1 or v.is_graph_output():
        return ""
    w_v = mm.inputs[1]
    if w_v is None or w_v.const_value is None or len(w_v.uses()) != 1 or w_v.shape is None:
        return ""
    if len(w_v.shape) != 2 or w_v.shape[1] != len(inv):
        return ""
    if w_v.name in targets and not targets[w_v.name].transposed:
        arrays[w_v.name] = weight(w_v.name) * inv[None, :]
    else:
        _write_back(w_v, np.asarray(w_v.const_value.numpy(), np.float32) * inv[None, :])
    return f"into the output columns of {w_v.name} ({mm.name})"


def _write_back(value: ir.Value, array: np.ndarray) -> None:
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    value.const_value = ir.Tensor(np.ascontiguousarray(array.astype(dtype)), name=value.name)


def _order(graph: ir.Graph) -> Callable[[ir.Node], int]:
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda n: order[id(n)]


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _fp32_references(model: ir.Model, inputs: list) -> tuple[list, list]:
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
        references = _fp32_references(model, kept)  # before the float rows join the fp32 weights
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
    references = _fp32_references(model, kept)  # before the model changes
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
    "ActivationStats",
    "GPTQQuantizer",
    "apply_awq",
    "awq_clip",
    "awq_search_scale",
    "collect_statistics",
    "find_targets",
    "gptq_quantize",
    "prepare_algorithm",
]
