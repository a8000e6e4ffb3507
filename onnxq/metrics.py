"""Fidelity metrics between a reference and a candidate output (pure numpy, float64).

Non-finite values (an fp16 output that overflowed) give NaN or inf metrics, without warnings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FOLD_BLOCK = 2**18  # elements folded at a time (bounds the float64 temporaries)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are all zero)."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(out, np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 and nb == 0:
            return 1.0
        if na == 0 or nb == 0:
            return 0.0
        return float(np.dot(a, b) / (na * nb))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10·log10(Σref² / Σ(ref−out)²)`` (inf if exact)."""
    a = np.asarray(ref, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        noise = float(np.sum((a - np.asarray(out, np.float64)) ** 2))
        signal = float(np.sum(a**2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs_error(ref: np.ndarray, out: np.ndarray) -> float:
    """Largest absolute element-wise difference."""
    if np.size(ref) == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.max(np.abs(np.asarray(ref, np.float64) - np.asarray(out, np.float64))))


@dataclass
class RunningError:
    """Float64 running sums of one reference/candidate tensor pair, folded sample by sample: cosine,
    SQNR, max and mean abs error from them are exact over every folded sample, in bounded memory."""

    ref2: float = 0.0
    err2: float = 0.0
    cross: float = 0.0
    out2: float = 0.0
    abs_err: float = 0.0
    max_err: float = 0.0
    count: int = 0

    def fold(self, ref: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """Add one sample's pair (same shape) to the sums, in float64 blocks of bounded size.

        ``scratch``: a reusable ``(3, FOLD_BLOCK)`` float64 buffer (fresh blocks would cost a page fault
        per 4 KiB each time). Sums use ``einsum`` rather than BLAS ``dot``, whose threads spin
        between calls and fight ONNX Runtime's threads for the cores."""
        if scratch is None:
            scratch = np.empty((3, FOLD_BLOCK), np.float64)
        a, b = ref.reshape(-1), out.reshape(-1)
        for start in range(0, a.size, FOLD_BLOCK):
            n = min(FOLD_BLOCK, a.size - start)
            r, o, d = scratch[0, :n], scratch[1, :n], scratch[2, :n]
            np.copyto(r, a[start : start + n], casting="unsafe")
            np.copyto(o, b[start : start + n], casting="unsafe")
            with np.errstate(invalid="ignore", over="ignore"):
                np.subtract(r, o, out=d)
            if not np.isfinite(d).all():  # infinities or NaN on either side
                keep = ~((r == o) & ~np.isfinite(r))  # identical infinities carry no error
                r, o = r[keep], o[keep]
                with np.errstate(invalid="ignore", over="ignore"):
                    d = r - o
            self.ref2 += float(np.einsum("i,i->", r, r))
            self.err2 += float(np.einsum("i,i->", d, d))
            self.cross += float(np.einsum("i,i->", r, o))
            self.out2 += float(np.einsum("i,i->", o, o))
            np.abs(d, out=d)
            self.abs_err += float(d.sum())
            if d.size:
                self.max_err = max(self.max_err, float(d.max()))
            self.count += int(d.size)

    def sqnr_db(self) -> float:
        """``10·log10(Σref² / Σ(ref−out)²)``; inf when exact, -inf when the reference is all zero or
        the error infinite (an overflowed fp16 output), NaN when either sum is."""
        if self.err2 == 0:
            return math.inf
        if self.ref2 == 0:
            return -math.inf
        ratio = self.ref2 / self.err2
        if math.isnan(ratio):
            return math.nan
        return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf

    def cosine(self) -> float:
        """Cosine of the flattened tensors over all samples (1 when both are zero, 0 when one is)."""
        if self.ref2 == 0 and self.out2 == 0:
            return 1.0
        if self.ref2 == 0 or self.out2 == 0:
            return 0.0
        return self.cross / math.sqrt(self.ref2 * self.out2)

    def mean_abs_error(self) -> float:
        return self.abs_err / self.count if self.count else 0.0
