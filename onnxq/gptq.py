"""GPTQ (Frantar et al., 2023) for integer weight-only quantization: each weight rounded row by
row (rows of K in ONNX's ``[K, N]`` layout) with the rounding error spread over the rows not yet
rounded through the inverse Hessian of its activations; in one pass (:class:`GPTQQuantizer`, the
weight-only pass's hook) or layer by layer (:func:`sequential_gptq`). Step 3 of the pipeline in
:mod:`onnxq.weight_algorithms`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.config import GPTQ, QuantSpec
from onnxq.lowbit import WEIGHT_TYPES, WeightType, dequantize_blocks, quantize_blocks
from onnxq.weight_stats import (
    ActivationStats,
    Target,
    choose_float_rows,
    float_row_readers,
    layer_by_layer,
    read_weight,
    to_stored,
    weight_block,
    weight_rows,
)


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


def sequential_gptq(
    model: ir.Model,
    targets: dict[str, Target],
    samples: Iterable[dict[str, np.ndarray]],
    spec: QuantSpec,
    config: GPTQ,
    *,
    progress: bool = False,
) -> tuple[SequentialGPTQ, int]:
    """GPTQ of every target layer by layer (:func:`~onnxq.weight_stats.layer_by_layer`): each segment's
    Hessians come from the outputs of the GPTQ-quantized segments before it. Returns the hook and the
    number of samples."""
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
            if not hs or hs[0].hessian.shape[0] != weight_rows(t):  # type: ignore[union-attr]
                continue  # never reached by the samples, or not a [K, N] read: RTN in the pass
            wk = read_weight(t)
            if key not in factors:
                h = sum(s.hessian for s in hs) / max(sum(s.rows for s in hs), 1)  # type: ignore[misc]
                keep = choose_float_rows(np.diag(h), config.float_rows if key in branchable else 0)
                if keep.size:
                    float_rows[key] = keep
                factors[key] = factor_hessian(h, config, keep)
            block = weight_block(spec, wk.shape[0])
            q, scale, zp = gptq_quantize(wk, factors[key], wtype, block, symmetric, config)
            results[name] = (q, scale, zp, block)
            deq = dequantize_blocks(q, scale, zp, 0, block).astype(wk.dtype)
            if key in float_rows:
                rows[name] = wk[float_rows[key]].copy()
                deq[float_rows[key]] = rows[name]
            dequantized[name] = to_stored(t, deq).astype((t.value.dtype or ir.DataType.FLOAT).numpy())
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
