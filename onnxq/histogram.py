"""Streaming, mergeable histograms of activations, and the clipping ranges computed from them.

:class:`HistogramObserver` keeps a fixed number of bins (:data:`BINS`) over ``[-R, R)``, where ``R``
is a power of two greater than the largest magnitude seen (so no value sits on the edge ``R``). When
a later batch reaches ``R``, ``R`` doubles and adjacent bins merge pairwise. Because bin edges are
always ``k · 2R / BINS`` with ``R`` a power of two, a value's final bin does not depend on when it
arrived: folding batches in any order, or merging shards, gives exactly the same counts as one pass.
Memory is ``BINS`` integers per tensor, whatever the number of samples.

The range functions (:func:`percentile_range`, :func:`entropy_range`, :func:`mse_range`) turn a
histogram into the ``(min, max)`` handed to the quantizer; each is clipped to the exact observed
extremes. A tensor that held an infinity gets its observed (infinite) extremes back, as with MinMax,
so that it is recognised as holding sentinels and kept float.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from onnxq.qmath import IntType, quant_range, scale_zero_point

BINS = 8192
"""Bins over ``[-R, R)``; the data's own range always covers at least a quarter of them per side."""

_CHUNK = 1 << 17  # values binned per step
_scratch = threading.local()


def _chunk_buffers() -> tuple[np.ndarray, np.ndarray]:
    """This thread's two chunk-sized buffers (float32 values, intp bin indices), reused by every update.

    Calibration fixes glibc's mmap threshold at 128 KiB
    (:func:`onnxq.calibrate.return_large_blocks_promptly`), so buffers made afresh per update would be
    new mappings, page-faulted in on every call: that tripled the cost of binning. The indices are
    ``intp`` because ``np.bincount`` converts anything else to ``intp`` in a temporary of its own.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = (np.empty(_CHUNK, dtype=np.float32), np.empty(_CHUNK, dtype=np.intp))
    return buffers


MSE_SEARCH_BINS = 1024
"""At most this many points enter the MSE range search (see :func:`mse_range`)."""

_MIN_EXPONENT = -30  # R never drops below 2**-30: an all-zero tensor still has a valid histogram


def _pow2_above(value: float) -> int:
    """The smallest exponent ``e`` with ``2**e > value`` (at least ``_MIN_EXPONENT``).

    Strictly greater: a value equal to ``R`` would have to be clamped into the last bin, and that bin
    does not merge into the bin a one-pass histogram with a larger ``R`` puts the value in.
    """
    if not value > 0 or not math.isfinite(value):
        return _MIN_EXPONENT
    _, exponent = math.frexp(value)  # value = m * 2**exponent with 0.5 <= m < 1, so value < 2**exponent
    return max(exponent, _MIN_EXPONENT)


@dataclass
class HistogramObserver:
    """Counts of one tensor's values in :data:`BINS` bins over ``[-2**exponent, 2**exponent)``."""

    exponent: int = _MIN_EXPONENT
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    min: float = math.inf
    max: float = -math.inf

    @property
    def limit(self) -> float:
        """``R``: the histogram covers ``[-R, R)``."""
        return math.ldexp(1.0, self.exponent)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _grow_to(self, exponent: int) -> None:
        """Double ``R`` until it is ``2**exponent``, merging bins pairwise (exact)."""
        if self.exponent < exponent and not self.counts.any():
            self.exponent = exponent  # nothing to merge yet: the first batch sets R at once
            return
        while self.exponent < exponent:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(BINS, dtype=np.int64)
            self.counts[BINS // 4 : 3 * BINS // 4] = merged
            self.exponent += 1

    def update(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Fold ``values`` in. ``lo``/``hi``, the batch's extremes, may be given when already known."""
        if values.size == 0:
            return
        lo = float(values.min()) if lo is None else lo
        hi = float(values.max()) if hi is None else hi
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return  # infinities (sentinels) are kept in min/max only; such tensors stay float
        self._grow_to(_pow2_above(max(abs(lo), abs(hi))))
        # BINS / (2R) is a power of two, so the multiply is exact and the binning is order-independent.
        # Flooring before the offset keeps it exact too (no float rounding near a bin edge). Chunks
        # go through this thread's two chunk buffers: cache-resident, no tensor-sized temporaries.
        # Every value is in [-R, R) (R is a power of two strictly above the extremes), so the floored
        # offset index lies in [0, BINS): adding BINS/2 to an integer-valued float32 is exact.
        factor = np.float32(BINS / (2 * self.limit))
        flat = values.astype(np.float32, copy=False).ravel()
        scaled, bins = _chunk_buffers()
        counts = np.zeros(BINS, dtype=np.int64)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            f, b = scaled[: chunk.size], bins[: chunk.size]
            np.multiply(chunk, factor, out=f)
            np.floor(f, out=f)
            np.add(f, np.float32(BINS // 2), out=f)
            b[...] = f
            counts += np.bincount(b, minlength=BINS)
        self.counts += counts

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        """Fold another shard in; the result equals one pass over both shards' data."""
        if other.total == 0:
            return self
        theirs = HistogramObserver(other.exponent, other.counts.copy(), other.min, other.max)
        exponent = max(self.exponent, theirs.exponent)
        self._grow_to(exponent)
        theirs._grow_to(exponent)
        self.counts += theirs.counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        return self

    def state(self) -> dict[str, object]:
        """A small serialisable state (nonzero bins only)."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "exponent": self.exponent,
            "bins": nonzero.tolist(),
            "counts": self.counts[nonzero].tolist(),
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> HistogramObserver:
        """Rebuild an observer from :meth:`state`."""
        counts = np.zeros(BINS, dtype=np.int64)
        counts[np.asarray(state["bins"], dtype=np.int64)] = np.asarray(state["counts"], dtype=np.int64)
        return cls(int(state["exponent"]), counts, float(state["min"]), float(state["max"]))

    # --- views used by the range methods -----------------------------------------------------------
    @property
    def width(self) -> float:
        return 2 * self.limit / BINS

    def edges(self) -> np.ndarray:
        """The ``BINS + 1`` bin edges."""
        return (np.arange(BINS + 1, dtype=np.float64) - BINS // 2) * self.width

    def magnitudes(self) -> np.ndarray:
        """Counts of ``|x|`` in bins ``[k·w, (k+1)·w)``, up to the bin holding the largest magnitude."""
        half = BINS // 2
        folded = self.counts[half:] + self.counts[:half][::-1]
        used = max(1, min(half, math.ceil(max(abs(self.min), abs(self.max)) / self.width)))
        return folded[:used]


def _clip(observer: HistogramObserver, lo: float, hi: float) -> tuple[float, float]:
    return max(lo, observer.min), min(hi, observer.max)


def _non_finite(observer: HistogramObserver) -> bool:
    """Whether the tensor held an infinity (its batches were left out of the counts)."""
    return not (math.isfinite(observer.min) and math.isfinite(observer.max)) and observer.min <= observer.max


def percentile_range(observer: HistogramObserver, percentile: float, symmetric: bool) -> tuple[float, float]:
    """The range holding ``percentile`` % of the values.

    Symmetric: ``±t`` with ``t`` the percentile of ``|x|``. Asymmetric: each tail beyond the range
    holds ``(100 - percentile) / 2`` % of the values. Bin upper edges are returned (never clipping
    more than asked).
    """
    if _non_finite(observer):
        return observer.min, observer.max
    if observer.total == 0:
        return 0.0, 0.0
    tail = 1.0 - percentile / 100.0
    if symmetric:
        mags = observer.magnitudes()
        cdf = np.cumsum(mags) / mags.sum()
        k = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        t = (k + 1) * observer.width
        return _clip(observer, -t, t)
    cdf = np.cumsum(observer.counts) / observer.total
    edges = observer.edges()
    k_lo = int(np.searchsorted(cdf, tail / 2, side="right"))
    k_hi = int(np.searchsorted(cdf, 1.0 - tail / 2, side="left"))
    return _clip(observer, float(edges[k_lo]), float(edges[min(k_hi + 1, BINS)]))


def kl_threshold_bin(hist: np.ndarray, levels: int, candidates: int) -> int:
    """The bin count ``i`` whose threshold minimises KL(P‖Q), TensorRT's entropy calibration.

    ``hist`` counts ``|x|`` in equal bins from 0. As in TensorRT (NVIDIA pytorch-quantization's
    ``_compute_amax_entropy``) the first bin's count is replaced by the second's, so that exact zeros
    (ReLU outputs, padding) do not dominate the divergence and pull the threshold far below the data.
    For each candidate ``i`` (from ``levels`` to ``len(hist)``, ``candidates`` of them evenly spaced):
    P is ``hist[:i]`` with the clipped outliers added to its last bin; Q merges ``hist[:i]`` into
    ``levels`` bins and spreads each merged count evenly over the source bins that were nonzero.
    Returns the ``i`` with the smallest divergence.
    """
    n = len(hist)
    if n <= levels:
        return n
    hist = hist.astype(np.float64)  # a copy
    hist[0] = hist[1]
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # suffix[i] = sum(hist[i:])
    starts = np.unique(np.linspace(levels, n, num=max(2, candidates)).round().astype(int))
    best_i, best_kl = n, math.inf
    for i in starts:
        p = hist[:i].copy()
        p[-1] += suffix[i]
        nonzero = hist[:i] != 0
        # merge hist[:i] into `levels` chunks (the last chunk takes the remainder)
        group = np.minimum(np.arange(i) * levels // i, levels - 1)
        merged = np.bincount(group, weights=hist[:i], minlength=levels)
        support = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, merged[group] / np.maximum(support[group], 1.0), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        if np.any(q[mask] == 0):
            continue  # infinite divergence
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best_i, best_kl = int(i), kl
    return best_i


def entropy_range(
    observer: HistogramObserver, qtype: IntType, symmetric: bool, candidates: int
) -> tuple[float, float]:
    """The KL-divergence threshold ``t`` on ``|x|``, as the range ``(max(min, -t), min(max, t))``.

    One-sided data (``min >= 0``) under an unsigned or asymmetric type has the whole integer range
    for ``[0, t]``; two-sided data has half of it per side, as in TensorRT.
    """
    if _non_finite(observer):
        return observer.min, observer.max
    if observer.total == 0:
        return 0.0, 0.0
    qmin, qmax = quant_range(qtype, symmetric)
    one_sided = observer.min >= 0 and not symmetric
    levels = (qmax - qmin + 1) if one_sided else (qmax - qmin + 1) // 2
    mags = observer.magnitudes()
    i = kl_threshold_bin(mags, levels, candidates)
    t = i * observer.width
    return _clip(observer, -t, t)


def _expected_error(
    centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, qtype: IntType, symmetric: bool
) -> np.ndarray:
    """Sum over bins of count · (x − dequant(quant(x)))² for each candidate range (vectorised)."""
    scale, zero = scale_zero_point(lo, hi, qtype, symmetric)
    scale = scale.astype(np.float64)[:, None]
    zero = zero.astype(np.float64)[:, None]
    qmin, qmax = quant_range(qtype, symmetric)
    q = np.clip(np.rint(centers[None, :] / scale) + zero, qmin, qmax)
    err = (centers[None, :] - (q - zero) * scale) ** 2
    return err @ counts


def mse_range(
    observer: HistogramObserver, qtype: IntType, symmetric: bool, candidates: int
) -> tuple[float, float]:
    """The clipping range minimising the expected squared quantization error over the histogram.

    Error = rounding error inside the range + clipping error outside, each bin represented by its
    centre. Symmetric: a 1-D search over ``t`` in ``(0, max|x|]``. Asymmetric: both ends shrunk
    together, then the upper and the lower end alone (coordinate descent on ``candidates`` points).
    Above ``MSE_SEARCH_BINS`` occupied bins, groups of adjacent bins are merged into one point at
    their count-weighted mean, which keeps the search a few ms per tensor.
    """
    if _non_finite(observer):
        return observer.min, observer.max
    if observer.total == 0:
        return 0.0, 0.0
    edges = observer.edges()
    nonzero = np.flatnonzero(observer.counts)
    centers = (edges[nonzero] + edges[nonzero + 1]) / 2
    counts = observer.counts[nonzero].astype(np.float64)
    if len(nonzero) > MSE_SEARCH_BINS:
        group = nonzero // -(-len(nonzero) // MSE_SEARCH_BINS)  # ceil division: ≤ MSE_SEARCH_BINS groups
        _, group = np.unique(group, return_inverse=True)
        merged = np.bincount(group, weights=counts)
        centers = np.bincount(group, weights=centers * counts) / merged
        counts = merged
    fractions = np.linspace(1.0 / candidates, 1.0, candidates)
    lo0, hi0 = min(observer.min, 0.0), max(observer.max, 0.0)
    if symmetric:
        amax = max(-lo0, hi0)
        err = _expected_error(centers, counts, -amax * fractions, amax * fractions, qtype, True)
        t = float(amax * fractions[int(np.argmin(err))])
        return _clip(observer, -t, t)
    err = _expected_error(centers, counts, lo0 * fractions, hi0 * fractions, qtype, False)
    f = fractions[int(np.argmin(err))]
    lo, hi = lo0 * f, hi0 * f
    for _ in range(2):
        his = np.linspace(hi / 2, hi0, candidates) if hi > 0 else np.array([hi])
        hi = float(
            his[int(np.argmin(_expected_error(centers, counts, np.full_like(his, lo), his, qtype, False)))]
        )
        los = np.linspace(lo0, lo / 2, candidates) if lo < 0 else np.array([lo])
        lo = float(
            los[int(np.argmin(_expected_error(centers, counts, los, np.full_like(los, hi), qtype, False)))]
        )
    return _clip(observer, lo, hi)
