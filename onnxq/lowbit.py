"""Weight-only arithmetic: per-channel and per-block quantization to int8/int4/int2 and fp8/fp4.

Everything here is numpy on one 2-D weight at a time, exactly as ONNX DequantizeLinear reads it
back (``(q - zero_point) * scale``, blocks of ``block`` consecutive elements along ``axis``, the
last block possibly shorter):

- integer types, symmetric: the full signed range. The element of largest magnitude in each block
  (with its sign) maps exactly to ``qmin`` (-8 for int4), so ``scale = extremum / qmin`` (negative
  when the extremum is positive) and every other value rounds into ``[qmin, qmax]``. This is MLAS's
  convention (ORT's MatMulNBits quantizer), one level more than ``±qmax``; zero point none.
- integer types, asymmetric (unsigned types): the block's ``[min, max]`` widened to include 0,
  ``scale = (max - min) / (qmax - qmin)``, ``zero_point = round(qmin - min / scale)``.
- float types (``float8e4m3fn``, ``float4e2m1``): ``scale = absmax / largest finite value``; the
  cast rounds to nearest even and saturates (QuantizeLinear's ``saturate=1``).

Division happens in float32 and rounding is half to even (``np.rint``), then saturation, as in
ONNX QuantizeLinear. A block of zeros gets scale 1. :func:`pack` stores sub-byte values as ONNX
does (element 0 in the lowest bits of byte 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class WeightType:
    """A weight-only storage type."""

    name: str
    bits: int
    ir_dtype: ir.DataType
    is_float: bool
    qmin: float  # integer types: range; float types: -largest finite
    qmax: float
    np_dtype: type  # how a quantized array is held in numpy (ml_dtypes for sub-byte/float types)
    min_opset: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


WEIGHT_TYPES: dict[str, WeightType] = {
    "int8": WeightType("int8", 8, ir.DataType.INT8, False, -128, 127, np.int8, 21),
    "uint8": WeightType("uint8", 8, ir.DataType.UINT8, False, 0, 255, np.uint8, 21),
    "int4": WeightType("int4", 4, ir.DataType.INT4, False, -8, 7, ml_dtypes.int4, 21),
    "uint4": WeightType("uint4", 4, ir.DataType.UINT4, False, 0, 15, ml_dtypes.uint4, 21),
    "int2": WeightType("int2", 2, ir.DataType.INT2, False, -2, 1, ml_dtypes.int2, 25),
    "uint2": WeightType("uint2", 2, ir.DataType.UINT2, False, 0, 3, ml_dtypes.uint2, 25),
    "float8e4m3fn": WeightType(
        "float8e4m3fn", 8, ir.DataType.FLOAT8E4M3FN, True, -448.0, 448.0, ml_dtypes.float8_e4m3fn, 21
    ),
    "float4e2m1": WeightType(
        "float4e2m1", 4, ir.DataType.FLOAT4E2M1, True, -6.0, 6.0, ml_dtypes.float4_e2m1fn, 23
    ),
}


def n_blocks(length: int, block: int | None) -> int:
    """Blocks along an axis of ``length`` (one when ``block`` is None: per channel)."""
    return 1 if block is None else -(-length // block)


def _blocked(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``w`` (2-D) as ``[..., n_blocks, block, ...]`` along ``axis``, zero-padded to whole blocks
    (zeros never change a block's absmax or its range widened to include 0)."""
    length = w.shape[axis]
    nb = n_blocks(length, block)
    if nb * block != length:
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, nb * block - length)
        w = np.pad(w, pad)
    if axis == 0:
        return w.reshape(nb, block, w.shape[1])
    return w.reshape(w.shape[0], nb, block)


def _expand(param: np.ndarray, axis: int, block: int, length: int) -> np.ndarray:
    """A per-block parameter (blocks along ``axis``) repeated to the weight's shape."""
    return (
        np.repeat(param, block, axis=axis)[:length]
        if axis == 0
        else np.repeat(param, block, axis=1)[:, :length]
    )


# Weights are quantized in slices of about this many elements, so temporaries stay small.
CHUNK_ELEMENTS = 1 << 21


def quantize_blocks(
    w: np.ndarray, wtype: WeightType, axis: int, block: int | None, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a 2-D float weight in blocks of ``block`` along ``axis`` (``None``: the whole axis,
    i.e. per channel of the other axis).

    Returns ``(q, scale, zero_point)``: ``q`` has ``w``'s shape and ``wtype.np_dtype``; ``scale``
    (float32) and ``zero_point`` (``q``'s dtype, or None when symmetric / float) have ``w``'s shape
    with ``axis`` replaced by the number of blocks — the layout of blocked DequantizeLinear
    (``block_size=block``, ``axis=axis``). Large weights are processed in slices of whole blocks
    (rows, or columns for per-channel blocks along axis 0), so temporaries stay small.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_blocks needs a 2-D weight, got shape {w.shape}")
    if w.size <= CHUNK_ELEMENTS:
        return _quantize_blocks(w, wtype, axis, block, symmetric)
    if axis == 0 and block is None:  # one block per column: slice columns
        step = max(1, CHUNK_ELEMENTS // w.shape[0])
        parts = [
            _quantize_blocks(w[:, c : c + step], wtype, 0, None, symmetric)
            for c in range(0, w.shape[1], step)
        ]
        cat = 1
    else:
        step = max(1, CHUNK_ELEMENTS // w.shape[1])
        if axis == 0:
            step = max(block, step // block * block)  # type: ignore[operator]
        parts = [
            _quantize_blocks(w[r : r + step], wtype, axis, block, symmetric)
            for r in range(0, w.shape[0], step)
        ]
        cat = 0
    q = np.concatenate([p[0] for p in parts], axis=cat)
    scale = np.concatenate([p[1] for p in parts], axis=cat)
    zp = None if parts[0][2] is None else np.concatenate([p[2] for p in parts], axis=cat)  # type: ignore[misc]
    return q, scale, zp


def _quantize_blocks(
    w: np.ndarray, wtype: WeightType, axis: int, block: int | None, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`quantize_blocks` on one slice, in one go."""
    w = np.asarray(w, np.float32)
    length = w.shape[axis]
    b = length if block is None else block
    blocks = _blocked(w, axis, b)
    red = 1 if axis == 0 else 2  # the within-block axis of ``blocks``
    zero_point = None
    if wtype.is_float or symmetric:
        if wtype.is_float:
            absmax = np.abs(blocks).max(axis=red)
            scale = absmax / np.float32(wtype.qmax)
        else:
            hi, lo = blocks.max(axis=red), blocks.min(axis=red)
            extremum = np.where(-lo > hi, lo, hi)  # the signed value of largest magnitude
            scale = extremum / np.float32(wtype.qmin)
    else:
        lo = np.minimum(blocks.min(axis=red), 0.0).astype(np.float64)
        hi = np.maximum(blocks.max(axis=red), 0.0).astype(np.float64)
        scale = (hi - lo) / (wtype.qmax - wtype.qmin)
        scale = np.where(scale < _TINY, 1.0, scale)
        zero_point = np.clip(np.rint(wtype.qmin - lo / scale), wtype.qmin, wtype.qmax)
    scale = np.where(np.abs(scale) < _TINY, 1.0, scale).astype(np.float32)
    del blocks
    full_scale = _expand(scale, axis, b, length)
    x = np.divide(w, full_scale, dtype=np.float32)
    del full_scale
    if wtype.is_float:
        np.clip(x, wtype.qmin, wtype.qmax, out=x)
        q = x.astype(wtype.np_dtype)  # round to nearest even
    else:
        np.rint(x, out=x)
        if zero_point is not None:
            x += _expand(zero_point.astype(np.float32), axis, b, length)
        np.clip(x, wtype.qmin, wtype.qmax, out=x)
        q = x.astype(np.int8 if wtype.signed else np.uint8).astype(wtype.np_dtype)
    if zero_point is not None:
        zero_point = zero_point.astype(np.uint8).astype(wtype.np_dtype)
    return q, scale, zero_point


def dequantize_blocks(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block: int | None
) -> np.ndarray:
    """ONNX blocked DequantizeLinear of a 2-D ``q`` (the inverse of :func:`quantize_blocks`)."""
    length = q.shape[axis]
    b = length if block is None else block
    x = q.astype(np.float32)
    if zero_point is not None:
        x -= _expand(zero_point.astype(np.float32), axis, b, length)
    return x * _expand(scale.astype(np.float32), axis, b, length)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Sub-byte values (any integer or ml_dtypes array) packed little-end first into uint8, as ONNX
    stores INT4/UINT4/INT2/UINT2/FLOAT4E2M1 (element 0 in the lowest bits); the last byte is
    zero-padded. 8-bit values are returned as their bytes."""
    flat = np.ascontiguousarray(values).reshape(-1)
    raw = flat.view(np.uint8) if flat.dtype.itemsize == 1 else flat.astype(np.uint8)
    if bits == 8:
        return raw.copy()
    per = 8 // bits
    mask = (1 << bits) - 1
    padded = np.zeros(-(-raw.size // per) * per, np.uint8)
    padded[: raw.size] = raw & mask
    padded = padded.reshape(-1, per)
    out = np.zeros(padded.shape[0], np.uint8)
    for i in range(per):
        out |= padded[:, i] << (i * bits)
    return out


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` raw ``bits``-wide fields of ``packed`` (uint8, element 0 lowest), as uint8."""
    if bits == 8:
        return packed.reshape(-1)[:count].copy()
    per = 8 // bits
    mask = (1 << bits) - 1
    fields = np.stack([(packed >> (i * bits)) & mask for i in range(per)], axis=-1)
    return fields.reshape(-1)[:count].astype(np.uint8)


def decode_table(wtype: WeightType) -> np.ndarray:
    """``[256, 8 // bits]`` float32: the values a byte of packed ``wtype`` data holds, in order
    (integer types as their signed/unsigned integers, float types as their float values)."""
    per = 8 // wtype.bits
    fields = unpack(np.arange(256, dtype=np.uint8), wtype.bits, 256 * per).reshape(256, per)
    return fields_to_values(fields, wtype)


def fields_to_values(fields: np.ndarray, wtype: WeightType) -> np.ndarray:
    """Raw ``bits``-wide fields (uint8) read as ``wtype`` values, float32."""
    if wtype.is_float:
        if wtype.bits == 8:
            return fields.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return _FP4_VALUES[fields]
    values = fields.astype(np.int16)
    if wtype.signed:
        sign = 1 << (wtype.bits - 1)
        values = np.where(values >= sign, values - (1 << wtype.bits), values)
    return values.astype(np.float32)


# e2m1: sign bit 3, then 2 exponent bits and 1 mantissa bit.
_FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
