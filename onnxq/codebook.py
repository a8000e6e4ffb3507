"""Non-uniform (codebook) weights: each weight is an index into a small float codebook, times a scale.

The decoded weight is ``codebook[index] * scale``, which any ONNX runtime computes with
``Cast → Gather → Mul → Reshape`` on constants (ONNX Runtime folds the chain into a float constant
when the session loads, so the file is small and the model runs at float speed).

- ``nf4``: the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023: quantiles of N(0, 1) scaled to
  [-1, 1], with an exact 0); scale = absmax of each block (or channel).
- ``log``: ``0`` is not a level; ``±2^-k`` for k = 0 .. 2^(bits-1) - 1 (the magnitudes of a
  log-scale quantizer, dense near 0 where most weights are); scale = absmax of each block.
- ``kmeans``: ``2^bits`` centroids of dimension ``vector_size`` learnt per tensor by Lloyd's
  algorithm on the weights divided by their channel's absmax (vector quantization for d > 1:
  ``vector_size`` consecutive weights of a row share one index); deterministic (seeded sampling,
  quantile initialisation).

Indices go to the nearest level (ties to the lower index). Blocks run along the weight's reduction
axis like :class:`onnxq.config.PerBlock`; a block size that does not divide that axis falls back to
one scale per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import Codebook

NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)

KMEANS_SAMPLE = 65536
KMEANS_ITERATIONS = 20


def levels(spec: Codebook) -> np.ndarray:
    """The sorted scalar levels of an ``nf4`` or ``log`` codebook."""
    if spec.kind == "nf4":
        return NF4_LEVELS
    mags = 2.0 ** -np.arange(2 ** (spec.bits - 1), dtype=np.float64)
    return np.sort(np.concatenate([-mags, mags])).astype(np.float32)


@dataclass
class Encoded:
    """A weight ``[R, C]`` as indices into ``codebook``, decoded as
    ``reshape(codebook[indices] * scale, [R, C])``.

    ``indices`` (uint8 values < len(codebook)) and ``scale`` are already shaped for that
    broadcast: scalar codebooks ``[R/B, B, C]`` × ``[R/B, 1, C]`` (blocks along axis 0) or
    ``[R, C/B, B]`` × ``[R, C/B, 1]`` (along axis 1); k-means ``codebook`` ``[n, d]``, indices
    ``[R, C/d]`` (decoded ``[R, C/d, d]``), scale ``[1, C]`` or ``[R, 1]``.
    """

    indices: np.ndarray
    codebook: np.ndarray
    scale: np.ndarray
    index_bits: int

    def decode(self, shape: tuple[int, int]) -> np.ndarray:
        """The float weight these indices stand for (numpy reference of the ONNX decoding)."""
        values = self.codebook[self.indices.astype(np.int64)]
        if self.codebook.ndim == 2:
            return (values.reshape(shape) * self.scale).astype(np.float32)
        return (values * self.scale).reshape(shape).astype(np.float32)


def _nearest(x: np.ndarray, lv: np.ndarray) -> np.ndarray:
    mids = (lv[1:] + lv[:-1]) / 2
    return np.searchsorted(mids, x, side="left").astype(np.uint8)


def encode(w: np.ndarray, spec: Codebook, axis: int) -> Encoded:
    """Encode the 2-D weight ``w`` with blocks (or per-channel scales) along ``axis``."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    bits = spec.bits
    if spec.kind == "kmeans":
        return _encode_kmeans(w, spec, axis)
    lv = levels(spec)
    length = w.shape[axis]
    block = spec.block_size if spec.block_size is not None and length % spec.block_size == 0 else length
    nb = length // block
    blocks = w.reshape(nb, block, cols) if axis == 0 else w.reshape(rows, nb, block)
    red = 1 if axis == 0 else 2
    scale = np.abs(blocks).max(axis=red, keepdims=True).astype(np.float32)
    scale[scale == 0] = 1.0
    indices = _nearest(blocks / scale, lv)
    return Encoded(indices, lv, scale, 4 if bits <= 4 else 8)


def _encode_kmeans(w: np.ndarray, spec: Codebook, axis: int) -> Encoded:
    rows, cols = w.shape
    d = spec.vector_size if cols % spec.vector_size == 0 else 1
    scale = np.abs(w).max(axis=0 if axis == 0 else 1, keepdims=True).astype(np.float32)
    scale[scale == 0] = 1.0
    vectors = (w / scale).reshape(-1, d)
    n = 2**spec.bits
    rng = np.random.default_rng(0)
    sample = (
        vectors
        if len(vectors) <= KMEANS_SAMPLE
        else vectors[rng.choice(len(vectors), KMEANS_SAMPLE, replace=False)]
    )
    if d == 1:
        centroids = np.quantile(sample[:, 0], (np.arange(n) + 0.5) / n)[:, None].astype(np.float32)
    else:
        centroids = sample[rng.choice(len(sample), min(n, len(sample)), replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        assign = _assign(sample, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, sample)
        counts = np.bincount(assign, minlength=len(centroids))[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids).astype(np.float32)
    if len(centroids) < n:  # fewer vectors than codes: pad with unused codes
        centroids = np.concatenate([centroids, np.zeros((n - len(centroids), d), np.float32)])
    indices = _assign(vectors, centroids).reshape(rows, cols // d)
    return Encoded(indices, centroids.astype(np.float32), scale, 4 if spec.bits <= 4 else 8)


def _assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """The nearest centroid of every row of ``x`` (squared Euclidean), in chunks."""
    out = np.empty(len(x), np.uint8)
    c2 = (centroids * centroids).sum(1)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        dist = c2[None, :] - 2.0 * part @ centroids.T
        out[start : start + chunk] = dist.argmin(1)
    return out
