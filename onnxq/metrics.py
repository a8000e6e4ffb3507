"""Fidelity metrics between a reference and a candidate output (pure numpy, float64).

Non-finite values (an fp16 output that overflowed) give NaN or inf metrics, without warnings."""

from __future__ import annotations

import math

import numpy as np


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
