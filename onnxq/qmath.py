"""Quantization arithmetic, exactly as ONNX QuantizeLinear/DequantizeLinear define it.

Scales are computed in float64 and stored as float32, the real range is widened to include 0,
QuantizeLinear rounds half to even and saturates; these are the conventions of ONNX Runtime's
quantizer, so models made by either agree bit for bit on the same ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class IntType:
    """An integer quantization type: its numpy dtype, ONNX dtype and representable range."""

    name: str
    np_dtype: type
    ir_dtype: ir.DataType
    qmin: int
    qmax: int


INT_TYPES: dict[str, IntType] = {
    "uint8": IntType("uint8", np.uint8, ir.DataType.UINT8, 0, 255),
    "int8": IntType("int8", np.int8, ir.DataType.INT8, -128, 127),
    "uint16": IntType("uint16", np.uint16, ir.DataType.UINT16, 0, 65535),
    "int16": IntType("int16", np.int16, ir.DataType.INT16, -32768, 32767),
}


def int_type(name: str) -> IntType:
    """The :class:`IntType` called ``name``; KeyError if onnxq does not support it."""
    return INT_TYPES[name]


def quant_range(qtype: IntType, symmetric: bool) -> tuple[int, int]:
    """The integer range used: symmetric signed types drop their most negative value (-127..127)."""
    if symmetric and qtype.qmin < 0:
        return qtype.qmin + 1, qtype.qmax
    return qtype.qmin, qtype.qmax


def scale_zero_point(
    rmin: np.ndarray | float, rmax: np.ndarray | float, qtype: IntType, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``qtype``) that map ``[rmin, rmax]`` onto the integer range.

    Works element-wise, so per-channel ranges give per-channel parameters. The range always contains 0
    (so 0 is exact); symmetric ranges are ``[-absmax, absmax]`` with the zero point at the centre; a
    scale below float32's smallest normal becomes 1.0 (an all-zero tensor).
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = quant_range(qtype, symmetric)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    scale = (rmax - rmin) / float(qmax - qmin)
    scale = np.where(scale < _FLOAT32_TINY, 1.0, scale)
    if symmetric:
        zero_point = np.full(scale.shape, (qmin + qmax + 1) // 2 if qtype.qmin >= 0 else 0, np.float64)
    else:
        zero_point = np.clip(np.rint(qmin - rmin / scale), qmin, qmax)
    return scale.astype(np.float32), zero_point.astype(qtype.np_dtype)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


# Elements quantized per step: big weights go through in row blocks that stay in cache.
_CHUNK_ELEMENTS = 2**16


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)`` in zero_point's dtype."""
    x = np.asarray(x)
    if x.ndim == 0:
        return quantize(x.reshape(1), scale, zero_point).reshape(())
    qtype = np.iinfo(zero_point.dtype)
    scale = _broadcast(np.asarray(scale, np.float32), x.ndim, axis)
    zp = _broadcast(np.asarray(zero_point), x.ndim, axis).astype(np.float32)
    out = np.empty(x.shape, zero_point.dtype)
    if x.ndim < 2:
        parts: list = [...]
        largest = x.size
    else:
        rows = max(1, _CHUNK_ELEMENTS // max(1, x[0].size))
        parts = [slice(start, start + rows) for start in range(0, x.shape[0], rows)]
        largest = min(rows, x.shape[0]) * x[0].size
    shift = bool(np.any(zp))
    buffer = np.empty(largest, np.float32)
    for part in parts:
        s = scale[part] if part is not ... and scale.ndim and scale.shape[0] > 1 else scale
        z = zp[part] if part is not ... and zp.ndim and zp.shape[0] > 1 else zp
        chunk = x[part]
        # one buffer for every chunk: a fresh 256 KiB array each would be a new mapping to fault in
        q = buffer[: chunk.size].reshape(chunk.shape)
        np.divide(np.asarray(chunk, np.float32), s, out=q, dtype=np.float32)
        np.rint(q, out=q)
        if shift:
            np.add(q, z, out=q)
        np.clip(q, qtype.min, qtype.max, out=q)
        out[part] = q
    return out


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    scale = _broadcast(np.asarray(scale, np.float32), q.ndim, axis)
    zp = _broadcast(np.asarray(zero_point), q.ndim, axis).astype(np.float32)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


def channel_range(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``w`` over everything but ``axis`` (the whole tensor when axis is None)."""
    if axis is None or w.ndim == 0:
        return np.asarray(w.min() if w.size else 0.0), np.asarray(w.max() if w.size else 0.0)
    axes = tuple(i for i in range(w.ndim) if i != axis)
    if w.size == 0:
        return np.zeros(w.shape[axis]), np.zeros(w.shape[axis])
    return w.min(axis=axes), w.max(axis=axes)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Bias as int32 with the given (input_scale * weight_scale) scale and zero point 0, saturated."""
    info = np.iinfo(np.int32)
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    return np.clip(q, info.min, info.max).astype(np.int32)
